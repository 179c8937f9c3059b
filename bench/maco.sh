#!/usr/bin/env bash
# MACO against the demo model's class logits (docs/techniques.md "MACO"): renders logits
# 0..8 (channel, 256 steps, 64 px, seed 0) under each MACO setting below and scores the
# images with the semantic checks (bench/class-check.py). A benchmark that prints figures,
# not a test; about 15 s a setting on 2 cores.
# Run from the repository root after `make build` and `make setup-test`.
set -euo pipefail
cd "$(dirname "$0")/.."
LOUPE=${LOUPE:-target/release/loupe}
DATASET=tests/fixtures/dataset/images
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# render NAME LOUPE-FLAGS JOB-FILE-LINES
render() {
  printf '%b\n' "$3" > "$work/job.toml"
  rm -rf "$work/$1"
  "$LOUPE" render --model models/demo/demo.pt --out "$work/$1" --layers logits --units 0..8 --techniques channel \
    --steps 256 --size 64 --batch 8 --device cpu --spec "$work/job.toml" $2 > "$work/render.log" 2>&1 || { cat "$work/render.log"; exit 1; }
  echo "$1: $(.venv/bin/python bench/class-check.py "$work/$1" channel)"
}

from_dataset="--dataset $DATASET --examples 2 --no-connections --param maco --magnitude-from-dataset"
render "lucid (not MACO)" "" ""
for lr in 1.0 0.3 0.05; do
  render "1/f magnitude, lr $lr" "--param maco" "learning_rate = $lr"
  render "dataset magnitude, lr $lr" "$from_dataset" "learning_rate = $lr"
  render "dataset magnitude and colour, lr $lr" "$from_dataset --color-from-dataset" "learning_rate = $lr"
done
render "dataset magnitude and colour, lr 0.3, crops and noise" "$from_dataset --color-from-dataset" \
  'learning_rate = 0.3\n[transforms]\ncrop = { start = 0.9, end = 0.5 }\nnoise = 0.01'
