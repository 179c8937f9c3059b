#!/usr/bin/env bash
# loupe against lucent on the same GPU, in one run: lucent's InceptionV1 (random weights),
# layer mixed4a, 256 units, 512 steps, 128 px upsampled to 224. Prints the GPU, then
#   - loupe fp32 and loupe bf16, units/s, each with its per-step time split;
#   - how far bf16's final objectives are from fp32's, unit by unit;
#   - loupe bf16 on every mixed layer (fewer steps), and the estimated wall time of a
#     complete InceptionV1 channel atlas from those rates;
#   - images/s through the dataset statistics pass (bench/stats.sh) on every mixed layer;
#   - lucent batched (../shared/bench/lucent_anchor.py), last, as the reference.
#
# Runs on the GPU machine from the repository root, with the release binary built here
# and carried along, plus two ignored folders prepared as docs/benchmarks.md says:
#   .whl/   torch-lucent 0.1.8, kornia 0.4.1 and decorator wheels
#   .peer/  ../shared/bench/*.py
# About 7 minutes on an H200 (not yet run: no GPU session so far).  SKIP_LUCENT=1 leaves out the reference.
set -euo pipefail
cd "$(dirname "$0")/.."
UNITS=${UNITS:-256}
STEPS=${STEPS:-512}
EST_STEPS=${EST_STEPS:-64}
DEVICE=${DEVICE:-cuda:0}
WORK=${OUT:-$(mktemp -d)}
SITE=/tmp/loupe-bench-site
MIXED=mixed3a,mixed3b,mixed4a,mixed4b,mixed4c,mixed4d,mixed4e,mixed5a,mixed5b
export LD_LIBRARY_PATH="$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib:${LD_LIBRARY_PATH:-}"
python3 -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

PYTHONPATH=$SITE python3 tools/export.py --model lucent:inceptionv1 --layers "$MIXED" \
  --preprocess inceptionv1 --input-size 224 --out "$WORK/inceptionv1.pt"

render() { # precision out layer units steps [extra flags]
  target/release/loupe render --model "$WORK/inceptionv1.pt" --out "$WORK/$2" --layers "$3" \
    --units "0..$4" --techniques channel --steps "$5" --size 128 --input-size 224 \
    --precision "$1" --device "$DEVICE" "${@:6}"
}

for p in fp32 bf16; do
  echo "== loupe $p, mixed4a, $UNITS units, $STEPS steps, batch $UNITS"
  render $p $p mixed4a "$UNITS" "$STEPS" --batch "$UNITS" --profile | tee "$WORK/loupe-$p.txt"
done

echo "== bf16 against fp32: final objective of each unit (untransformed image)"
python3 - "$WORK" <<'EOF'
import json, pathlib, statistics, sys
work = pathlib.Path(sys.argv[1])
def objectives(p):
    return {int(f.parent.name): json.loads(f.read_text())["objective"]
            for f in (work / p / "layers/mixed4a/units").glob("*/channel.json")}
a, b = objectives("fp32"), objectives("bf16")
rel = sorted(abs(b[u] - a[u]) / max(abs(a[u]), 1e-6) for u in a)
print(f"units {len(rel)}; mean fp32 {statistics.mean(a.values()):.4g}, mean bf16 {statistics.mean(b.values()):.4g}; "
      f"relative difference median {statistics.median(rel):.3%}, 90th percentile {rel[int(0.9 * len(rel))]:.3%}, max {rel[-1]:.3%}")
EOF

echo "== loupe bf16, every mixed layer, $UNITS units, $EST_STEPS steps (batch from memory)"
for layer in ${MIXED//,/ }; do
  line=$(render bf16 "est-$layer" "$layer" "$UNITS" "$EST_STEPS" 2>/dev/null | tail -1)
  rate=${line##*s, }; echo "$layer ${rate%% units/s)}"
done | tee "$WORK/layers.txt"
python3 - "$WORK/layers.txt" "$EST_STEPS" <<'EOF'
import sys
# Channels of InceptionV1's mixed layers (lucent's naming).
units = dict(mixed3a=256, mixed3b=480, mixed4a=508, mixed4b=512, mixed4c=512, mixed4d=528,
             mixed4e=832, mixed5a=832, mixed5b=1024)
steps = int(sys.argv[2])
total = 0.0
for line in open(sys.argv[1]):
    layer, rate = line.split()
    rate512 = float(rate) * steps / 512
    total += units[layer] / rate512
    print(f"{layer}: {rate512:.2f} units/s at 512 steps, {units[layer] / rate512:.0f} s for {units[layer]} units")
print(f"estimated complete channel atlas of InceptionV1 (all mixed layers, {sum(units.values())} units, 512 steps): "
      f"{total / 60:.1f} min on this GPU")
EOF

echo "== statistics pass: InceptionV1, every mixed layer, every unit, 5,000 images at 224 px"
MODEL="$WORK/inceptionv1.pt" LAYERS="$MIXED" INPUT=224 DEVICE="$DEVICE" IMAGES=5000 CONNECTIONS=0 PY=python3 bench/stats.sh
# Connections cost one backward pass per unit of the later layer per batch: measured on
# two layers and 64 units each, whose figure scales linearly to more units.
echo "== statistics and connections: mixed4a -> mixed4b, units 0..64, 1,000 images at 224 px"
MODEL="$WORK/inceptionv1.pt" LAYERS=mixed4a,mixed4b UNITS=0..64 INPUT=224 DEVICE="$DEVICE" IMAGES=1000 PY=python3 bench/stats.sh

if [ -z "${SKIP_LUCENT:-}" ]; then
  echo "== lucent, the same work (mixed4a, $UNITS units in one optimisation, $STEPS steps)"
  PYTHONPATH=$SITE STEPS=$STEPS BATCHES=$UNITS OUT=$WORK python3 .peer/lucent_anchor.py | tee "$WORK/lucent.txt"
fi
