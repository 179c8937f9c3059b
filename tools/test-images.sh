#!/usr/bin/env bash
# End-to-end test of the container images (`make test-images`): Redis, the S3 server, the
# coordinator and two workers run as containers on one podman network; the CLI image
# submits the demo model from S3; one worker is SIGKILLed while it holds a task. The
# test passes when the job succeeds, the killed worker's task was leased again, and the
# atlas in S3 equals, byte for byte, a local `loupe render` of the same job run in the
# CLI image (only atlas.json's `created` and the job manifests under jobs/ may differ).
#
# Builds the loupe images first when they are missing (tools/build-images.sh), and the
# images of the test's services (tools/images/test-services.sh).
# Needs the aws CLI. WORK=dir keeps the logs and atlases there (default: a temporary
# directory, removed after a pass).
set -euo pipefail
cd "$(dirname "$0")/.."
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/tools/images/containers.conf}
TAG=${TAG:-$(sed -n 's/^appVersion: "\(.*\)"/\1/p' helm/loupe/Chart.yaml)}
COORDINATOR=localhost/loupe-coordinator:$TAG WORKER=localhost/loupe-worker:$TAG CLI=localhost/loupe:$TAG
REDIS=localhost/loupe-test/redis:trixie S3FS_IMAGE=localhost/loupe-test/s3s-fs:0.14.1
RUN_ID=loupe-e2e-$$
WORK=${WORK:-$(mktemp -d /tmp/loupe-images.XXXXXX)}
mkdir -p "$WORK"/{s3,tokens,local,cluster,logs}
log() { echo "[$(date -u +%H:%M:%S)] $*"; }
die() { echo "FAIL: $*" >&2; exit 1; }

have_image() { [ -n "$(podman images -q "$1" 2>/dev/null)" ]; }
for image in "$COORDINATOR" "$WORKER" "$CLI"; do
  have_image "$image" || { log "$image is missing: tools/build-images.sh"; tools/build-images.sh; break; }
done
tools/images/test-services.sh

