{{/* Names: <release>-printrelay unless the release name already says printrelay. */}}
{{- define "printrelay.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "printrelay.fullname" -}}
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

{{/* Leaves room for the longest suffix ("-connector-state"). */}}
{{- define "printrelay.relayName" -}}
{{- include "printrelay.fullname" . | trunc 47 | trimSuffix "-" }}
{{- end }}

{{- define "printrelay.connectorName" -}}
{{- printf "%s-connector" (include "printrelay.relayName" .) }}
{{- end }}

{{- define "printrelay.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "printrelay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: printrelay
{{- end }}

{{/* Selector labels of one component: relay or connector. Usage: include "printrelay.selectorLabels" (list . "relay") */}}
{{- define "printrelay.selectorLabels" -}}
{{- $ctx := index . 0 -}}
app.kubernetes.io/name: {{ include "printrelay.name" $ctx }}
app.kubernetes.io/instance: {{ $ctx.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "printrelay.componentLabels" -}}
{{ include "printrelay.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "printrelay.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "printrelay.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "printrelay.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "printrelay.publicUrl" -}}
{{- if .Values.relay.publicUrl }}
{{- .Values.relay.publicUrl }}
{{- else if .Values.ingress.enabled }}
{{- printf "%s://%s" (ternary "https" "http" (ne .Values.ingress.tls.secretName "")) .Values.ingress.host }}
{{- end }}
{{- end }}

{{/* HOST:PORT for a listener; IPv6 bind addresses are given in brackets, e.g. [::]. */}}
{{- define "printrelay.hostport" -}}
{{- printf "%s:%d" (index . 0) (int (index . 1)) }}
{{- end }}

{{/*
A value as TOML. Helm reads every number as float64, which toToml and printf %v would write as 50.0 or
1.073741824e+09; whole numbers are written as integers so that integer settings parse.
*/}}
{{- define "printrelay.tomlValue" -}}
{{- if kindIs "string" . }}{{ toJson . }}
{{- else if kindIs "bool" . }}{{ . }}
{{- else if or (kindIs "float64" .) (kindIs "int64" .) (kindIs "int" .) }}
{{- if eq (float64 .) (float64 (int64 .)) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- else if kindIs "slice" . }}[{{ range $i, $item := . }}{{ if $i }}, {{ end }}{{ include "printrelay.tomlValue" $item }}{{ end }}]
{{- else }}{{ fail (printf "settings: cannot write %v (%s) as TOML" . (kindOf .)) }}
{{- end }}
{{- end }}

{{/* A settings map as a TOML document, keys sorted. */}}
{{- define "printrelay.toml" -}}
{{- range $key, $value := . }}
{{ $key }} = {{ include "printrelay.tomlValue" $value }}
{{- end }}
{{- end }}

{{- define "printrelay.connectorTokenSecret" -}}
{{- default (printf "%s-token" (include "printrelay.connectorName" .)) .Values.connector.token.existingSecret }}
{{- end }}
