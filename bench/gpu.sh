#!/usr/bin/env bash
# loupe against lucent on the same GPU, in one run: lucent's InceptionV1 (random weights),
# layer mixed4a, 256 units, 512 steps, 128 px upsampled to 224. Prints the GPU, lucent's
# batched figure and loupe's, in units/s.
#
# Runs on the GPU machine from the repository root, with the release binary built here
# and carried along, plus two ignored folders prepared as docs/benchmarks.md says:
#   .whl/   torch-lucent 0.1.8, kornia 0.4.1 and decorator wheels
#   .peer/  ../shared/bench/*.py
set -euo pipefail
cd "$(dirname "$0")/.."
UNITS=${UNITS:-256}
STEPS=${STEPS:-512}
WORK=${OUT:-$(mktemp -d)}
SITE=/tmp/loupe-bench-site
export LD_LIBRARY_PATH="$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib:${LD_LIBRARY_PATH:-}"
python3 -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

PYTHONPATH=$SITE python3 tools/export.py --model lucent:inceptionv1 --layers mixed4a \
  --preprocess inceptionv1 --input-size 224 --out "$WORK/inceptionv1.pt"

echo "== loupe (fp32), mixed4a, $UNITS units, $STEPS steps"
target/release/loupe render --model "$WORK/inceptionv1.pt" --out "$WORK/atlas" --layers mixed4a \
  --units "0..$UNITS" --techniques channel --steps "$STEPS" --size 128 --input-size 224 \
  --batch "$UNITS" --device "${DEVICE:-cuda:0}" | tee "$WORK/loupe.txt"

echo "== lucent, the same work"
PYTHONPATH=$SITE STEPS=$STEPS BATCHES=$UNITS OUT=$WORK python3 .peer/lucent_anchor.py | tee "$WORK/lucent.txt"
