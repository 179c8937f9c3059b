#!/usr/bin/env bash
# Creates the project-local Python venv that provides libtorch (for the tch build and at
# run time). `make demo` needs nothing more. With --test it also installs what the tests
# and tools/export.py use: torchvision, timm, open_clip, numpy, pytest, the dataframe libraries that
# tests/python/test_stats_parquet.py reads stats.parquet with, and the DevTools client of
# the viewer's browser tests. Idempotent: a venv that already has the pinned torch is
# kept, and only missing pinned packages are installed.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=2.11.0
PY=${PYTHON:-python3}
PACKAGES=("torch==$TORCH_VERSION")
if [ "${1:-}" = --test ]; then
  PACKAGES+=(torchvision==0.26.0 timm==1.0.31 open_clip_torch==3.3.0 numpy==2.4.6 pytest==9.2.0 pandas==3.1.1 pyarrow==26.0.1 polars==2.1.0 duckdb==2.0.1 websocket-client==1.8.0)
fi
packages_missing() {
  .venv/bin/python - "${PACKAGES[@]}" <<'PYEOF'
import sys
from importlib.metadata import PackageNotFoundError, version
def have(spec):
    name, want = spec.split("==")
    try:
        return version(name).split("+")[0] == want
    except PackageNotFoundError:
        return False
sys.exit(0 if not all(have(s) for s in sys.argv[1:]) else 1)
PYEOF
}
if [ ! -x .venv/bin/python ]; then
  echo "setting up .venv with torch $TORCH_VERSION (about 4.6 GB, a minute or two)" >&2
  "$PY" -m venv .venv
fi
if packages_missing; then
  .venv/bin/python -m pip install -q --disable-pip-version-check "${PACKAGES[@]}"
fi
# tch's build and the binaries' rpath find libtorch at .venv/libtorch (see .cargo/config.toml).
# find_spec locates the package without importing torch (which would warn that numpy,
# not needed for the demo, is missing).
ln -sfn "$(.venv/bin/python -c 'import importlib.util as u; print(u.find_spec("torch").submodule_search_locations[0])')" .venv/libtorch
