#!/usr/bin/env bash
# Checks the Helm chart helm/loupe offline (`make test` runs it; DEVELOPERS.md):
# - helm lint with the default values and with each example;
# - helm template of the default values, the GPU example and a few variants, validated
#   with kubernetes-validate --strict against the Kubernetes API schemas (an unknown
#   field or a wrong type fails) and with yamllint;
# - the monitoring example (ServiceMonitor, KEDA ScaledObject): the same, except that
#   kubernetes-validate has no schemas for those CRD kinds and can only skip them;
# - values the chart must refuse: helm lint / helm template must fail, naming the mistake.
# Installs its tools first (tools/setup-k8s-tools.sh, idempotent). Exits non-zero on the
# first failure, saying what failed.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup-k8s-tools.sh >/dev/null 2>&1 || tools/setup-k8s-tools.sh

BIN=$PWD/.tools/bin
HELM=$BIN/helm
CHART=helm/loupe
EX=helm/examples
RELEASE=vision
K8S_VERSION=1.31.0   # the oldest Kubernetes the chart is checked against (Chart.yaml: >=1.27)
# The default values leave s3.bucket empty on purpose (the schema requires it), so the
# default render names a bucket here.
DEFAULT_SET=(--set s3.bucket=example-atlases)

# Rendered manifests: `---` separators, long lines (image names, queries) and sequences
# that toYaml writes unindented are Helm's, not ours; the rest is yamllint's default.
YAMLLINT_RENDERED='{extends: default, rules: {line-length: disable, document-start: disable, comments: {min-spaces-from-content: 1}, comments-indentation: disable, indentation: {spaces: consistent, indent-sequences: whatever}, truthy: {check-keys: false}}}'
# Hand-written YAML (values, examples): flow mappings like {cpu: 1, memory: 2Gi} allowed.
YAMLLINT_SOURCES='{extends: default, rules: {line-length: {max: 100}, document-start: disable, comments: {min-spaces-from-content: 1}, braces: {max-spaces-inside: 1}, truthy: {check-keys: false}}}'

OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
passed=0
ok() { echo "ok   $*"; passed=$((passed + 1)); }
die() { echo "FAIL $*" >&2; exit 1; }

run_or_die() { # description, command...: runs the command; on failure prints its output.
  local what=$1; shift
  if ! "$@" >"$OUT/log" 2>&1; then
    cat "$OUT/log" >&2
    die "$what"
  fi
}

# A render that must be accepted: lint, template, kubernetes-validate --strict, yamllint.
# $1 name, $2 "crds" if the render may hold the CRD kinds, then helm arguments.
check_render() {
  local name=$1 crds=$2; shift 2
  run_or_die "helm lint ($name)" "$HELM" lint --strict "$CHART" "$@"
  ok "helm lint --strict ($name)"
  run_or_die "helm template ($name)" "$HELM" template "$RELEASE" "$CHART" --namespace loupe "$@"
  cp "$OUT/log" "$OUT/$name.yaml"
  run_or_die "kubernetes-validate --strict ($name)" \
    "$BIN/kubernetes-validate" --quiet --strict --kubernetes-version "$K8S_VERSION" "$OUT/$name.yaml"
  # kubernetes-validate warns, without failing, about kinds it has no schema for.
  local unknown
  unknown=$(grep "Couldn't find schema" "$OUT/log" | sed -E 's/.*for kind ([A-Za-z]+) with api version ([^ ]+) .*/\1 \2/' | sort -u || true)
  if [ "$crds" = crds ]; then
    local expected
    expected=$(grep -E '^kind: (ServiceMonitor|ScaledObject)$' "$OUT/$name.yaml" | wc -l)
    [ "$expected" = 2 ] || die "$name: expected a ServiceMonitor and a ScaledObject in the render"
    [ "$unknown" = "$(printf 'ScaledObject keda.sh/v1alpha1\nServiceMonitor monitoring.coreos.com/v1')" ] \
      || die "$name: kinds without a schema other than the two CRDs: $unknown"
    ok "kubernetes-validate --strict $K8S_VERSION ($name; ServiceMonitor and ScaledObject skipped: CRDs)"
  else
    [ -z "$unknown" ] || die "$name: kinds kubernetes-validate does not know: $unknown"
    ok "kubernetes-validate --strict $K8S_VERSION ($name)"
  fi
  run_or_die "yamllint ($name)" "$BIN/yamllint" -s -d "$YAMLLINT_RENDERED" "$OUT/$name.yaml"
  ok "yamllint ($name render)"
}