# The worker image links libtorch_cuda, every library resolves inside the image (the
# driver's libcuda.so.1 aside, which the node mounts), and asking for a GPU where there
# is none stops the worker rather than leaving it on the CPU.
libs=$(podman run --rm --entrypoint ldd "$WORKER" /usr/local/bin/loupe-worker)
grep -q 'libtorch_cuda.so => /opt/libtorch/lib/' <<<"$libs" || die "the worker does not load libtorch_cuda from /opt/libtorch/lib: $libs"
! grep 'not found' <<<"$libs" || die "the worker image lacks libraries"
if out=$(podman run --rm "$WORKER" --coordinator http://127.0.0.1:1 --device cuda:0 2>&1); then
  die "a worker asked for cuda:0 without a GPU started: $out"
fi
grep -q 'CUDA is not available' <<<"$out" || die "a worker asked for cuda:0 without a GPU did not say why: $out"
if out=$(podman run --rm "$WORKER" --coordinator http://127.0.0.1:1 --device cpu --model-cache /opt/cache 2>&1); then
  die "a worker whose model cache cannot be written started: $out"
fi
grep -q 'model cache /opt/cache .* cannot be written' <<<"$out" || die "a worker whose model cache cannot be written did not say why: $out"
log "worker image: libtorch_cuda linked, libraries complete; no GPU for cuda:0, or no writable model cache, stops it"

# Every container of this run carries its label; all go at exit, logs first.
cleanup() {
  local status=$?
  for c in $(podman ps -a --filter "label=$RUN_ID" --format '{{.Names}}'); do
    podman logs "$c" > "$WORK/logs/$c.log" 2>&1 || true
  done
  podman rm -f -t 0 $(podman ps -a -q --filter "label=$RUN_ID") >/dev/null 2>&1 || true
  podman network rm -f "$RUN_ID" >/dev/null 2>&1 || true
  if [ $status -eq 0 ] && [ -z "${KEEP:-}" ]; then rm -rf "$WORK"; else echo "logs and atlases: $WORK" >&2; fi
}
trap cleanup EXIT
podman network create "$RUN_ID" >/dev/null
start() { # name image args...: a detached container of this run on its network
  local name=$1; shift
  podman run -d --name "$RUN_ID-$name" --network-alias "$name" --network "$RUN_ID" --label "$RUN_ID" "$@" >/dev/null
}
wait_for() { # seconds what command...: polls the command until it succeeds
  local seconds=$1 what=$2; shift 2
  local until=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $until ] || die "$what did not happen within $seconds s"
    sleep 1
  done
}

# --- services -----------------------------------------------------------------------
S3_KEY=loupe-test-access S3_SECRET=loupe-test-secret-key
S3_ENV=(-e AWS_ACCESS_KEY_ID=$S3_KEY -e AWS_SECRET_ACCESS_KEY=$S3_SECRET -e AWS_REGION=us-east-1
  -e AWS_ENDPOINT_URL=http://s3:9000 -e LOUPE_S3_FORCE_PATH_STYLE=1)
S3_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
start s3 -p "127.0.0.1:$S3_PORT:9000" -v "$WORK/s3:/data" "$S3FS_IMAGE" \
  --host 0.0.0.0 --port 9000 --access-key "$S3_KEY" --secret-key "$S3_SECRET" /data
start redis "$REDIS" redis-server --bind 0.0.0.0 --protected-mode no --save ''
s3() { AWS_ACCESS_KEY_ID=$S3_KEY AWS_SECRET_ACCESS_KEY=$S3_SECRET AWS_DEFAULT_REGION=us-east-1 \
  aws --endpoint-url "http://127.0.0.1:$S3_PORT" s3 "$@"; }
wait_for 60 "the S3 server answering" s3 ls
for bucket in models atlas; do s3 mb "s3://$bucket" >/dev/null; done
s3 cp --only-show-errors models/demo/demo.pt s3://models/demo/demo.pt
s3 cp --only-show-errors models/demo/demo.json s3://models/demo/demo.json
s3 cp --only-show-errors --recursive tests/fixtures/dataset/images s3://models/dataset/

# --- loupe: a coordinator and two workers -------------------------------------------
echo user-e2e-token > "$WORK/tokens/user"
echo worker-e2e-token > "$WORK/tokens/worker"
chmod 0644 "$WORK/tokens"/*
TOKENS=(-v "$WORK/tokens:/tokens:ro")
# A short lease TTL, so that the killed worker's task goes to the other within seconds.
start coordinator "${S3_ENV[@]}" "${TOKENS[@]}" "$COORDINATOR" \
  --state redis://redis:6379/0 --lease-ttl 6s --input-prefix s3://models --out-prefix s3://atlas \
  --user-token-file /tokens/user --worker-token-file /tokens/worker
# The model caches are directories of the host: podman 4.3 remounts a --tmpfs without
# its mode when it restarts a container, and the killed worker is restarted.
for i in 1 2; do
  mkdir -p "$WORK/cache-$i" && chmod a+rwx "$WORK/cache-$i"
  start "worker-$i" "${S3_ENV[@]}" "${TOKENS[@]}" -v "$WORK/cache-$i:/cache" "$WORKER" \
    --coordinator http://coordinator:7600 --device cpu --name "w$i" --token-file /tokens/worker
done
loupe() { # the CLI image on the run's network, as a user with the user token
  podman run --rm --network "$RUN_ID" "${S3_ENV[@]}" "${TOKENS[@]}" -e LOUPE_TOKEN_FILE=/tokens/user \
    -e LOUPE_COORDINATOR=http://coordinator:7600 "$@"
}
wait_for 120 "the coordinator answering" loupe "$CLI" jobs

# --- the job, and a worker killed while it holds a task ------------------------------
JOB=(--layers conv1,conv2,logits --units all --techniques channel,neuron,diversity
  --diversity-images 2 --steps 48 --size 48 --thresholds 24 --seed 11 --examples 3)
log "submitting the demo model from S3"
ID=$(loupe "$CLI" submit --model s3://models/demo/demo.pt --out s3://atlas/e2e --batch 4 \
  --dataset s3://models/dataset/ "${JOB[@]}")
log "job $ID"
has_leased() { podman logs "$RUN_ID-$1" 2>&1 | grep -q 'task leased'; }
wait_for 300 "worker-1 leasing a task" has_leased worker-1
state() { local out; out=$(loupe "$CLI" status "$ID") && echo "${out%%$'\n'*}"; }
case $(state) in *succeeded*|*failed*|*cancelled*) die "the job ended before a worker could be killed: $(state)" ;; esac
podman kill --signal KILL "$RUN_ID-worker-1" >/dev/null
log "SIGKILLed worker-1 holding a task; restarting it"
podman start "$RUN_ID-worker-1" >/dev/null
until_end=$((SECONDS + 1200))
while :; do
  s=$(state) || s="(no status)"
  case $s in *succeeded*) break ;; *failed*|*cancelled*) die "the job ended: $s" ;; esac
  [ $SECONDS -lt $until_end ] || die "the job did not end within 1200 s: $s"
  sleep 3
done
log "cluster: $s"
retried=$(for w in worker-1 worker-2; do podman logs "$RUN_ID-$w" 2>&1; done | grep 'task leased' | grep -c 'attempt=2' || true)
[ "$retried" -gt 0 ] || die "no task was leased a second time: the kill did not cost a lease"
log "$retried task(s) leased again after the kill"

# --- the same job rendered locally in the CLI image, and the comparison --------------
mkdir -p "$WORK/models" && cp models/demo/demo.pt models/demo/demo.json "$WORK/models/" && chmod -R a+rwX "$WORK/local" "$WORK/models"
# The model with its sidecar (demo.json: name, input size), as in S3; the dataset from
# S3 too, since the records name each example's source.
loupe --label "$RUN_ID" -v "$WORK/models:/models:ro" -v "$WORK/local:/out" "$CLI" \
  render --model /models/demo.pt --out /out/e2e --device cpu --dataset s3://models/dataset/ "${JOB[@]}" | tail -1
s3 cp --only-show-errors --recursive s3://atlas/e2e "$WORK/cluster/e2e"
python3 - "$WORK/cluster/e2e" "$WORK/local/e2e" <<'PYEOF'
import json, pathlib, sys
cluster, local = map(pathlib.Path, sys.argv[1:])
def files(root):
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.relative_to(root).parts[0] != "jobs"}
a, b = files(cluster), files(local)
problems = [f"only in the cluster's atlas: {f}" for f in sorted(a - b)] + [f"only in the local atlas: {f}" for f in sorted(b - a)]
for f in sorted(a & b - {"atlas.json"}):
    if (cluster / f).read_bytes() != (local / f).read_bytes():
        problems.append(f"differs: {f}")
docs = [json.loads((root / "atlas.json").read_text()) for root in (cluster, local)]
for doc in docs:
    doc.pop("created", None)
if docs[0] != docs[1]:
    problems.append("atlas.json differs beyond `created`")
pngs = sum(f.endswith(".png") for f in a)
print(f"{len(a)} files compared ({pngs} PNGs), {len(problems)} problems")
for p in problems[:20]:
    print("  " + p)
sys.exit(1 if problems or pngs == 0 else 0)
PYEOF
log "PASS: the cluster of containers rendered the same atlas as a local render"
