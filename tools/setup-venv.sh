#!/usr/bin/env bash
# Creates the project-local Python venv that provides libtorch (for the tch build and at
# run time), torchvision (for tools/export.py), and the dataframe libraries that
# tests/python/test_stats_parquet.py reads stats.parquet with. Idempotent: a venv that
# already has the pinned torch is left alone, apart from installing missing pinned
# dataframe libraries.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=2.11.0
TORCHVISION_VERSION=0.26.0
PY=${PYTHON:-python3}
# Readers of layers/<layer>/stats.parquet that the Python tests check it against, and
# the DevTools client of the viewer's browser tests.
DATA_PACKAGES=(pandas==3.1.1 pyarrow==26.0.1 polars==2.1.0 duckdb==2.0.1 websocket-client==1.8.0)
data_packages_missing() {
  .venv/bin/python - "${DATA_PACKAGES[@]}" <<'PYEOF'
import sys
from importlib.metadata import PackageNotFoundError, version
def have(spec):
    name, want = spec.split("==")
    try:
        return version(name) == want
    except PackageNotFoundError:
        return False
sys.exit(0 if not all(have(s) for s in sys.argv[1:]) else 1)
PYEOF
}
link_libtorch() {
  # tch's build and the binaries' rpath find libtorch at .venv/libtorch (see .cargo/config.toml).
  ln -sfn "$(.venv/bin/python -c 'import torch,os;print(os.path.dirname(torch.__file__))')" .venv/libtorch
}
if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch,torchvision,sys; sys.exit(0 if torch.__version__.split('+')[0]=='$TORCH_VERSION' else 1)" 2>/dev/null; then
  if data_packages_missing; then
    .venv/bin/python -m pip install -q "${DATA_PACKAGES[@]}"
  fi
  link_libtorch
  exit 0
fi
echo "setting up .venv with torch $TORCH_VERSION (about 4.6 GB, a minute or two)" >&2
"$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" numpy pytest "${DATA_PACKAGES[@]}"
link_libtorch
