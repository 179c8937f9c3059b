#!/usr/bin/env bash
# The diversity penalty against the demo model's class logits (docs/techniques.md
# "Diversity"): renders logits 0..8 with 4 diversity images each (256 steps, 64 px, seed 0)
# under each [diversity] setting below, and prints how many images no longer show their
# class and lucid's similarity of each unit's images (bench/class-check.py). A
# benchmark that prints figures, not a test; about 25 s a setting on 2 cores.
# Run from the repository root after `make build` (and `make setup-test` for PIL).
#   bench/diversity.sh                          # the settings below
#   bench/diversity.sh 'penalty = "relative"\nweight = 1.5' ...
set -euo pipefail
cd "$(dirname "$0")/.."
LOUPE=${LOUPE:-target/release/loupe}
SETTINGS=("$@")
if [ ${#SETTINGS[@]} -eq 0 ]; then
  SETTINGS=('weight = 0' 'penalty = "relative"\nweight = 1' 'penalty = "relative"\nweight = 2'
            'penalty = "relative"\nweight = 3' 'penalty = "relative"\nweight = 5' 'penalty = "lucid"\nweight = 100')
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for setting in "${SETTINGS[@]}"; do
  printf 'model = "%s/models/demo/demo.pt"\nout = "%s/atlas"\nlayers = ["logits"]\nunits = "0..8"\ntechniques = ["diversity"]\nsteps = 256\nsize = 64\nbatch = 8\n[diversity]\n%b\n' \
    "$PWD" "$work" "$setting" > "$work/job.toml"
  rm -rf "$work/atlas"
  "$LOUPE" render --spec "$work/job.toml" --device cpu > "$work/render.log" 2>&1 || { cat "$work/render.log"; exit 1; }
  echo "[diversity] $(printf '%b' "$setting" | tr '\n' ' '): $(.venv/bin/python bench/class-check.py "$work/atlas" diversity)"
done
