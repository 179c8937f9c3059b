#!/usr/bin/env bash
# Which atlas files change with the CPU's kernels: renders a small atlas of the demo model
# with a dataset (conv1, conv3, logits; 6 units; channel, neuron, negative; 48 steps;
# 32 px) with this CPU's own kernels, then with libtorch, oneDNN and MKL forced to the
# kernels of lesser CPUs (AVX2, none), and on one core; prints, per precision and variant,
# how many PNGs, stats.parquet, examples.json and crops differ from the first render.
# docs/techniques.md "Determinism" reports its figures. Run from the repository root after
# `make build`, on a machine with AVX-512 for all three kernel paths (about 5 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${OUT:-$(mktemp -d)}
ARGS=(--model models/demo/demo.pt --size 32 --steps 48 --layers conv1,conv3,logits --units 0..6
      --device cpu --dataset tests/fixtures/dataset/images --examples 4)
render() { # name precision [env or command prefix...]
  local name=$1 precision=$2; shift 2
  env "$@" target/release/loupe render "${ARGS[@]}" --precision "$precision" --out "$WORK/$name" > "$WORK/$name.log" 2>&1
  (cd "$WORK/$name" && find . -type f \( -name '*.png' -o -name '*.parquet' -o -name 'examples.json' -o -name '*.jpg' \) | sort | xargs sha256sum) > "$WORK/$name.sums"
}
for p in fp32 bf16; do
  render "$p-native" "$p"
  render "$p-avx2" "$p" ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
  render "$p-nosimd" "$p" ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2
  render "$p-onecore" "$p" taskset -c 0
  for v in avx2 nosimd onecore; do
    for kind in png parquet examples.json jpg; do
      a=$(grep "$kind\$" "$WORK/$p-native.sums" || true); b=$(grep "$kind\$" "$WORK/$p-$v.sums" || true)
      echo "$p $v: $(diff <(echo "$a") <(echo "$b") | grep -c '^<' || true) of $(echo "$a" | grep -c . || true) $kind differ"
    done
  done
done
