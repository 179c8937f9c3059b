{{/* The chart's name, overridable. */}}
{{- define "loupe.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The prefix of every object's name: the release name, followed by the chart name unless
the release name already contains it (release "vision" -> "vision-loupe",
release "loupe" -> "loupe"). Component suffixes (-coordinator, -worker, -redis) keep the
result within 63 characters because it is cut at 50.
*/}}
{{- define "loupe.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "loupe.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object; pass (dict "ctx" $ "component" "worker"). */}}
{{- define "loupe.labels" -}}
helm.sh/chart: {{ include "loupe.chart" .ctx }}
{{ include "loupe.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: loupe
{{- end -}}

{{/* Selector labels: immutable in a Deployment, so never the version. */}}
{{- define "loupe.selectorLabels" -}}
app.kubernetes.io/name: {{ include "loupe.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "loupe.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "loupe.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* An image reference from {repository, tag, digest}; tag defaults to appVersion. */}}
{{- define "loupe.image" -}}
{{- $img := .image -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $img.repository $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $img.repository (default .ctx.Chart.AppVersion $img.tag | toString) -}}
{{- end -}}
{{- end -}}

{{/* The coordinator's in-cluster gRPC URL, as workers dial it. */}}
{{- define "loupe.coordinatorURL" -}}
{{- printf "%s://%s-coordinator:%d" (ternary "https" "http" .Values.tls.enabled) (include "loupe.fullname" .) (int .Values.coordinator.service.grpcPort) -}}
{{- end -}}

{{/* The locations jobs may read from, comma-separated (LOUPE_INPUT_PREFIX): s3.inputPrefixes, else the bucket. */}}
{{- define "loupe.inputPrefixes" -}}
{{- if .Values.s3.inputPrefixes -}}
{{- join "," .Values.s3.inputPrefixes -}}
{{- else -}}
{{- printf "s3://%s" .Values.s3.bucket -}}
{{- end -}}
{{- end -}}

{{/* s3://bucket/prefix, the root every job's --out must be under. */}}
{{- define "loupe.outPrefix" -}}
{{- $prefix := trimAll "/" .Values.s3.prefix -}}
{{- if $prefix -}}
{{- printf "s3://%s/%s" .Values.s3.bucket $prefix -}}
{{- else -}}
{{- printf "s3://%s" .Values.s3.bucket -}}
{{- end -}}
{{- end -}}

{{/*
The Secret holding one credential's token, and its key: the operator's
(auth.<who>.existingSecret) or the one the chart generates. Pass
(dict "ctx" $ "who" "user") or (dict "ctx" $ "who" "worker").
*/}}
{{- define "loupe.tokenSecretName" -}}
{{- $auth := index .ctx.Values.auth .who -}}
{{- default (printf "%s-%s-token" (include "loupe.fullname" .ctx) .who) $auth.existingSecret -}}
{{- end -}}
{{- define "loupe.tokenSecretKey" -}}
{{- $auth := index .ctx.Values.auth .who -}}
{{- if $auth.existingSecret -}}{{ $auth.existingSecretKey }}{{- else -}}token{{- end -}}
{{- end -}}

{{/* A pod volume holding one credential's token as the file `token`; pass as for loupe.tokenSecretName. */}}
{{- define "loupe.tokenVolume" -}}
- name: {{ .who }}-token
  secret:
    secretName: {{ include "loupe.tokenSecretName" . }}
    defaultMode: 0440
    items:
      - key: {{ include "loupe.tokenSecretKey" . }}
        path: token
{{- end -}}

{{/* Checks across values that the JSON schema cannot express; rendered by every template that needs them. */}}
{{- define "loupe.validate" -}}
{{- if not .Values.s3.bucket -}}
{{- fail "s3.bucket is required: the bucket the atlases are written to" -}}
{{- end -}}
{{- if and (gt (int .Values.coordinator.replicas) 1) (eq .Values.redis.mode "none") -}}
{{- fail "coordinator.replicas > 1 needs redis.mode bundled or external: with redis.mode none each coordinator keeps its own in-memory state" -}}
{{- end -}}
{{- if and (eq .Values.redis.mode "external") (not .Values.redis.external.url) (not .Values.redis.external.existingSecret) -}}
{{- fail "redis.mode external needs redis.external.url or redis.external.existingSecret" -}}
{{- end -}}
{{- if and (eq .Values.redis.mode "external") .Values.redis.external.url .Values.redis.external.existingSecret -}}
{{- fail "redis.external: set url or existingSecret, not both" -}}
{{- end -}}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) -}}
{{- fail "tls.enabled needs tls.existingSecret: a kubernetes.io/tls Secret holding tls.crt, tls.key and ca.crt" -}}
{{- end -}}
{{- $user := .Values.auth.user -}}
{{- $worker := .Values.auth.worker -}}
{{- if and $user.existingSecret (eq $user.existingSecret $worker.existingSecret) (eq $user.existingSecretKey $worker.existingSecretKey) -}}
{{- fail "auth.user and auth.worker name the same Secret key: users could then act as workers; give each its own token" -}}
{{- end -}}
{{- if and .Values.auth.insecureNoAuth (or $user.existingSecret $worker.existingSecret) -}}
{{- fail "auth.insecureNoAuth serves without tokens: unset auth.user.existingSecret and auth.worker.existingSecret, or insecureNoAuth" -}}
{{- end -}}
{{- if and (eq (int .Values.worker.gpus) 0) (hasPrefix "cuda" .Values.worker.device) -}}
{{- fail (printf "worker.device %s needs worker.gpus >= 1" .Values.worker.device) -}}
{{- end -}}
{{- if and (gt (int .Values.worker.gpus) 0) (eq .Values.worker.device "cpu") -}}
{{- fail "worker.device cpu with worker.gpus >= 1 would hold GPUs it never uses: set worker.gpus 0" -}}
{{- end -}}
{{- end -}}

{{/* The worker's --device: auto means cuda:0 with a GPU (the one the device plugin gave the pod), cpu without. */}}
{{- define "loupe.workerDevice" -}}
{{- if ne .Values.worker.device "auto" -}}
{{- .Values.worker.device -}}
{{- else if gt (int .Values.worker.gpus) 0 -}}
cuda:0
{{- else -}}
cpu
{{- end -}}
{{- end -}}

{{/* The S3 settings, shared by the coordinator and the workers. */}}
{{- define "loupe.s3Env" -}}
{{- if .Values.s3.region }}
- name: AWS_REGION
  value: {{ .Values.s3.region | quote }}
{{- end }}
{{- if .Values.s3.endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ .Values.s3.endpoint | quote }}
{{- end }}
{{- if .Values.s3.forcePathStyle }}
- name: LOUPE_S3_FORCE_PATH_STYLE
  value: "1"
{{- end }}
{{- if .Values.s3.existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .Values.s3.existingSecret }}
      key: {{ .Values.s3.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.s3.existingSecret }}
      key: {{ .Values.s3.secretAccessKeyKey }}
{{- end }}
{{- end -}}

{{/* The restricted container securityContext every loupe container runs with. */}}
{{- define "loupe.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The pod securityContext of the coordinator and workers: the images' uid 10001. */}}
{{- define "loupe.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}
