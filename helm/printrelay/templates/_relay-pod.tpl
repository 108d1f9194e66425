{{/*
The relay's pod template: the StatefulSet's (SQLite, one replica) and the Deployment's (PostgreSQL, replicas).
Usage: include "printrelay.relayPod" . | nindent 4
*/}}
{{- define "printrelay.relayPod" -}}
{{- $relay := .Values.relay -}}
{{- $name := include "printrelay.relayName" . -}}
{{- $replicated := include "printrelay.replicated" . -}}
{{- $secretKey := include "printrelay.secretKeySecret" . -}}
metadata:
  labels:
    {{- include "printrelay.selectorLabels" (list . "relay") | nindent 4 }}
    {{- with $relay.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    # A changed settings file restarts the relay (it reads the file only at start).
    checksum/config: {{ include (print $.Template.BasePath "/relay-configmap.yaml") . | sha256sum }}
    {{- with $relay.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "printrelay.serviceAccountName" . }}
  automountServiceAccountToken: false
  enableServiceLinks: false
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $relay.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  # The preStop pause, then drain_grace for job streams in flight, then a margin to exit.
  terminationGracePeriodSeconds: {{ include "printrelay.relayTerminationGrace" . }}
  containers:
    - name: relay
      image: {{ include "printrelay.image" . }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      command: [printrelay]
      args: [serve]
      env:
        - name: PRINTRELAY_CONFIG
          value: /etc/printrelay/relay.toml
        - name: PRINTRELAY_LISTEN
          value: {{ include "printrelay.hostport" (list $relay.bindAddress $relay.ports.http) | quote }}
        - name: PRINTRELAY_TUNNEL_LISTEN
          value: {{ include "printrelay.hostport" (list $relay.bindAddress $relay.ports.tunnel) | quote }}
        - name: PRINTRELAY_METRICS_LISTEN
          value: {{ include "printrelay.hostport" (list $relay.bindAddress $relay.ports.metrics) | quote }}
        - name: PRINTRELAY_DATA_DIR
          value: {{ $relay.persistence.mountPath | quote }}
        {{- if $replicated }}
        # PostgreSQL, shared by the replicas; the relay applies missing migrations at start.
        - name: PRINTRELAY_DATABASE_URL
          valueFrom:
            secretKeyRef:
              name: {{ include "printrelay.databaseSecret" . }}
              key: {{ include "printrelay.databaseSecretKey" . }}
        {{- end }}
        {{- if $secretKey }}
        - name: PRINTRELAY_SECRET_KEY_FILE
          value: /etc/printrelay/secret-key/secret.key
        {{- end }}
        {{- with include "printrelay.publicUrl" . }}
        - name: PRINTRELAY_PUBLIC_URL
          value: {{ . | quote }}
        {{- end }}
        {{- if $relay.tls.secretName }}
        - name: PRINTRELAY_TLS_CERT
          value: /etc/printrelay/tls/tls.crt
        - name: PRINTRELAY_TLS_KEY
          value: /etc/printrelay/tls/tls.key
        {{- end }}
        - name: PRINTRELAY_LOG_LEVEL
          value: {{ $relay.logLevel | quote }}
        - name: PRINTRELAY_LOG_FORMAT
          value: json
        # The root filesystem is read-only: no bytecode caches.
        - name: PYTHONDONTWRITEBYTECODE
          value: "1"
        {{- with $relay.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        - name: http
          containerPort: {{ $relay.ports.http }}
          protocol: TCP
        - name: tunnel
          containerPort: {{ $relay.ports.tunnel }}
          protocol: TCP
        - name: metrics
          containerPort: {{ $relay.ports.metrics }}
          protocol: TCP
      # Probes use the metrics listener: plain HTTP even when the relay serves TLS, and answering while the
      # public API is saturated.
      startupProbe:
        httpGet:
          path: /healthz
          port: metrics
        periodSeconds: {{ $relay.probes.startup.periodSeconds }}
        failureThreshold: {{ $relay.probes.startup.failureThreshold }}
      livenessProbe:
        httpGet:
          path: /healthz
          port: metrics
        periodSeconds: {{ $relay.probes.liveness.periodSeconds }}
        timeoutSeconds: {{ $relay.probes.liveness.timeoutSeconds }}
        failureThreshold: {{ $relay.probes.liveness.failureThreshold }}
      # /readyz is false while the relay starts, drains after SIGTERM, or cannot write its store.
      readinessProbe:
        httpGet:
          path: /readyz
          port: metrics
        periodSeconds: {{ $relay.probes.readiness.periodSeconds }}
        timeoutSeconds: {{ $relay.probes.readiness.timeoutSeconds }}
        failureThreshold: {{ $relay.probes.readiness.failureThreshold }}
      lifecycle:
        preStop:
          # Endpoints and load balancers drop the pod before SIGTERM starts the drain.
          sleep:
            seconds: {{ $relay.preStopSleepSeconds }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      resources:
        {{- toYaml $relay.resources | nindent 8 }}
      volumeMounts:
        - name: data
          mountPath: {{ $relay.persistence.mountPath }}
        - name: tmp
          mountPath: /tmp
        - name: config
          mountPath: /etc/printrelay/relay.toml
          subPath: relay.toml
          readOnly: true
        {{- if $secretKey }}
        - name: secret-key
          mountPath: /etc/printrelay/secret-key
          readOnly: true
        {{- end }}
        {{- if $relay.tls.secretName }}
        # No subPath: the kubelet updates the files when the Secret changes; SIGHUP reloads them.
        - name: tls
          mountPath: /etc/printrelay/tls
          readOnly: true
        {{- end }}
        {{- with $relay.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: tmp
      emptyDir:
        sizeLimit: {{ $relay.tmpSizeLimit }}
    - name: config
      configMap:
        name: {{ $name }}
    {{- with $relay.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    {{- if $relay.tls.secretName }}
    - name: tls
      secret:
        secretName: {{ $relay.tls.secretName }}
        defaultMode: 0440
    {{- end }}
    {{- if $secretKey }}
    # One key for every replica (relay.secretKey).
    - name: secret-key
      secret:
        secretName: {{ $secretKey }}
        defaultMode: 0440
        items:
          - key: {{ include "printrelay.secretKeySecretKey" . }}
            path: secret.key
    {{- end }}
    {{- if $replicated }}
    # Per-host state only: jobs and payloads live in PostgreSQL.
    - name: data
      emptyDir:
        sizeLimit: {{ $relay.dataDirSizeLimit }}
    {{- else if not $relay.persistence.enabled }}
    # Not persistent: the queue, spool and tokens are lost with the pod. For trying the chart only.
    - name: data
      emptyDir: {}
    {{- else if $relay.persistence.existingClaim }}
    - name: data
      persistentVolumeClaim:
        claimName: {{ $relay.persistence.existingClaim }}
    {{- end }}
  {{- with $relay.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $relay.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $relay.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if and $replicated $relay.topologySpread.enabled }}
  # One node's loss or drain takes one replica. Counted per ReplicaSet (pod-template-hash), so the pods a
  # rollout replaces do not skew where the new ones go.
  topologySpreadConstraints:
    - maxSkew: {{ $relay.topologySpread.maxSkew }}
      topologyKey: {{ $relay.topologySpread.topologyKey }}
      whenUnsatisfiable: {{ $relay.topologySpread.whenUnsatisfiable }}
      labelSelector:
        matchLabels:
          {{- include "printrelay.selectorLabels" (list . "relay") | nindent 10 }}
      matchLabelKeys: [pod-template-hash]
  {{- end }}
{{- end }}
