{{/* Names, labels and the `lorabay serve` command line, shared by every template. */}}

{{- define "lorabay.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name; 63 characters at most (DNS label). */}}
{{- define "lorabay.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "lorabay.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lorabay.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lorabay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "lorabay.labels" -}}
helm.sh/chart: {{ include "lorabay.chart" . }}
{{ include "lorabay.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: server
app.kubernetes.io/part-of: lorabay
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "lorabay.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lorabay.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The GPU image carries a "-gpu" tag suffix (Dockerfile.gpu); the CPU image none. */}}
{{- define "lorabay.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s%s" .Chart.AppVersion (ternary "-gpu" "" .Values.gpu.enabled)) }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{- define "lorabay.apiKeysSecretName" -}}
{{- .Values.apiKeys.secretName | default (printf "%s-api-keys" (include "lorabay.fullname" .)) }}
{{- end }}

{{/* Where the API keys Secret is mounted; the file passed to --api-keys lies inside. */}}
{{- define "lorabay.apiKeysDir" -}}
/etc/lorabay/api-keys
{{- end }}

{{- define "lorabay.baseFromPvc" -}}
{{- if .Values.base.pvc.claimName }}true{{ end }}
{{- end }}

{{/* --base: a folder on the base PVC, or the Hugging Face id as given. */}}
{{- define "lorabay.basePath" -}}
{{- if include "lorabay.baseFromPvc" . }}
{{- printf "%s/%s" (trimSuffix "/" .Values.base.pvc.mountPath) (trimPrefix "/" .Values.base.model) }}
{{- else }}
{{- .Values.base.model }}
{{- end }}
{{- end }}

{{- define "lorabay.peerSecretName" -}}
{{- .Values.peers.secret.name | default (printf "%s-peers" (include "lorabay.fullname" .)) }}
{{- end }}

{{/* Where the trust policy's ConfigMap is mounted; --trust names the policy inside. */}}
{{- define "lorabay.trustDir" -}}
/etc/lorabay/trust
{{- end }}

{{/* Where the peers' Secret is mounted; the file passed to --peer-secret-file lies inside. */}}
{{- define "lorabay.peerSecretDir" -}}
/etc/lorabay/peers
{{- end }}

{{- define "lorabay.cachePvcName" -}}
{{- .Values.cache.persistence.existingClaim | default (printf "%s-cache" (include "lorabay.fullname" .)) }}
{{- end }}

{{/*
The arguments of `lorabay serve`, as a JSON list. Every flag here is an option of the
click command lorabay.cli.serve:serve; tests/deploy parses this list with it.
*/}}
{{- define "lorabay.serveArgs" -}}
{{- $v := .Values }}
{{- $args := list "--base" (include "lorabay.basePath" .) }}
{{- with $v.base.servedName }}
{{- $args = concat $args (list "--served-name" .) }}
{{- end }}
{{- $args = concat $args (list "--quantization" $v.quantization "--dtype" $v.dtype) }}
{{- with $v.registry.url }}
{{- $args = concat $args (list "--registry" .) }}
{{- end }}
{{- $args = concat $args (list "--host" $v.gateway.bindAddress "--port" (toString (int $v.gateway.port))) }}
{{- if and $v.apiKeys.enabled $v.insecure }}
{{- fail "insecure=true turns API keys off: set apiKeys.enabled=false with it, or drop insecure" }}
{{- else if $v.apiKeys.enabled }}
{{- $args = concat $args (list "--api-keys" (printf "%s/%s" (include "lorabay.apiKeysDir" .) $v.apiKeys.key)) }}
{{- else if $v.insecure }}
{{- $args = concat $args (list "--insecure") }}
{{- else }}
{{- fail "apiKeys.enabled=false needs insecure=true: without API keys anyone who reaches the Service may use every adapter (or keep apiKeys.enabled and create the Secret)" }}
{{- end }}
{{- if not (kindIs "invalid" $v.engine.maxLoras) }}
{{- $args = concat $args (list "--max-loras" (toString (int $v.engine.maxLoras))) }}
{{- end }}
{{- if not (kindIs "invalid" $v.engine.maxCpuLoras) }}
{{- $args = concat $args (list "--max-cpu-loras" (toString (int $v.engine.maxCpuLoras))) }}
{{- end }}
{{- $args = concat $args (list "--max-lora-rank" (toString (int $v.engine.maxLoraRank))) }}
{{- if not (kindIs "invalid" $v.engine.maxLoaded) }}
{{- $args = concat $args (list "--max-loaded" (toString (int $v.engine.maxLoaded))) }}
{{- end }}
{{- if not (kindIs "invalid" $v.maxModelLen) }}
{{- $args = concat $args (list "--max-model-len" (toString (int $v.maxModelLen))) }}
{{- end }}
{{- if not (kindIs "invalid" $v.engine.maxNumSeqs) }}
{{- $args = concat $args (list "--max-num-seqs" (toString (int $v.engine.maxNumSeqs))) }}
{{- end }}
{{- range $v.engine.args }}
{{- $args = concat $args (list (printf "--engine-arg=%s" .)) }}
{{- end }}
{{- if not (kindIs "invalid" $v.gateway.maxBodyBytes) }}
{{- $args = concat $args (list "--max-body-bytes" (toString (int $v.gateway.maxBodyBytes))) }}
{{- end }}
{{- if not (kindIs "invalid" $v.gateway.maxN) }}
{{- $args = concat $args (list "--max-n" (toString (int $v.gateway.maxN))) }}
{{- end }}
{{- if not (kindIs "invalid" $v.gateway.maxBestOf) }}
{{- $args = concat $args (list "--max-best-of" (toString (int $v.gateway.maxBestOf))) }}
{{- end }}
{{- if not (kindIs "invalid" $v.gateway.maxSearchSamples) }}
{{- $args = concat $args (list "--max-search-samples" (toString (int $v.gateway.maxSearchSamples))) }}
{{- end }}
{{- if not (kindIs "invalid" $v.gateway.maxSearchSteps) }}
{{- $args = concat $args (list "--max-search-steps" (toString (int $v.gateway.maxSearchSteps))) }}
{{- end }}
{{- if eq (int $v.metrics.port) (int $v.gateway.port) }}
{{- fail "metrics.port must differ from gateway.port: metrics are served on a port of their own" }}
{{- end }}
{{- $args = concat $args (list "--metrics-host" $v.gateway.bindAddress "--metrics-port" (toString (int $v.metrics.port))) }}
{{- /* the engine gives up (with its own error in the log) one probe period before the kubelet would */}}
{{- $startup := $v.probes.startup }}
{{- $args = concat $args (list "--engine-start-timeout" (toString (max 60 (sub (int $startup.budgetSeconds) (int $startup.periodSeconds))))) }}
{{- if $v.peers.enabled }}
{{- $args = concat $args (list "--peers" (printf "dns:%s-peers.%s.svc.%s:%d" (include "lorabay.fullname" .) .Release.Namespace ($v.peers.clusterDomain | default "cluster.local") (int $v.gateway.port))) }}
{{- if not (kindIs "invalid" $v.peers.spillAt) }}
{{- $args = concat $args (list "--spill-at" (toString (int $v.peers.spillAt))) }}
{{- end }}
{{- $args = concat $args (list "--peer-secret-file" (printf "%s/%s" (include "lorabay.peerSecretDir" .) $v.peers.secret.key)) }}
{{- end }}
{{- if $v.trust.configMap }}
{{- $args = concat $args (list "--trust" (printf "%s/%s" (include "lorabay.trustDir" .) $v.trust.key)) }}
{{- end }}
{{- if $v.gateway.jsonLogs }}
{{- $args = concat $args (list "--json-logs") }}
{{- end }}
{{- $args = concat $args $v.extraArgs }}
{{- toJson $args }}
{{- end }}
