{{/* Names and labels. */}}
{{- define "cspine.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "cspine.fullname" -}}
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

{{/* Labels that select nothing; pod templates add cspine.selectorLabels to these. */}}
{{- define "cspine.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: cspine-triage
{{- end }}

{{- define "cspine.labels" -}}
{{ include "cspine.commonLabels" . }}
app.kubernetes.io/name: {{ include "cspine.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Selector labels of one component: include with (dict "ctx" $ "component" "scp"). */}}
{{- define "cspine.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cspine.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "cspine.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "cspine.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "cspine.secretName" -}}
{{- default (printf "%s-secrets" (include "cspine.fullname" .)) .Values.secrets.existingSecret }}
{{- end }}

{{- define "cspine.claimName" -}}
{{- default (printf "%s-data" (include "cspine.fullname" .)) .Values.persistence.existingClaim }}
{{- end }}

{{- define "cspine.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "cspine.gpuImage" -}}
{{- printf "%s:%s" .Values.image.gpuRepository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
TRIAGE_DATABASE_URL without the password (the password travels as PGPASSWORD, which libpq
reads), so it may live in a ConfigMap and needs no escaping.
*/}}
{{- define "cspine.databaseUrl" -}}
{{- $db := .Values.externalDatabase -}}
{{- printf "postgresql+psycopg://%s@%s:%d/%s?sslmode=%s" ($db.user | urlquery) (required "externalDatabase.host is required" $db.host) (int $db.port) ($db.database | urlquery) $db.sslmode }}
{{- end }}

{{/* TRIAGE_BROKER_URL, password percent-encoded (urlquery writes a space as "+"). */}}
{{- define "cspine.brokerUrl" -}}
{{- $r := .Values.externalRedis -}}
{{- $auth := "" -}}
{{- if $r.password }}{{ $auth = printf ":%s@" ($r.password | urlquery | replace "+" "%20") }}{{ end -}}
{{- printf "%s://%s%s:%d/%d" (ternary "rediss" "redis" $r.tls) $auth (required "externalRedis.host is required" $r.host) (int $r.port) (int $r.db) }}
{{- end }}

{{/*
Settings map -> env entries TRIAGE_<NAME>. Strings as they are; numbers, booleans, lists and
maps as JSON (toString would write 1048576 as "1.048576e+06"); nulls left out.
*/}}
{{- define "cspine.settingsEnv" -}}
{{- range $name, $value := . }}
{{- if not (kindIs "invalid" $value) }}
- name: {{ printf "TRIAGE_%s" (upper $name) }}
  value: {{ ternary $value (toJson $value) (kindIs "string" $value) | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* Environment every triage container gets besides the ConfigMap. */}}
{{- define "cspine.secretEnv" -}}
- name: TRIAGE_SECRET_KEY
  valueFrom:
    secretKeyRef: {name: {{ include "cspine.secretName" . }}, key: secret-key}
- name: TRIAGE_BROKER_URL
  valueFrom:
    secretKeyRef: {name: {{ include "cspine.secretName" . }}, key: broker-url}
- name: PGPASSWORD
  valueFrom:
    secretKeyRef: {name: {{ include "cspine.secretName" . }}, key: database-password, optional: true}
{{- end }}

{{/* Roll pods when the settings or secrets change. */}}
{{- define "cspine.configChecksums" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
checksum/secret: {{ include (print .Template.BasePath "/secret.yaml") . | sha256sum }}
{{- end }}

{{- define "cspine.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext }}
{{- end }}

{{- define "cspine.containerSecurityContext" -}}
{{- toYaml .Values.securityContext }}
{{- end }}

{{/* /data (shared PVC) and /tmp (emptyDir) volumes; include with the root context. */}}
{{- define "cspine.volumes" -}}
- name: data
  persistentVolumeClaim:
    claimName: {{ include "cspine.claimName" . }}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
{{- end }}

{{- define "cspine.volumeMounts" -}}
- {name: data, mountPath: /data}
- {name: tmp, mountPath: /tmp}
{{- end }}

{{/* Fail early on values the chart cannot honour. */}}
{{- define "cspine.validate" -}}
{{- range $reserved := list "data_dir" "database_url" "broker_url" "secret_key" "web_host" "web_port" "dicom_port" }}
{{- if hasKey $.Values.settings $reserved }}
{{- fail (printf "settings.%s is set by the chart; remove it from settings" $reserved) }}
{{- end }}
{{- end }}
{{- if and (not .Values.secrets.existingSecret) (not .Values.secrets.secretKey) }}
{{- fail "set secrets.secretKey (web session key) or secrets.existingSecret" }}
{{- end }}
{{- if and .Values.scp.tls.enabled (not .Values.scp.tls.secretName) }}
{{- fail "scp.tls.enabled needs scp.tls.secretName" }}
{{- end }}
{{- end }}
