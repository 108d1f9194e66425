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

{{/* "true" when the relay runs on PostgreSQL (database.existingSecret or database.url), else empty. */}}
{{- define "printrelay.replicated" -}}
{{- if or .Values.database.existingSecret .Values.database.url }}true{{ end }}
{{- end }}

{{- define "printrelay.databaseSecret" -}}
{{- default (printf "%s-database" (include "printrelay.relayName" .)) .Values.database.existingSecret }}
{{- end }}

{{- define "printrelay.databaseSecretKey" -}}
{{- ternary .Values.database.existingSecretKey "url" (ne .Values.database.existingSecret "") }}
{{- end }}

{{/* The Secret holding the relay's secret key, or empty when the key is DATA_DIR/secret.key (SQLite). */}}
{{- define "printrelay.secretKeySecret" -}}
{{- if .Values.relay.secretKey.existingSecret }}
{{- .Values.relay.secretKey.existingSecret }}
{{- else if include "printrelay.replicated" . }}
{{- printf "%s-secret-key" (include "printrelay.relayName" .) }}
{{- end }}
{{- end }}

{{- define "printrelay.secretKeySecretKey" -}}
{{- ternary .Values.relay.secretKey.key "secret.key" (ne .Values.relay.secretKey.existingSecret "") }}
{{- end }}

{{- define "printrelay.relayReplicas" -}}
{{- if not (kindIs "invalid" .Values.relay.replicas) }}
{{- int .Values.relay.replicas }}
{{- else }}
{{- ternary 2 1 (ne (include "printrelay.replicated" .) "") }}
{{- end }}
{{- end }}

{{/*
A duration as the relay parses it (30, "500ms", "15s", "10m", "1.5h", "14d") in seconds, rounded up.
Usage: include "printrelay.seconds" (list VALUE "where it came from")
*/}}
{{- define "printrelay.seconds" -}}
{{- $text := index . 0 | toString | trim -}}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?" $text -}}
{{- $unit := regexReplaceAll "^[0-9]+(\\.[0-9]+)?\\s*" $text "" -}}
{{- $units := dict "" 1.0 "ms" 0.001 "s" 1.0 "m" 60.0 "h" 3600.0 "d" 86400.0 -}}
{{- if or (not $number) (not (hasKey $units $unit)) }}
{{- fail (printf "%s: not a duration: %q (use seconds or a unit like 500ms, 15s, 10m)" (index . 1) $text) }}
{{- end }}
{{- mulf (float64 $number) (get $units $unit) | ceil | int }}
{{- end }}

{{/*
The relay's drain_grace in seconds: PRINTRELAY_DRAIN_GRACE in relay.extraEnv beats relay.settings.drain_grace
(as the environment beats the file), else the relay's default (relay/config.py).
*/}}
{{- define "printrelay.drainGrace" -}}
{{- $grace := list 20 "drain_grace" -}}
{{- if hasKey .Values.relay.settings "drain_grace" }}
{{- $grace = list .Values.relay.settings.drain_grace "relay.settings.drain_grace" -}}
{{- end }}
{{- range .Values.relay.extraEnv }}
{{- if and (eq .name "PRINTRELAY_DRAIN_GRACE") (hasKey . "value") }}
{{- $grace = list .value "relay.extraEnv PRINTRELAY_DRAIN_GRACE" -}}
{{- end }}
{{- end }}
{{- include "printrelay.seconds" $grace }}
{{- end }}

