{{/* Names and labels ------------------------------------------------------------------------- */}}

{{- define "rex.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/* At most 30 characters, so that "<fullname>-<group (20)>-<ordinal>" stays a valid pod name. */}}
{{- define "rex.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 30 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default "agent" .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 30 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 30 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* labels of every object but the selector ones */}}
{{- define "rex.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* labels of objects that belong to no component */}}
{{- define "rex.labels" -}}
{{ include "rex.commonLabels" . }}
app.kubernetes.io/name: {{ include "rex.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* selector labels of one component: (dict "root" $ "c" $component) */}}
{{- define "rex.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rex.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .c.kind }}
airflow-remote-execution/group: {{ .c.id }}
{{- end -}}

{{- define "rex.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "rex.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "rex.tokenSecretName" -}}
{{- default (printf "%s-tokens" (include "rex.fullname" .)) .Values.token.existingSecret -}}
{{- end -}}

{{- define "rex.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The components: one StatefulSet each. JSON list of
     {id, kind, replicas, queues, concurrency, components, ...group values}. */}}
{{- define "rex.components" -}}
{{- $out := list -}}
{{- range .Values.workers -}}
{{- $w := merge (dict "id" .name "kind" "worker" "components" "worker") (deepCopy .) -}}
{{- if or (not (hasKey . "replicas")) (kindIs "invalid" .replicas) }}{{ $_ := set $w "replicas" 1 }}{{ end -}}
{{- if or (not (hasKey . "concurrency")) (kindIs "invalid" .concurrency) }}{{ $_ := set $w "concurrency" 4 }}{{ end -}}
{{- $out = append $out $w -}}
{{- end -}}
{{- if .Values.dagProcessor.enabled -}}
{{- $out = append $out (dict "id" "dag-processor" "kind" "dag-processor" "components" "dag-processor"
      "replicas" .Values.dagProcessor.replicas "resources" .Values.dagProcessor.resources) -}}
{{- end -}}
{{- if .Values.triggerer.enabled -}}
{{- $out = append $out (dict "id" "triggerer" "kind" "triggerer" "components" "triggerer"
      "replicas" .Values.triggerer.replicas "resources" .Values.triggerer.resources
      "queues" .Values.triggerer.queues) -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/* How many agents a component may have: its replicas, or up to autoscaling.maxReplicas when KEDA
     scales it (every ordinal needs its token). */}}
{{- define "rex.maxAgents" -}}
{{- if and .autoscaling .autoscaling.enabled -}}
{{- max (int .replicas) (int .autoscaling.maxReplicas) -}}
{{- else -}}
{{- int .replicas -}}
{{- end -}}
{{- end -}}

{{/* Token keys every component needs: JSON list. */}}
{{- define "rex.tokenKeys" -}}
{{- $keys := list -}}
{{- range (include "rex.components" . | fromJsonArray) -}}
{{- $c := . -}}
{{- range $i := until (int (include "rex.maxAgents" $c)) -}}
{{- $keys = append $keys (printf "%s-%d" $c.id $i) -}}
{{- end -}}
{{- end -}}
{{- toJson $keys -}}
{{- end -}}

{{/* Checks the schema cannot express; each failure names the value. -------------------------- */}}
{{- define "rex.validate" -}}
{{- $v := .Values -}}
{{- if not $v.apiUrl -}}
{{- fail "apiUrl is required: the plane's api-server URL as agents reach it, e.g. https://airflow.example.com" -}}
{{- end -}}
{{- if and $v.token.existingSecret $v.token.values -}}
{{- fail "token is given two ways: set token.existingSecret or token.values, not both" -}}
{{- end -}}
{{- if not (or $v.token.existingSecret $v.token.values) -}}
{{- fail "token.existingSecret (a Secret with one token per agent) or token.values is required" -}}
{{- end -}}
{{- if $v.token.values -}}
{{- range (include "rex.tokenKeys" . | fromJsonArray) -}}
{{- if not (hasKey $v.token.values .) -}}
{{- fail (printf "token.values.%s is missing: every agent needs its own token (keys <group>-<ordinal>)" .) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if not (include "rex.components" . | fromJsonArray) -}}
{{- fail "workers is empty and neither dagProcessor.enabled nor triggerer.enabled is set: no agent to deploy" -}}
{{- end -}}
{{- $seen := dict -}}
{{- range $i, $w := $v.workers -}}
{{- if hasKey $seen $w.name -}}
{{- fail (printf "workers[%d].name %q is used twice" $i $w.name) -}}
{{- end -}}
{{- $_ := set $seen $w.name true -}}
{{- if not $w.queues -}}
{{- fail (printf "workers[%d].queues (group %q) must list at least one queue" $i $w.name) -}}
{{- end -}}
{{- if and $w.autoscaling $w.autoscaling.enabled -}}
{{- if not $v.keda.metricsToken.existingSecret -}}
{{- fail (printf "workers[%d].autoscaling.enabled needs keda.metricsToken.existingSecret: a Secret holding a metrics token (`airflow remote-execution metrics-tokens create`)" $i) -}}
{{- end -}}
{{- if gt (int $w.autoscaling.minReplicas) (int $w.autoscaling.maxReplicas) -}}
{{- fail (printf "workers[%d].autoscaling.minReplicas (%v) is above maxReplicas (%v)" $i $w.autoscaling.minReplicas $w.autoscaling.maxReplicas) -}}
{{- end -}}
{{- end -}}
{{- $grace := $w.terminationGracePeriodSeconds | default $v.terminationGracePeriodSeconds -}}
{{- if lt (int $grace) (int $v.shutdownTimeout) -}}
{{- fail (printf "workers[%d].terminationGracePeriodSeconds (%v) must be >= shutdownTimeout (%v): a stopping agent is killed before its tasks finish" $i $grace $v.shutdownTimeout) -}}
{{- end -}}
{{- end -}}
{{- if lt (int $v.terminationGracePeriodSeconds) (int $v.shutdownTimeout) -}}
{{- fail (printf "terminationGracePeriodSeconds (%v) must be >= shutdownTimeout (%v): a stopping agent is killed before its tasks finish" $v.terminationGracePeriodSeconds $v.shutdownTimeout) -}}
{{- end -}}
{{- if and $v.caBundle.pem (or $v.caBundle.existingSecret $v.caBundle.existingConfigMap) -}}
{{- fail "caBundle is given two ways: set caBundle.pem, caBundle.existingSecret or caBundle.existingConfigMap" -}}
{{- end -}}
{{- if and $v.caBundle.existingSecret $v.caBundle.existingConfigMap -}}
{{- fail "caBundle is given two ways: set caBundle.existingSecret or caBundle.existingConfigMap" -}}
{{- end -}}
{{- $names := list -}}
{{- range $i, $b := $v.dagBundles -}}
{{- if has $b.name $names -}}
{{- fail (printf "dagBundles[%d].name %q is used twice" $i $b.name) -}}
{{- end -}}
{{- $names = append $names $b.name -}}
{{- if and (eq $b.type "git") (not (or $b.repoUrl $b.connId)) -}}
{{- fail (printf "dagBundles[%d] (%s): give repoUrl, or connId of a git connection whose host is the repository URL" $i $b.name) -}}
{{- end -}}
{{- if and (eq $b.type "git") $b.repoUrl (regexMatch "^[a-zA-Z][a-zA-Z0-9+.-]*://[^/@]*:[^/@]*@" $b.repoUrl) -}}
{{- fail (printf "dagBundles[%d].repoUrl carries a password/token: put it in the git connection (connection.secretName)" $i) -}}
{{- end -}}
{{- end -}}
{{- range $v.dagProcessor.bundles -}}
{{- if not (has . $names) -}}
{{- fail (printf "dagProcessor.bundles: %q is not a dagBundles entry" .) -}}
{{- end -}}
{{- end -}}
{{- if and $v.xcomBackend.enabled (not $v.xcomBackend.path) -}}
{{- fail "xcomBackend.path is required when xcomBackend.enabled (s3://bucket/prefix, gs://..., abfs://..., or a path)" -}}
{{- end -}}
{{- if and $v.logging.remoteLogging (not $v.logging.remoteBaseLogFolder) -}}
{{- fail "logging.remoteBaseLogFolder is required when logging.remoteLogging is on" -}}
{{- end -}}
{{- include "rex.secretsBackend" . | fromJson | toJson | trunc 0 -}}
{{- end -}}

{{/* secretsBackend -> {"class": ..., "kwargs": {...}, "env": [EnvVar]} exactly as
     airflow_remote_execution's `secrets configure` builds it (tests/chart compare the two). ------ */}}
{{- define "rex.secretsBackend" -}}
{{- $s := .Values.secretsBackend -}}
{{- $out := dict -}}
{{- if $s.backend -}}
{{- $classes := dict
    "aws" "airflow.providers.amazon.aws.secrets.secrets_manager.SecretsManagerBackend"
    "azure" "airflow.providers.microsoft.azure.secrets.key_vault.AzureKeyVaultBackend"
    "gcp" "airflow.providers.google.cloud.secrets.secret_manager.CloudSecretManagerBackend"
    "vault" "airflow.providers.hashicorp.secrets.vault.VaultBackend" -}}
{{- $defaults := dict
    "aws" (list "airflow/connections" "airflow/variables")
    "azure" (list "airflow-connections" "airflow-variables")
    "gcp" (list "airflow-connections" "airflow-variables")
    "vault" (list "connections" "variables") -}}
{{- $conn := default (index $defaults $s.backend 0) $s.connectionsPrefix -}}
{{- $var := default (index $defaults $s.backend 1) $s.variablesPrefix -}}
{{- $kw := dict -}}
{{- $env := list -}}
{{- if $s.caBundle -}}
{{- if not (isAbs $s.caBundle) -}}
{{- fail (printf "secretsBackend.caBundle %q must be an absolute path (the agent reads it at run time)" $s.caBundle) -}}
{{- end -}}
{{- end -}}
{{- if eq $s.backend "aws" -}}
{{- $_ := set $kw "connections_prefix" $conn -}}
{{- $_ := set $kw "variables_prefix" $var -}}
{{- with $s.aws.region }}{{ $_ := set $kw "region_name" . }}{{ end -}}
{{- with $s.aws.roleArn -}}
{{- if not (hasPrefix "arn:" .) -}}
{{- fail (printf "secretsBackend.aws.roleArn %q is not an ARN (arn:aws:iam::<account>:role/<name>)" .) -}}
{{- end -}}
{{- $_ := set $kw "role_arn" . -}}
{{- end -}}
{{- with $s.aws.profile }}{{ $_ := set $kw "profile_name" . }}{{ end -}}
{{- with $s.aws.endpointUrl -}}
{{- if not (regexMatch "^https?://[^/\\s]+" .) -}}
{{- fail (printf "secretsBackend.aws.endpointUrl %q is not a http(s)://host URL" .) -}}
{{- end -}}
{{- $_ := set $kw "endpoint_url" (regexReplaceAll "/+$" . "") -}}
{{- end -}}
{{- with $s.caBundle }}{{ $_ := set $kw "verify" . }}{{ end -}}
{{- else if eq $s.backend "azure" -}}
{{- $a := $s.azure -}}
{{- if not (regexMatch "^https://[^/\\s]+" (default "" $a.vaultUrl)) -}}
{{- fail (printf "secretsBackend.azure.vaultUrl %q is required and must be a https://<name>.vault.azure.net URL" (default "" $a.vaultUrl)) -}}
{{- end -}}
{{- range $flag, $p := dict "connectionsPrefix" $conn "variablesPrefix" $var -}}
{{- if not (regexMatch "^[0-9a-zA-Z-]+$" $p) -}}
{{- fail (printf "secretsBackend.%s %q: Key Vault secret names allow only letters, digits and '-'" $flag $p) -}}
{{- end -}}
{{- end -}}
{{- $_ := set $kw "connections_prefix" $conn -}}
{{- $_ := set $kw "variables_prefix" $var -}}
{{- $_ := set $kw "vault_url" (regexReplaceAll "/+$" $a.vaultUrl "") -}}
{{- with $a.managedIdentityClientId }}{{ $_ := set $kw "managed_identity_client_id" . }}{{ end -}}
{{- with $s.caBundle }}{{ $_ := set $kw "connection_verify" . }}{{ end -}}
{{- if or $a.tenantId $a.clientId -}}
{{- if not (and $a.tenantId $a.clientId) -}}
{{- fail "secretsBackend.azure: a service principal needs both tenantId and clientId" -}}
{{- end -}}
{{- if not (and $a.clientSecret.secretName $a.clientSecret.key) -}}
{{- fail "secretsBackend.azure.clientSecret.secretName and .key are required with tenantId/clientId (AZURE_CLIENT_SECRET)" -}}
{{- end -}}
{{- $env = append $env (dict "name" "AZURE_TENANT_ID" "value" $a.tenantId) -}}
{{- $env = append $env (dict "name" "AZURE_CLIENT_ID" "value" $a.clientId) -}}
{{- $env = append $env (dict "name" "AZURE_CLIENT_SECRET" "valueFrom" (dict "secretKeyRef" (dict "name" $a.clientSecret.secretName "key" $a.clientSecret.key))) -}}
{{- end -}}
{{- else if eq $s.backend "gcp" -}}
{{- $g := $s.gcp -}}
{{- if not (regexMatch "^[a-z][a-z0-9-]{4,28}[a-z0-9]$" (default "" $g.projectId)) -}}
{{- fail (printf "secretsBackend.gcp.projectId %q is required and must be a GCP project id (6-30 lowercase letters, digits, -)" (default "" $g.projectId)) -}}
{{- end -}}
{{- range $flag, $p := dict "connectionsPrefix" $conn "variablesPrefix" $var -}}
{{- if not (regexMatch "^[a-zA-Z0-9_-]+$" $p) -}}
{{- fail (printf "secretsBackend.%s %q: Secret Manager ids allow only letters, digits, '-' and '_'" $flag $p) -}}
{{- end -}}
{{- end -}}
{{- $_ := set $kw "connections_prefix" $conn -}}
{{- $_ := set $kw "variables_prefix" $var -}}
{{- $_ := set $kw "project_id" $g.projectId -}}
{{- with $g.keyFile -}}
{{- if not (isAbs .) }}{{ fail (printf "secretsBackend.gcp.keyFile %q must be an absolute path" .) }}{{ end -}}
{{- $_ := set $kw "gcp_key_path" . -}}
{{- end -}}
{{- else if eq $s.backend "vault" -}}
{{- $o := $s.vault -}}
{{- if not (regexMatch "^https?://[^/\\s]+" (default "" $o.url)) -}}
{{- fail (printf "secretsBackend.vault.url %q is required: the Vault/OpenBao address, e.g. https://vault:8200" (default "" $o.url)) -}}
{{- end -}}
{{- $_ := set $kw "connections_path" (trimAll "/" $conn) -}}
{{- $_ := set $kw "variables_path" (trimAll "/" $var) -}}
{{- $_ := set $kw "mount_point" $o.mountPoint -}}
{{- $_ := set $kw "kv_engine_version" (int $o.kvVersion) -}}
{{- $_ := set $kw "url" (regexReplaceAll "/+$" $o.url "") -}}
{{- $_ := set $kw "auth_type" $o.authType -}}
{{- with $o.authMountPoint }}{{ $_ := set $kw "auth_mount_point" . }}{{ end -}}
{{- with $s.caBundle }}{{ $_ := set $kw "verify" . }}{{ end -}}
{{- if eq $o.authType "token" -}}
{{- if $o.tokenFile -}}
{{- if not (isAbs $o.tokenFile) }}{{ fail (printf "secretsBackend.vault.tokenFile %q must be an absolute path" $o.tokenFile) }}{{ end -}}
{{- $_ := set $kw "token_path" $o.tokenFile -}}
{{- else if and $o.token.secretName $o.token.key -}}
{{- $env = append $env (dict "name" "VAULT_TOKEN" "valueFrom" (dict "secretKeyRef" (dict "name" $o.token.secretName "key" $o.token.key))) -}}
{{- else -}}
{{- fail "secretsBackend.vault: authType token needs tokenFile or token.secretName/token.key (VAULT_TOKEN)" -}}
{{- end -}}
{{- else if eq $o.authType "approle" -}}
{{- if not $o.roleId }}{{ fail "secretsBackend.vault.roleId is required for authType approle" }}{{ end -}}
{{- $_ := set $kw "role_id" $o.roleId -}}
{{- if not (and $o.secretId.secretName $o.secretId.key) -}}
{{- fail "secretsBackend.vault.secretId.secretName and .key are required for authType approle" -}}
{{- end -}}
{{- $env = append $env (dict "name" "AIRFLOW__WORKERS__SECRETS_BACKEND_KWARG__SECRET_ID" "valueFrom" (dict "secretKeyRef" (dict "name" $o.secretId.secretName "key" $o.secretId.key))) -}}
{{- else -}}
{{- if not $o.kubernetesRole }}{{ fail "secretsBackend.vault.kubernetesRole is required for authType kubernetes" }}{{ end -}}
{{- if not (isAbs $o.kubernetesJwtPath) }}{{ fail (printf "secretsBackend.vault.kubernetesJwtPath %q must be an absolute path" $o.kubernetesJwtPath) }}{{ end -}}
{{- $_ := set $kw "kubernetes_role" $o.kubernetesRole -}}
{{- $_ := set $kw "kubernetes_jwt_path" $o.kubernetesJwtPath -}}
{{- end -}}
{{- end -}}
{{- $out = dict "class" (index $classes $s.backend) "kwargs" $kw "env" $env -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/* dagBundles -> the dag_bundle_config_list entries, as `bundles add-git/add-local` build them. */}}
{{- define "rex.bundleEntries" -}}
{{- $entries := list -}}
{{- range .bundles -}}
{{- $kw := dict -}}
{{- if eq .type "git" -}}
{{- $_ := set $kw "tracking_ref" (default "main" .trackingRef) -}}
{{- with .repoUrl }}{{ $_ := set $kw "repo_url" . }}{{ end -}}
{{- with .connId }}{{ $_ := set $kw "git_conn_id" . }}{{ end -}}
{{- with .subdir }}{{ $_ := set $kw "subdir" . }}{{ end -}}
{{- if not (kindIs "invalid" .refreshInterval) }}{{ $_ := set $kw "refresh_interval" (int .refreshInterval) }}{{ end -}}
{{- if .submodules }}{{ $_ := set $kw "submodules" true }}{{ end -}}
{{- $entries = append $entries (dict "name" .name "classpath" "airflow.providers.git.bundles.git.GitDagBundle" "kwargs" $kw) -}}
{{- else -}}
{{- $_ := set $kw "path" .path -}}
{{- if not (kindIs "invalid" .refreshInterval) }}{{ $_ := set $kw "refresh_interval" (int .refreshInterval) }}{{ end -}}
{{- $entries = append $entries (dict "name" .name "classpath" "airflow.dag_processing.bundles.local.LocalDagBundle" "kwargs" $kw) -}}
{{- end -}}
{{- end -}}
{{- toJson $entries -}}
{{- end -}}

{{/* One component's Airflow configuration as a dict: section -> option -> string.
     (dict "root" $ "c" $component) */}}
{{- define "rex.configDict" -}}
{{- $v := .root.Values -}}
{{- $c := .c -}}
{{- $re := dict
    "api_url" (regexReplaceAll "/+$" $v.apiUrl "")
    "components" $c.components
    "shutdown_timeout" (toString (int $v.shutdownTimeout))
    "status_file" "/var/run/airflow-agent/status.json" -}}
{{- if and $v.metrics.enabled (eq $c.kind "worker") -}}
{{- $_ := set $re "agent_metrics_port" (toString (int $v.metrics.port)) -}}
{{- $_ := set $re "agent_metrics_host" "0.0.0.0" -}}
{{- end -}}
{{- if and $v.sentinel.enabled (eq $c.kind "worker") -}}
{{- $_ := set $re "sentinel_host" "0.0.0.0" -}}
{{- $_ := set $re "sentinel_port" (toString (int $v.sentinel.port)) -}}
{{- $_ := set $re "sentinel_report_interval" (toString $v.sentinel.reportInterval) -}}
{{- end -}}
{{- if eq $c.kind "worker" -}}
{{- $_ := set $re "queues" (join "," $c.queues) -}}
{{- $_ := set $re "concurrency" (toString (int (default 4 $c.concurrency))) -}}
{{- else if and (eq $c.kind "triggerer") $c.queues -}}
{{- $_ := set $re "queues" (join "," $c.queues) -}}
{{- end -}}
{{- if or $v.caBundle.pem $v.caBundle.existingSecret $v.caBundle.existingConfigMap -}}
{{- $_ := set $re "ca_bundle" (printf "/etc/airflow-agent/ca/%s" $v.caBundle.key) -}}
{{- end -}}
{{- if $v.clientCert.existingSecret -}}
{{- $_ := set $re "client_cert" (printf "/etc/airflow-agent/client-cert/%s" $v.clientCert.certKey) -}}
{{- $_ := set $re "client_key" (printf "/etc/airflow-agent/client-cert/%s" $v.clientCert.keyKey) -}}
{{- end -}}
{{- $core := dict "load_examples" "False" -}}
{{- with $v.executor }}{{ $_ := set $core "executor" . }}{{ end -}}
{{- if $v.xcomBackend.enabled -}}
{{- $_ := set $core "xcom_backend" "airflow_remote_execution.xcom.ObjectStorageXComBackend" -}}
{{- $_ := set $re "xcom_path" $v.xcomBackend.path -}}
{{- $_ := set $re "xcom_conn_id" $v.xcomBackend.connId -}}
{{- $_ := set $re "xcom_threshold" (toString (int $v.xcomBackend.threshold)) -}}
{{- $_ := set $re "xcom_compression" $v.xcomBackend.compression -}}
{{- end -}}
{{- $_ := set $re "log_upload_interval" (toString $v.logging.logUploadInterval) -}}
{{- $logging := dict "logging_level" $v.logging.level -}}
{{- if $v.logging.remoteLogging -}}
{{- $_ := set $logging "remote_logging" "True" -}}
{{- $_ := set $logging "remote_base_log_folder" $v.logging.remoteBaseLogFolder -}}
{{- $_ := set $logging "remote_log_conn_id" $v.logging.remoteLogConnId -}}
{{- end -}}
{{- $cfg := dict
    "remote_execution" $re
    "core" $core
    "database" (dict "sql_alchemy_conn" "sqlite:////nonexistent/agents-have-no-metadata-db.db")
    "logging" $logging -}}
{{- $workers := dict -}}
{{- $sb := include "rex.secretsBackend" .root | fromJson -}}
{{- if $sb.class -}}
{{- $_ := set $workers "secrets_backend" $sb.class -}}
{{- $_ := set $workers "secrets_backend_kwargs" (toJson $sb.kwargs) -}}
{{- end -}}
{{- with $v.stateStoreBackend.classPath }}{{ $_ := set $workers "state_store_backend" . }}{{ end -}}
{{- if $workers }}{{ $_ := set $cfg "workers" $workers }}{{ end -}}
{{- $bundles := $v.dagBundles -}}
{{- if and (eq $c.kind "dag-processor") $v.dagProcessor.bundles -}}
{{- $bundles = list -}}
{{- range $v.dagBundles }}{{ if has .name $v.dagProcessor.bundles }}{{ $bundles = append $bundles . }}{{ end }}{{ end -}}
{{- end -}}
{{- $dp := dict "dag_bundle_storage_path" $v.dagBundleStoragePath -}}
{{- if $bundles -}}
{{- $_ := set $dp "dag_bundle_config_list" (include "rex.bundleEntries" (dict "bundles" $bundles)) -}}
{{- end -}}
{{- $_ := set $cfg "dag_processor" $dp -}}
{{- if eq $c.kind "triggerer" -}}
{{- $_ := set $cfg "triggerer" (dict "capacity" (toString (int $v.triggerer.capacity))) -}}
{{- end -}}
{{- if $v.openLineage.enabled -}}
{{- $ol := dict "disabled" "False" -}}
{{- with $v.openLineage.namespace }}{{ $_ := set $ol "namespace" . }}{{ end -}}
{{- with $v.openLineage.transport }}{{ $_ := set $ol "transport" (toJson .) }}{{ end -}}
{{- $_ := set $cfg "openlineage" $ol -}}
{{- end -}}
{{- range $section, $options := $v.config -}}
{{- $merged := merge (dict) (default (dict) (index $cfg $section)) -}}
{{- range $k, $val := $options }}{{ $_ := set $merged $k (toString $val) }}{{ end -}}
{{- $_ := set $cfg $section $merged -}}
{{- end -}}
{{- toJson $cfg -}}
{{- end -}}

{{/* airflow.cfg text of one component. "%" is doubled: Airflow's parser interpolates. */}}
{{- define "rex.airflowCfg" -}}
{{- $cfg := include "rex.configDict" . | fromJson -}}
# Rendered by the airflow-remote-execution-agent chart for "{{ .c.id }}"; the token is not here
# (AIRFLOW__REMOTE_EXECUTION__TOKEN_FILE points at this pod's own key of the token Secret).
{{- range $section := keys $cfg | sortAlpha }}

[{{ $section }}]
{{- $options := index $cfg $section -}}
{{- range $k := keys $options | sortAlpha }}
{{ $k }} = {{ index $options $k | toString | replace "%" "%%" }}
{{- end }}
{{- end }}
{{ end -}}
