#!/usr/bin/env bash
# Creates the project-local Python venv that provides libtorch (for the tch build and at
# run time) and torchvision (for tools/export.py). Idempotent: a venv that already has
# the pinned torch is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=2.11.0
TORCHVISION_VERSION=0.26.0
PY=${PYTHON:-python3}
link_libtorch() {
  # tch's build and the binaries' rpath find libtorch at .venv/libtorch (see .cargo/config.toml).
  ln -sfn "$(.venv/bin/python -c 'import torch,os;print(os.path.dirname(torch.__file__))')" .venv/libtorch
}
if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch,torchvision,sys; sys.exit(0 if torch.__version__.split('+')[0]=='$TORCH_VERSION' else 1)" 2>/dev/null; then
  link_libtorch
  exit 0
fi
echo "setting up .venv with torch $TORCH_VERSION (about 4.6 GB, a minute or two)" >&2
"$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" numpy pytest
link_libtorch
