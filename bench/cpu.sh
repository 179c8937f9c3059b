#!/usr/bin/env bash
# CPU speed of loupe on the demo model: units/s (one unit = one image optimised, 512
# steps). A benchmark, not a test: it prints figures. Run from the repository root after
# `make build`:   bench/cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
LOUPE=${LOUPE:-target/release/loupe}
STEPS=${STEPS:-512}
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
for layer in conv1 conv3 logits; do
  out=$(mktemp -d)
  units=$( [ $layer = logits ] && echo 0..10 || echo 0..16 )
  line=$($LOUPE render --model models/demo/demo.pt --out "$out" --layers $layer --units $units \
         --techniques channel --steps "$STEPS" --size 64 --batch 64 --device cpu 2>/dev/null | tail -1)
  rate=${line##*rendered }; echo "demo $layer, units $units, $STEPS steps, 64 px: ${rate%)}"
  rm -rf "$out"
done
