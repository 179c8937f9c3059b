#!/usr/bin/env bash
# Images per second through the dataset pass (maps and reduces), on the CPU for the demo
# model by default, with and without the connections between consecutive layers. A
# benchmark, not a test: it prints figures.
#
#   bench/stats.sh                      # demo model, 2,400 images, all layers, all units
#   MODEL=x.pt LAYERS=a,b UNITS=0..16 INPUT=224 DEVICE=cuda:0 IMAGES=5000 bench/stats.sh
#   CONNECTIONS=0 bench/stats.sh        # the statistics pass only
#
# It makes a dataset of IMAGES random-colour JPEGs (INPUT px, with .venv's Pillow),
# renders UNITS of every layer for one step without --dataset, with it and
# --no-connections (the statistics pass alone), and with it (statistics and connections,
# unless CONNECTIONS=0), and counts the differences as the passes' times. Run from the repository root after
# `make build`.
set -euo pipefail
cd "$(dirname "$0")/.."
LOUPE=${LOUPE:-target/release/loupe}
MODEL=${MODEL:-models/demo/demo.pt}
LAYERS=${LAYERS:-all}
UNITS=${UNITS:-all}
INPUT=${INPUT:-64}
IMAGES=${IMAGES:-2400}
DEVICE=${DEVICE:-cpu}
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

"$PY" - "$WORK/dataset" "$IMAGES" "$INPUT" <<'EOF'
import pathlib, sys
import numpy as np
from PIL import Image
out, n, size = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
out.mkdir(parents=True)
rng = np.random.default_rng(0)
for i in range(n):
    base = rng.uniform(0, 255, size=3)
    img = np.clip(base + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(out / f"{i:06d}.jpg", quality=90)
EOF

run() {
  local start end
  start=$(date +%s.%N)
  "$LOUPE" render --model "$MODEL" --out "$WORK/$1" --layers "$LAYERS" --units "$UNITS" --techniques channel \
    --steps 1 --size 16 --input-size "$INPUT" --device "$DEVICE" "${@:2}" >/dev/null 2>&1
  end=$(date +%s.%N)
  "$PY" -c "print(round($end - $start, 2))"
}
base=$(run plain)
stats=$(run stats --dataset "$WORK/dataset" --images-per-shard 400 --no-connections)
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; device $DEVICE"
echo "model $MODEL, layers $LAYERS, units $UNITS, input $INPUT px, $IMAGES images"
echo "without the dataset: ${base} s; statistics only: ${stats} s"
echo "statistics pass: $("$PY" -c "print(round($IMAGES / ($stats - $base), 1))") images/s"
if [ "${CONNECTIONS:-1}" != 0 ]; then
  with=$(run connections --dataset "$WORK/dataset" --images-per-shard 400)
  echo "statistics and connections: ${with} s"
  echo "with connections: $("$PY" -c "print(round($IMAGES / ($with - $base), 1))") images/s, $("$PY" -c "print(round(($with - $base) / ($stats - $base), 2))") x the statistics pass's time"
fi