{{/* The relay pod's terminationGracePeriodSeconds: computed, or the value given once checked. */}}
{{- define "printrelay.relayTerminationGrace" -}}
{{- $relay := .Values.relay -}}
{{- $drain := include "printrelay.drainGrace" . | int -}}
{{- $preStop := int $relay.preStopSleepSeconds -}}
{{- if kindIs "invalid" $relay.terminationGracePeriodSeconds }}
{{- add $preStop $drain 15 }}
{{- else }}
{{- $least := add $preStop $drain 5 -}}
{{- if lt (int $relay.terminationGracePeriodSeconds) $least }}
{{- fail (printf "relay.terminationGracePeriodSeconds (%d) is too short: the pod needs relay.preStopSleepSeconds (%d) + drain_grace (%d s, relay.settings.drain_grace) + 5 s to exit, so %d or more; or leave it empty to have it computed" (int $relay.terminationGracePeriodSeconds) $preStop $drain $least) }}
{{- end }}
{{- int $relay.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/* Values that contradict each other fail rendering, naming the values. */}}
{{- define "printrelay.validate" -}}
{{- $db := .Values.database -}}
{{- $relay := .Values.relay -}}
{{- $replicated := include "printrelay.replicated" . -}}
{{- if and (eq $relay.tunnel.service.type "LoadBalancer") (not $relay.tls.secretName) }}
{{- fail "relay.tunnel.service.type=LoadBalancer exposes the tunnel without a TLS terminator in front: set relay.tls.secretName (connectors require wss://)" }}
{{- end }}
{{- $howto := "set database.existingSecret (a Secret whose key database.existingSecretKey holds the postgresql:// URL) or database.url" -}}
{{- if and $db.url $db.existingSecret }}
{{- fail "database.url and database.existingSecret are both set: give the PostgreSQL URL one way, preferably database.existingSecret" }}
{{- end }}
{{- if and $db.existingSecret (not $db.existingSecretKey) }}
{{- fail "database.existingSecretKey is empty: name the key of database.existingSecret that holds the PostgreSQL URL (default: url)" }}
{{- end }}
{{- if and $db.url (not (regexMatch "^postgres(ql)?://" $db.url)) }}
{{- fail "database.url must be a PostgreSQL URL, postgresql://USER:PASSWORD@HOST:5432/DB" }}
{{- end }}
{{- if and (not (kindIs "invalid" $relay.replicas)) (gt (int $relay.replicas) 1) (not $replicated) }}
{{- fail (printf "relay.replicas=%d needs PostgreSQL: on the embedded SQLite store the relay runs as one replica. To run replicas, %s; or leave relay.replicas empty" (int $relay.replicas) $howto) }}
{{- end }}
{{- if $relay.autoscaling.enabled }}
{{- if not $replicated }}
{{- fail (printf "relay.autoscaling.enabled needs PostgreSQL: on the embedded SQLite store the relay runs as one replica. To autoscale replicas, %s" $howto) }}
{{- end }}
{{- if not (kindIs "invalid" $relay.replicas) }}
{{- fail "relay.replicas and relay.autoscaling.enabled are both set: the autoscaler owns the replica count (relay.autoscaling.minReplicas and maxReplicas); leave relay.replicas empty" }}
{{- end }}
{{- if gt (int $relay.autoscaling.minReplicas) (int $relay.autoscaling.maxReplicas) }}
{{- fail (printf "relay.autoscaling.minReplicas (%d) is above relay.autoscaling.maxReplicas (%d)" (int $relay.autoscaling.minReplicas) (int $relay.autoscaling.maxReplicas)) }}
{{- end }}
{{- end }}
{{- if and $replicated $relay.persistence.existingClaim }}
{{- fail "relay.persistence.existingClaim is for the SQLite store: with a database (database.existingSecret or database.url) the relay replicas keep no volume; leave it empty" }}
{{- end }}
{{- if and $relay.secretKey.existingSecret (not $relay.secretKey.key) }}
{{- fail "relay.secretKey.key is empty: name the key of relay.secretKey.existingSecret that holds the secret key (default: secret.key)" }}
{{- end }}
{{- $c := .Values.connector -}}
{{- if gt (int $c.replicas) 1 }}
{{- fail (printf "connector.replicas=%d: a connector runs as one pod. Its private key and its delivery ledger, which keeps a job from printing twice, live in its one state directory; two pods of one connector would keep two ledgers and could print jobs twice. For redundancy the connector already keeps sessions to two relay replicas (connector.settings.sessions); a second connector for the site needs its own token" (int $c.replicas)) }}
{{- end }}
{{- if and $c.token.existingSecret $c.token.value }}
{{- fail "connector.token.existingSecret and connector.token.value are both set: give the connector token one way" }}
{{- end }}
{{- end }}