# Values that must be refused, naming the mistake. $1 name; $2 "schema" for what
# values.schema.json refuses (helm lint, template, install and upgrade all check it) or
# "template" for the chart's cross-field checks (`fail` in templates/_helpers.tpl:
# helm template, install and upgrade stop on them; helm lint only logs them at INFO
# level, by Helm's design); then helm arguments, then --, then the texts the error must
# contain.
check_refused() {
  local name=$1 kind=$2; shift 2
  local args=()
  while [ "$1" != -- ]; do args+=("$1"); shift; done
  shift
  local cmds=(template)
  [ "$kind" = schema ] && cmds=(lint template)
  local cmd want
  for cmd in "${cmds[@]}"; do
    if [ "$cmd" = lint ]; then
      "$HELM" lint "$CHART" "${args[@]}" >"$OUT/log" 2>&1 && die "helm lint accepted $name"
    else
      "$HELM" template "$RELEASE" "$CHART" "${args[@]}" >"$OUT/log" 2>&1 && die "helm template accepted $name"
    fi
    for want in "$@"; do
      grep -qF -- "$want" "$OUT/log" || { cat "$OUT/log" >&2; die "helm $cmd refused $name without naming '$want'"; }
    done
  done
  ok "refused: $name (helm $(IFS=/; echo "${cmds[*]}") name: $*)"
}

"$HELM" version --short | sed 's/^/helm /'

