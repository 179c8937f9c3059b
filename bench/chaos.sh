#!/usr/bin/env bash
# The long chaos run (issue 16): a Redis-backed coordinator pair and 4 workers on loopback
# render a job of a few thousand images of the demo model with a dataset pass into an S3
# atlas, while a seeded loop SIGKILLs and restarts workers, a coordinator and Redis (AOF,
# fsync always), and a second job writes other layers into the same atlas. Then
# bench/chaos-check.py checks the atlas against a quiet local `loupe render` of the same
# two jobs. Not part of `make test`: it takes about 5 minutes on two cores.
#
#   bench/chaos.sh                          # after `cargo build --release --bins`
#   SEED=7 DIVERSITY=2 UNITS=0..2 bench/chaos.sh   # a smoke run, 1-2 minutes
#
# Knobs (environment):
#   SEED=1            the chaos loop's random seed (fault kinds, victims, intervals)
#   STEPS=8 SIZE=32   the render settings of both jobs
#   DIVERSITY=16      diversity images per unit: the job's size (80 units x (3 + N)
#                     images, each with a snapshot at THRESHOLDS)
#   THRESHOLDS=4      snapshot steps
#   UNITS=all         units of each layer (`all`, `0..8`, `0,3,7`)
#   DATASET_IMAGES=400  random JPEGs added to the fixture images for the dataset pass
#   IMAGES_PER_SHARD=25 BATCH=8   the cluster's map and render task sizes (many small
#                     tasks to hit; the quiet run keeps render's default batch)
#   FAULT_MIN=4 FAULT_MAX=15      seconds between faults (uniform)
#   SECOND_JOB_AFTER=20           seconds after the first job's submit
#   MAX_ATTEMPTS=10   the coordinators' --max-attempts
#   DURATION=1200     give up (and fail) when the jobs are not done by then (seconds)
#   OUT=dir           where logs and atlases go (default: a new temporary directory)
# Needs redis-server, s3s-fs (tools/setup-services.sh), the aws CLI and .venv's Python
# with Pillow and pyarrow.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SEED=${SEED:-1} STEPS=${STEPS:-8} SIZE=${SIZE:-32} DIVERSITY=${DIVERSITY:-16}
THRESHOLDS=${THRESHOLDS:-4} UNITS=${UNITS:-all} DATASET_IMAGES=${DATASET_IMAGES:-400}
IMAGES_PER_SHARD=${IMAGES_PER_SHARD:-25} BATCH=${BATCH:-8} FAULT_MIN=${FAULT_MIN:-4}
FAULT_MAX=${FAULT_MAX:-15} SECOND_JOB_AFTER=${SECOND_JOB_AFTER:-20} DURATION=${DURATION:-1200}
MAX_ATTEMPTS=${MAX_ATTEMPTS:-10}
LAYERS_A=conv1,conv2,conv3 LAYERS_B=logits TECHNIQUES=channel,neuron,negative,diversity
WORK=${OUT:-$(mktemp -d /tmp/loupe-chaos.XXXXXX)}
mkdir -p "$WORK"/{bin,logs,redis,s3/models,s3/atlas,dataset}
PY=$( [ -x .venv/bin/python ] && echo "$ROOT/.venv/bin/python" || echo python3 )
S3FS=$(command -v s3s-fs || echo "$HOME/.cargo/bin/s3s-fs")
echo "chaos run: seed $SEED, work dir $WORK"

# Copies, so that a build during the run cannot swap the binaries under the restarts.
for b in loupe loupe-coordinator loupe-worker; do cp "target/release/$b" "$WORK/bin/"; done
BIN=$WORK/bin

