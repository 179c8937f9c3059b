#!/usr/bin/env bash
# Which models tools/export.py exports, and loupe's CPU time per unit on each: a benchmark
# (it prints a markdown table for docs/models.md), not a test. Every model gets random
# weights (--weights none), so nothing is downloaded. Per model: export with --layers all
# (ok or the error; whether it has tap, or the fallback's reason; the layer count), then
# `loupe render` of units 0..4 of its middle layer, 16 steps at 64 px, on the CPU.
# Run from the repository root after `make build`:
#   bench/models.sh                      # the list below
#   bench/models.sh timm:resnet50 ...    # these models
set -uo pipefail
cd "$(dirname "$0")/.."
LOUPE=${LOUPE:-target/release/loupe}
PY=${PY:-.venv/bin/python}
MODELS=("$@")
if [ ${#MODELS[@]} -eq 0 ]; then
  MODELS=(
    timm:resnet50 timm:convnext_tiny timm:efficientnet_b0 timm:regnety_016 timm:mobilenetv3_large_100
    timm:vit_base_patch16_224 timm:deit_small_patch16_224 timm:deit_tiny_distilled_patch16_224
    timm:vit_small_patch14_reg4_dinov2 timm:beit_base_patch16_224 timm:swin_tiny_patch4_window7_224
    timm:maxvit_tiny_tf_224 timm:coatnet_0_rw_224 open_clip:ViT-B-32 open_clip:RN50
  )
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, $(date -u +%Y-%m-%d)" >&2
echo "| model | export | tap | layers | layouts | rendered layer | s/unit |"
echo "|---|---|---|---|---|---|---|"
for model in "${MODELS[@]}"; do
  pt="$work/$(echo "$model" | tr ':/' '__').pt"
  if ! "$PY" tools/export.py --model "$model" --weights none --out "$pt" >"$work/export.out" 2>"$work/export.err"; then
    why=$(grep -m1 'error:' "$work/export.err" | sed 's/^export.py: error: //' | cut -c1-120)
    echo "| \`$model\` | fails: ${why:-see stderr} | | | | | |"
    continue
  fi
  fallback=$(grep -m1 -o 'torch.jit.script failed ([^)]*)\|torch.fx cannot trace[^;]*' "$work/export.err" | cut -c1-100)
  tap=$([ -z "$fallback" ] && echo yes || echo "no: $fallback")
  n=$(wc -l <"$work/export.out")
  layouts=$(cut -f3 "$work/export.out" | sed 's/(.*//' | sort | uniq -c | awk '{printf "%s%s %s", sep, $1, $2; sep=", "}')
  layer=$(sed -n "$(( (n + 1) / 2 ))p" "$work/export.out" | cut -f1)
  start=$(date +%s.%N)
  if "$LOUPE" render --model "$pt" --out "$work/atlas" --device cpu --size 64 --steps 16 --techniques channel \
       --layers "$layer" --units 0..4 >/dev/null 2>"$work/render.err"; then
    per_unit=$(echo "($(date +%s.%N) - $start) / 4" | bc -l | xargs printf '%.1f')
  else
    per_unit="render failed: $(tail -1 "$work/render.err" | cut -c1-80)"
  fi
  echo "| \`$model\` | ok | $tap | $n | $layouts | \`$layer\` | $per_unit |"
  rm -rf "$work/atlas" "$pt" "${pt%.pt}.json"
done