run_or_die "yamllint (values and examples)" "$BIN/yamllint" -s -d "$YAMLLINT_SOURCES" \
  "$CHART/Chart.yaml" "$CHART/values.yaml" "$EX"/*.yaml
python3 -c 'import json,sys; json.load(open(sys.argv[1]))' "$CHART/values.schema.json" \
  || die "values.schema.json is not valid JSON"
ok "yamllint (Chart.yaml, values.yaml, examples); values.schema.json parses"

check_render default nocrds "${DEFAULT_SET[@]}"
check_render gpu nocrds -f "$EX/gpu-values.yaml"
check_render monitoring crds -f "$EX/gpu-values.yaml" -f "$EX/monitoring-values.yaml"
# Variants the examples do not cover.
check_render cpu-memory-trial nocrds "${DEFAULT_SET[@]}" --set worker.gpus=0 --set redis.mode=none \
  --set auth.insecureNoAuth=true
check_render external-redis-ha nocrds "${DEFAULT_SET[@]}" --set redis.mode=external \
  --set-json 'coordinator.networkPolicy.clients=[{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"ml"}}}]' \
  --set-json 'coordinator.networkPolicy.metricsScrapers=[{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"monitoring"}}}]' \
  --set redis.external.existingSecret=loupe-redis --set coordinator.replicas=2 \
  --set s3.existingSecret=loupe-s3 --set s3.endpoint=https://minio.example.com --set s3.forcePathStyle=true \
  --set tls.enabled=true --set tls.existingSecret=loupe-tls --set tls.serverName=coordinator.loupe.example

# What the renders must say (the contract between the chart and the binaries).
expect() { # name, fixed text
  grep -qF -- "$2" "$OUT/$1.yaml" || die "$1 render lacks: $2"
}
expect default 'value: "redis://vision-loupe-redis:6379/0"'
expect default 'value: "s3://example-atlases/atlases"'
expect default 'value: "s3://example-atlases"'   # LOUPE_INPUT_PREFIX: the bucket by default
expect default 'value: "http://vision-loupe-coordinator:7600"'
expect default 'service: loupe.v1.Jobs'
expect default 'nvidia.com/gpu: 1'
expect default 'value: "cuda:0"'
expect gpu 'value: "https://vision-loupe-coordinator:7600"'
expect gpu 'value: /etc/loupe/tls/ca.crt'
expect gpu 'value: /etc/loupe/tls/tls.key'
expect gpu 'value: /etc/loupe/worker-token/token'
expect gpu 'path: /readyz'
expect gpu 'eks.amazonaws.com/role-arn: arn:aws:iam::123456789012:role/loupe-atlases'
grep -q 'grpc:' "$OUT/gpu.yaml" && die "gpu render (TLS on) uses gRPC probes, which cannot speak TLS"
expect cpu-memory-trial 'value: memory'
expect cpu-memory-trial 'value: "cpu"'
expect cpu-memory-trial 'type: Recreate'
expect cpu-memory-trial 'name: LOUPE_INSECURE_NO_AUTH'
grep -q 'kind: Secret' "$OUT/cpu-memory-trial.yaml" && die "the insecureNoAuth render generates token Secrets"
grep -q 'nvidia.com/gpu' "$OUT/cpu-memory-trial.yaml" && die "cpu render asks for a GPU"
expect external-redis-ha 'name: loupe-redis'
expect external-redis-ha 'kind: PodDisruptionBudget'
expect external-redis-ha 'value: "1"'
expect external-redis-ha 'value: "coordinator.loupe.example"'
grep -q 'kind: StatefulSet' "$OUT/external-redis-ha.yaml" && die "external-redis render bundles Redis"
expect monitoring 'loupe_tasks{state=~\"queued|leased\"'
grep -A3 'name: vision-loupe-worker$' "$OUT/monitoring.yaml" | grep -q 'replicas:' && die "KEDA render still sets worker replicas"
ok "renders carry the env, probes and objects the binaries and docs expect"

# Credentials and reachability, read from the parsed renders: who mounts which token
# Secret, which Secrets the chart generates, and what the NetworkPolicies admit.
run_or_die "credentials and NetworkPolicies" .tools/venv/bin/python tools/check-chart-security.py "$OUT"
cat "$OUT/log"
ok "default: both tokens generated, the user token only in the coordinator; given Secrets used; NetworkPolicies admit only what values allow"

# Every LOUPE_* variable the chart sets must be one the binaries read (a clap `env = ...`
# or a std::env lookup in their sources), so a renamed flag cannot silently go unread.
for var in $(cat "$OUT"/*.yaml | sed -nE 's/^ *- name: (LOUPE_[A-Z0-9_]+)$/\1/p' | sort -u); do
  grep -rqF "\"$var\"" coordinator/src worker/src core/src cli/src \
    || die "the chart sets $var, which no binary's source mentions"
done
ok "every LOUPE_* variable the chart sets is read by the binaries"

check_refused bad-values.yaml schema -f "$EX/bad-values.yaml" -- "/worker/gpus" "workerz"
check_refused "no s3.bucket" schema -- "/s3/bucket"
check_refused "coordinator.replicas=2 with redis.mode=none" template "${DEFAULT_SET[@]}" \
  --set coordinator.replicas=2 --set redis.mode=none -- "coordinator.replicas > 1 needs redis.mode"
check_refused "tls.enabled without a Secret" template "${DEFAULT_SET[@]}" --set tls.enabled=true -- "tls.enabled needs tls.existingSecret"
check_refused "worker.device cuda:0 with no GPU" template "${DEFAULT_SET[@]}" --set worker.gpus=0 \
  --set worker.device=cuda:0 -- "needs worker.gpus >= 1"
check_refused "redis.mode=external without a URL" template "${DEFAULT_SET[@]}" --set redis.mode=external -- \
  "redis.mode external needs"
check_refused "one Secret key for both tokens" template "${DEFAULT_SET[@]}" \
  --set auth.user.existingSecret=loupe --set auth.worker.existingSecret=loupe -- "auth.user and auth.worker name the same Secret key"
check_refused "insecureNoAuth with a token Secret" template "${DEFAULT_SET[@]}" --set auth.insecureNoAuth=true \
  --set auth.user.existingSecret=loupe-user -- "auth.insecureNoAuth serves without tokens"
check_refused "the old single auth.existingSecret" schema "${DEFAULT_SET[@]}" --set auth.existingSecret=loupe-token -- "existingSecret"
check_refused "worker.device gpu" schema "${DEFAULT_SET[@]}" --set worker.device=gpu -- "/worker/device"
check_refused "a local input prefix" schema "${DEFAULT_SET[@]}" --set 's3.inputPrefixes={/srv/models}' -- "/s3/inputPrefixes/0"

echo "chart: $passed passed, 0 failed"