# Every process this script started and that still runs is one of its jobs.
cleanup() {
  local running
  running=$(jobs -p)
  [ -z "$running" ] || kill -9 $running 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT
log() { echo "[$(date -u +%H:%M:%S)] $*"; }
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() { # port what [open|closed]
  local until=$((SECONDS + 60))
  while :; do
    if [ "${3:-open}" = open ]; then port_open "$1" && return 0; else port_open "$1" || return 0; fi
    [ $SECONDS -lt $until ] || { echo "timed out waiting for $2 (port $1 ${3:-open})" >&2; exit 1; }
    sleep 0.2
  done
}

# --- services: S3 (s3s-fs) and Redis with AOF -----------------------------------------
S3_PORT=$(free_port)
export AWS_ACCESS_KEY_ID=loupe-test-access AWS_SECRET_ACCESS_KEY=loupe-test-secret-key
export AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1 AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT
export LOUPE_S3_FORCE_PATH_STYLE=1
"$S3FS" --host 127.0.0.1 --port "$S3_PORT" --access-key "$AWS_ACCESS_KEY_ID" \
  --secret-key "$AWS_SECRET_ACCESS_KEY" "$WORK/s3" >> "$WORK/logs/s3.log" 2>&1 &
wait_port "$S3_PORT" s3s-fs
s3() { aws --endpoint-url "$AWS_ENDPOINT_URL" s3 "$@" --only-show-errors; }

REDIS_PORT=$(free_port) REDIS_PID=
start_redis() {
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --dir "$WORK/redis" \
    --appendonly yes --appendfsync always >> "$WORK/logs/redis.log" 2>&1 &
  REDIS_PID=$!
  wait_port "$REDIS_PORT" redis-server
}
start_redis

# --- inputs: the demo model and a dataset (fixture images, one broken, and random JPEGs)
cp tests/fixtures/dataset/images/* "$WORK/dataset/"
"$PY" - "$WORK/dataset" "$DATASET_IMAGES" <<'EOF'
import pathlib, sys
import numpy as np
from PIL import Image
out, n = pathlib.Path(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
for i in range(n):
    base = rng.uniform(0, 255, size=3)
    img = np.clip(base + rng.normal(0, 40, (64, 64, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(out / f"random-{i:04d}.jpg", quality=90)
EOF
s3 cp models/demo/demo.pt s3://models/demo/demo.pt
s3 cp models/demo/demo.json s3://models/demo/demo.json
s3 cp --recursive "$WORK/dataset" s3://models/dataset/
MODEL=s3://models/demo/demo.pt DATASET=s3://models/dataset/ ATLAS=s3://atlas/chaos
SETTINGS=(--steps "$STEPS" --size "$SIZE" --thresholds "$THRESHOLDS" --seed 3 --units "$UNITS"
  --techniques "$TECHNIQUES" --diversity-images "$DIVERSITY")
JOB_A=(--layers "$LAYERS_A" "${SETTINGS[@]}" --dataset "$DATASET" --examples 3 --images-per-shard "$IMAGES_PER_SHARD")
JOB_B=(--layers "$LAYERS_B" "${SETTINGS[@]}")

# --- the quiet run: the same two jobs, one local process, no faults --------------------
log "quiet local render of both jobs into $WORK/quiet"
quiet_start=$SECONDS
"$BIN/loupe" render --model models/demo/demo.pt --out "$WORK/quiet" --device cpu "${JOB_A[@]}" > "$WORK/logs/quiet.log" 2>&1
"$BIN/loupe" render --model models/demo/demo.pt --out "$WORK/quiet" --device cpu "${JOB_B[@]}" >> "$WORK/logs/quiet.log" 2>&1
QUIET_SECONDS=$((SECONDS - quiet_start))
log "quiet run: $QUIET_SECONDS s; $(grep 'atlas complete' "$WORK/logs/quiet.log" | tail -1)"

# --- the cluster: two coordinators on one Redis, workers split 2 + 2 ------------------
echo user-chaos-token > "$WORK/user-token"
echo worker-chaos-token > "$WORK/worker-token"
export LOUPE_TOKEN_FILE=$WORK/user-token
COORD_PORT=("$(free_port)" "$(free_port)") COORD_PID=(0 0)
# Each fault can cost the tasks in flight an attempt; a task killed MAX_ATTEMPTS times
# fails its job, as it should, so the run allows more than the default 3.
start_coordinator() { # index
  "$BIN/loupe-coordinator" --listen "127.0.0.1:${COORD_PORT[$1]}" --metrics-listen "127.0.0.1:$(free_port)" \
    --state "redis://127.0.0.1:$REDIS_PORT/0" --lease-ttl 6s --max-attempts "$MAX_ATTEMPTS" \
    --input-prefix s3://models --out-prefix s3://atlas \
    --user-token-file "$WORK/user-token" --worker-token-file "$WORK/worker-token" \
    >> "$WORK/logs/coordinator-$1.log" 2>&1 &
  COORD_PID[$1]=$!
  wait_port "${COORD_PORT[$1]}" "coordinator $1"
}
WORKER_PID=(0 0 0 0)
start_worker() { # index; workers 0 and 1 use coordinator 0, 2 and 3 coordinator 1
  LOUPE_LOG=info "$BIN/loupe-worker" --coordinator "http://127.0.0.1:${COORD_PORT[$(($1 / 2))]}" --device cpu \
    --name "w$1" --metrics-listen "127.0.0.1:$(free_port)" --model-cache "$WORK/cache-$1" \
    --token-file "$WORK/worker-token" >> "$WORK/logs/worker-$1.log" 2>&1 &
  WORKER_PID[$1]=$!
}
start_coordinator 0
start_coordinator 1
for i in 0 1 2 3; do start_worker "$i"; done

# A CLI command against whichever coordinator answers (one may be down).
cli() {
  local i
  for i in 0 1; do
    timeout 30 "$BIN/loupe" "$@" --coordinator "http://127.0.0.1:${COORD_PORT[$i]}" 2>> "$WORK/logs/cli.log" && return 0
  done
  return 1
}
submit() { # job flags...; retries while the coordinators or Redis are down
  local until=$((SECONDS + 120)) id
  until id=$(cli submit --model "$MODEL" --out "$ATLAS" --batch "$BATCH" "$@"); do
    [ $SECONDS -lt $until ] || { echo "could not submit a job for 120 s" >&2; exit 1; }
    sleep 1
  done
  echo "$id"
}

# --- the run: faults at seeded random intervals until both jobs have ended ------------
RANDOM=$SEED
declare -A FAULTS=([worker]=0 [coordinator]=0 [redis]=0)
# RANDOM only in this shell, never in a $(...) subshell, so that the seed replays the run.
pause() { sleep "$((RANDOM % 3)).$((RANDOM % 10))"; } # 0-2.9 s down, as a restart would be
kill_now() { # pid what: SIGKILL, or say that it had already exited (a finding)
  kill -9 "$1" 2>/dev/null || log "note: $2 had already exited: see its log"
  wait "$1" 2>/dev/null || true
}
inject() { # kind
  local i
  case $1 in
    worker)
      i=$((RANDOM % 4))
      kill_now "${WORKER_PID[$i]}" "worker w$i"
      pause; start_worker "$i"; log "fault: SIGKILL worker w$i, restarted" ;;
    coordinator)
      i=$((RANDOM % 2))
      kill_now "${COORD_PID[$i]}" "coordinator $i"
      pause; start_coordinator "$i"; log "fault: SIGKILL coordinator $i, restarted" ;;
    redis)
      kill_now "$REDIS_PID" redis-server
      wait_port "$REDIS_PORT" redis-server closed
      pause; start_redis; log "fault: SIGKILL redis, restarted (AOF)" ;;
  esac
  FAULTS[$1]=$((FAULTS[$1] + 1))
  echo "$(date -u +%FT%TZ) $1" >> "$WORK/faults.log"
}
# The first three faults are one of each kind in a random order; then workers half the time.
KINDS=(worker coordinator redis)
for i in 2 1; do j=$((RANDOM % (i + 1))); t=${KINDS[$i]}; KINDS[$i]=${KINDS[$j]}; KINDS[$j]=$t; done
next_kind() { # sets KIND
  if [ ${#KINDS[@]} -gt 0 ]; then KIND=${KINDS[0]}; KINDS=("${KINDS[@]:1}"); return; fi
  case $((RANDOM % 4)) in 0|1) KIND=worker ;; 2) KIND=coordinator ;; 3) KIND=redis ;; esac
}

# The jobs' states, polled in the background so that a slow CLI call (libtorch loads at
# start, the machine is busy) never delays a fault: one line per job in $WORK/states.
poll_states() { # job ids...
  local id line
  while :; do
    for id in "$@"; do
      line=$(cli status "$id" | head -1) || line="$id unknown"
      echo "$line" | awk '{print $1, $2}' | tr -d ':'
    done > "$WORK/states.new"
    mv "$WORK/states.new" "$WORK/states"
    sleep 3
  done
}
POLLER=
watch_jobs() { # job ids...
  [ -z "$POLLER" ] || { kill "$POLLER"; wait "$POLLER" 2>/dev/null || true; }
  rm -f "$WORK/states"
  poll_states "$@" &
  POLLER=$!
}
state_of() { awk -v id="$1" '$1 == id {print $2}' "$WORK/states" 2>/dev/null; }
ended() { case $(state_of "$1") in succeeded|failed|cancelled) return 0 ;; *) return 1 ;; esac; }

run_start=$SECONDS
ID_A=$(submit "${JOB_A[@]}")
log "submitted the first job: $ID_A (layers $LAYERS_A, dataset)"
watch_jobs "$ID_A"
ID_B=""
next_fault=$((SECONDS + FAULT_MIN + RANDOM % (FAULT_MAX - FAULT_MIN + 1)))
while :; do
  if [ -z "$ID_B" ] && [ $((SECONDS - run_start)) -ge "$SECOND_JOB_AFTER" ]; then
    ID_B=$(submit "${JOB_B[@]}")
    log "submitted the second job into the same atlas: $ID_B (layers $LAYERS_B)"
    watch_jobs "$ID_A" "$ID_B"
  fi
  if [ -n "$ID_B" ] && ended "$ID_A" && ended "$ID_B"; then break; fi
  if [ $((SECONDS - run_start)) -ge "$DURATION" ]; then
    log "gave up after $DURATION s: $ID_A $(state_of "$ID_A"), ${ID_B:-the second job} $(state_of "$ID_B")"
    break
  fi
  if [ $SECONDS -ge $next_fault ]; then
    next_kind
    inject "$KIND"
    next_fault=$((SECONDS + FAULT_MIN + RANDOM % (FAULT_MAX - FAULT_MIN + 1)))
  fi
  sleep 0.5
done
kill "$POLLER"; wait "$POLLER" 2>/dev/null || true
RUN_SECONDS=$((SECONDS - run_start))
log "jobs ended after $RUN_SECONDS s: $ID_A $(state_of "$ID_A"), $ID_B $(state_of "$ID_B")"

# Quiet now: the final job list through a coordinator, then stop the cluster.
cli status "$ID_A" > "$WORK/status.txt" || true
cli status "$ID_B" >> "$WORK/status.txt" || true
cli jobs > "$WORK/jobs.txt" || echo "(listing jobs failed)" > "$WORK/jobs.txt"
for p in "${WORKER_PID[@]}" "${COORD_PID[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
for p in "${WORKER_PID[@]}" "${COORD_PID[@]}"; do wait "$p" 2>/dev/null || true; done
s3 sync "$ATLAS" "$WORK/cluster"

echo
echo "== chaos run summary (seed $SEED) =="
echo "faults injected: worker ${FAULTS[worker]}, coordinator ${FAULTS[coordinator]}, redis ${FAULTS[redis]} (times in $WORK/faults.log)"
echo "jobs: $ID_A (layers $LAYERS_A, dataset of $(ls "$WORK/dataset" | wc -l) images) and $ID_B (layers $LAYERS_B); final states:"
sed 's/^/  /' "$WORK/status.txt"
leases() { sed 's/\x1b\[[0-9;]*m//g' "$WORK"/logs/worker-*.log | grep 'task leased'; }
echo "task leases: $(leases | wc -l), of which retries (attempt 2 or more): $(leases | grep -vc 'attempt=1 ')"
echo "cluster run: $RUN_SECONDS s; quiet local run of the same jobs: $QUIET_SECONDS s"
echo "logs: $WORK/logs"
"$PY" bench/chaos-check.py --cluster "$WORK/cluster" --quiet "$WORK/quiet" --jobs "$WORK/jobs.txt" \
  --job "$ID_A" --job "$ID_B" --model-layers "$("$BIN/loupe" inspect --model models/demo/demo.pt | awk 'NR>2 {printf "%s%s=%s", sep, $1, $2; sep=","}')" \
  --layers "$LAYERS_A,$LAYERS_B" --stats-layers "$LAYERS_A" --units "$UNITS" --techniques "$TECHNIQUES" \
  --diversity "$DIVERSITY" --thresholds "$THRESHOLDS" --steps "$STEPS" --size "$SIZE"
