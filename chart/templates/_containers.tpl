{{/* env, envFrom, volume mounts and security context shared by the agent and sentinel containers:
     (dict "root" $ "c" $component "sb" $secretsBackend "hasCA" bool) */}}
{{- define "rex.containerCommon" -}}
{{- $v := .root.Values -}}
securityContext: {{ toYaml $v.securityContext | nindent 2 }}
env:
  - name: AIRFLOW_CONFIG
    value: /opt/airflow/config/airflow.cfg
  # The pod's ordinal in its StatefulSet picks its own token, <group>-<ordinal>. Airflow expands
  # ${AGENT_ORDINAL} when it reads the option (Kubernetes itself would only expand $(...)).
  - name: AGENT_ORDINAL
    valueFrom:
      fieldRef:
        fieldPath: metadata.labels['apps.kubernetes.io/pod-index']
  - name: AIRFLOW__REMOTE_EXECUTION__TOKEN_FILE
    value: {{ printf "%s/%s-${AGENT_ORDINAL}" $v.token.mountPath .c.id | quote }}
  {{- with $v.proxy.httpsProxy }}
  - {name: HTTPS_PROXY, value: {{ . | quote }}}
  - {name: https_proxy, value: {{ . | quote }}}
  {{- end }}
  {{- with $v.proxy.httpProxy }}
  - {name: HTTP_PROXY, value: {{ . | quote }}}
  - {name: http_proxy, value: {{ . | quote }}}
  {{- end }}
  {{- with $v.proxy.noProxy }}
  - {name: NO_PROXY, value: {{ . | quote }}}
  - {name: no_proxy, value: {{ . | quote }}}
  {{- end }}
  {{- range $v.dagBundles }}
  {{- if and (eq .type "git") .connId .connection .connection.secretName }}
  # The git connection of bundle {{ .name }}.
  - name: AIRFLOW_CONN_{{ .connId | upper }}
    valueFrom:
      secretKeyRef: {name: {{ .connection.secretName }}, key: {{ .connection.key | default "connection" }}}
  {{- end }}
  {{- end }}
  {{- with .sb.env }}{{ toYaml . | nindent 2 }}{{ end }}
  {{- with $v.commonEnv }}{{ toYaml . | nindent 2 }}{{ end }}
  {{- with .c.env }}{{ toYaml . | nindent 2 }}{{ end }}
{{- with $v.extraEnvFrom }}
envFrom: {{ toYaml . | nindent 2 }}
{{- end }}
volumeMounts:
  - {name: config, mountPath: /opt/airflow/config, readOnly: true}
  - {name: tokens, mountPath: {{ $v.token.mountPath }}, readOnly: true}
  - {name: status, mountPath: /var/run/airflow-agent}
  - {name: tmp, mountPath: /tmp}
  - {name: logs, mountPath: /opt/airflow/logs}
  - {name: dag-bundles, mountPath: {{ $v.dagBundleStoragePath }}}
  {{- if .hasCA }}
  - {name: ca, mountPath: /etc/airflow-agent/ca, readOnly: true}
  {{- end }}
  {{- if $v.clientCert.existingSecret }}
  - {name: client-cert, mountPath: /etc/airflow-agent/client-cert, readOnly: true}
  {{- end }}
  {{- with $v.extraVolumeMounts }}{{ toYaml . | nindent 2 }}{{ end }}
{{- end -}}

{{- define "rex.sentinelContainer" -}}
{{- $v := .root.Values -}}
name: sentinel
image: {{ include "rex.image" .root }}
imagePullPolicy: {{ $v.image.pullPolicy }}
args: ["sentinel", "--host", "0.0.0.0", "--port", "{{ int $v.sentinel.port }}"]
{{- if $v.sentinel.declarePort }}
ports:
  - {name: sentinel, containerPort: {{ $v.sentinel.port }}, protocol: TCP}
{{- end }}
livenessProbe:
  httpGet: {path: /livez, port: {{ $v.sentinel.port }}}
  {{- toYaml $v.sentinel.livenessProbe | nindent 2 }}
{{- with $v.sentinel.resources }}
resources: {{ toYaml . | nindent 2 }}
{{- end }}
{{ include "rex.containerCommon" . }}
{{- end -}}
