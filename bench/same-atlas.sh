#!/usr/bin/env bash
# Whether a change keeps the atlas byte for byte: renders one small atlas of the demo
# model with every technique (the seven, diversity at 2 images, deepdream and caricature
# from dataset images, a direction per layer), snapshots and a dataset, with this
# checkout's `loupe` and with the `loupe` of an older revision, then resumes the old atlas
# with this checkout's binary, and compares every file. Only atlas.json's `created` may
# differ; the job manifests under jobs/ are left out (each carries its job's creation
# time, and an atlas written before them has none). Usage, from the repository root
# after `make build`:
#   bench/same-atlas.sh REV            # builds REV's loupe in its own target dir (~5 min)
#   OLD_LOUPE=path bench/same-atlas.sh  # or compares with a loupe binary built already
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${OUT:-$(mktemp -d)}
if [ -z "${OLD_LOUPE:-}" ]; then
  REV=${1:?usage: bench/same-atlas.sh REV (or OLD_LOUPE=path)}
  git worktree add --detach "$WORK/old-src" "$REV" > /dev/null
  ln -s "$ROOT/.venv" "$WORK/old-src/.venv"
  (cd "$WORK/old-src" && CARGO_TARGET_DIR="$WORK/old-target" LIBTORCH="$ROOT/.venv/libtorch" cargo build --release --bin loupe)
  OLD_LOUPE=$WORK/old-target/release/loupe
  trap 'git worktree remove --force "$WORK/old-src"' EXIT
fi
IMAGES=$ROOT/tests/fixtures/dataset/images
one_hot() { python3 -c "print(', '.join(['1.0'] + ['0.0'] * ($1 - 1)))"; }
cat > "$WORK/job.toml" <<TOML
model = "$ROOT/models/demo/demo.pt"
size = 32
seed = 3
steps = 24
thresholds = [8, 16]
layers = ["conv1", "conv3"]
units = "0..3"
techniques = ["channel", "neuron", "negative", "diversity", "deepdream", "caricature", "direction"]
[diversity]
images = 2
[deepdream]
inputs = [ { name = "start", uri = "$IMAGES/mixed-00.png" } ]
[caricature]
inputs = [ { name = "dog", uri = "$IMAGES/mixed-01.png" } ]
[[directions]]
name = "first"
layer = "conv1"
vector = [$(one_hot 16)]
[[directions]]
name = "first"
layer = "conv3"
vector = [$(one_hot 32)]
TOML
render() { # binary out
  "$1" render --spec "$WORK/job.toml" --out "$2" --device cpu --dataset "$IMAGES" --examples 3 2>&1 | tail -1
}
files() { (cd "$1" && find . -type f -not -path './jobs/*' | sort); }
compare() { # a b
  local n=0 differ=0
  while read -r f; do
    n=$((n + 1))
    cmp -s "$1/$f" "$2/$f" || { differ=$((differ + 1)); echo "  differs: $f"; }
  done < <(files "$1")
  diff <(files "$1") <(files "$2") > /dev/null || echo "  the file lists differ"
  echo "  $n files compared, $differ differ"
}
echo "old: $(render "$OLD_LOUPE" "$WORK/old")"
echo "new: $(render target/release/loupe "$WORK/new")"
compare "$WORK/old" "$WORK/new"
echo "new resuming old: $(render target/release/loupe "$WORK/old")"
compare "$WORK/old" "$WORK/new"
for a in old new; do grep '"created"' "$WORK/$a/atlas.json"; done
