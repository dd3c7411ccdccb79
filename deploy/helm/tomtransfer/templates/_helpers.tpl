{{/*
Naming. The full name prefixes every object; it must be a DNS-1035 label because KubeRay derives
Service names from the RayService/RayJob names.
*/}}
{{- define "tomtransfer.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tomtransfer.fullname" -}}
{{- $name := "" -}}
{{- if .Values.fullnameOverride -}}
{{- $name = .Values.fullnameOverride -}}
{{- else -}}
{{- $base := default .Chart.Name .Values.nameOverride -}}
{{- if contains $base .Release.Name -}}
{{- $name = .Release.Name -}}
{{- else -}}
{{- $name = printf "%s-%s" .Release.Name $base -}}
{{- end -}}
{{- end -}}
{{- $name = $name | trunc 40 | trimSuffix "-" -}}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name) -}}
{{- fail (printf "resource name prefix %q is not a DNS-1035 label (lower-case letters, digits and '-', starting with a letter): use another release name or set fullnameOverride" $name) -}}
{{- end -}}
{{- $name -}}
{{- end -}}

{{- define "tomtransfer.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tomtransfer.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tomtransfer.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tomtransfer.labels" -}}
helm.sh/chart: {{ include "tomtransfer.chart" . }}
{{ include "tomtransfer.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tomtransfer
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "serve") */}}
{{- define "tomtransfer.componentSelector" -}}
{{ include "tomtransfer.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "tomtransfer.componentLabels" -}}
{{ include "tomtransfer.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "tomtransfer.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tomtransfer.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Image reference: digest wins; the default tag is appVersion (+ "-gpu" for the gpu flavor). */}}
{{- define "tomtransfer.image" -}}
{{- $img := .Values.image -}}
{{- $repo := required "image.repository is required (e.g. --set image.repository=registry.example.com/tomtransfer)" $img.repository -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $repo $img.digest -}}
{{- else -}}
{{- $suffix := ternary "-gpu" "" (eq $img.flavor "gpu") -}}
{{- printf "%s:%s" $repo (default (printf "%s%s" .Chart.AppVersion $suffix) $img.tag) -}}
{{- end -}}
{{- end -}}

{{/* The light image (MLflow, submitters, helm test): lightImage, else the main image. */}}
{{- define "tomtransfer.lightImage" -}}
{{- $img := .Values.lightImage -}}
{{- if not $img.repository -}}
{{- include "tomtransfer.image" . -}}
{{- else if $img.digest -}}
{{- printf "%s@%s" $img.repository $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $img.repository (default .Chart.AppVersion $img.tag) -}}
{{- end -}}
{{- end -}}

{{- define "tomtransfer.mlflowImage" -}}
{{- if .Values.mlflow.image.repository -}}
{{- printf "%s:%s" .Values.mlflow.image.repository (required "mlflow.image.tag is required with mlflow.image.repository" .Values.mlflow.image.tag) -}}
{{- else -}}
{{- include "tomtransfer.lightImage" . -}}
{{- end -}}
{{- end -}}

{{/* rayVersion: required, the ray installed in the image (KubeRay chooses probes and features by it). */}}
{{- define "tomtransfer.rayVersion" -}}
{{- required "ray.version is required: the ray version installed in the image (make deploy reads the image's io.ray.version label; or --set ray.version=X.Y.Z)" .Values.ray.version -}}
{{- end -}}

{{/* In-cluster addresses (short `svc.ns.svc` names work with any cluster domain). */}}
{{- define "tomtransfer.serveServiceName" -}}
{{- printf "%s-serve-svc" (include "tomtransfer.fullname" .) -}}
{{- end -}}

{{- define "tomtransfer.serveUrl" -}}
{{- printf "http://%s.%s.svc:%d" (include "tomtransfer.serveServiceName" .) .Release.Namespace (int .Values.rayService.serve.port) -}}
{{- end -}}

{{- define "tomtransfer.mlflowServiceName" -}}
{{- printf "%s-mlflow" (include "tomtransfer.fullname" .) -}}
{{- end -}}

{{- define "tomtransfer.mlflowUrl" -}}
{{- printf "http://%s.%s.svc:%d" (include "tomtransfer.mlflowServiceName" .) .Release.Namespace (int .Values.mlflow.port) -}}
{{- end -}}

{{- define "tomtransfer.configDir" -}}/etc/tomtransfer{{- end -}}
{{- define "tomtransfer.homeDir" -}}/home/tomtransfer{{- end -}}

{{/*
Secret references: (list $ "hfToken") -> JSON {"name": ..., "key": ...} or {} when not configured.
A pre-created secret (secrets.<x>.name) wins over a development inline value.
*/}}
{{- define "tomtransfer.secretRef" -}}
{{- $root := index . 0 -}}
{{- $which := index . 1 -}}
{{- $s := index $root.Values.secrets $which -}}
{{- if $s.name -}}
{{- dict "name" $s.name "key" $s.key | toJson -}}
{{- else if index $root.Values.secrets.inline $which -}}
{{- dict "name" (printf "%s-secrets" (include "tomtransfer.fullname" $root)) "key" $which | toJson -}}
{{- else -}}
{{- dict | toJson -}}
{{- end -}}
{{- end -}}

{{/* The experiment config with the in-cluster defaults filled in (a dict, as YAML). */}}
{{- define "tomtransfer.experimentYaml" -}}
{{- $exp := deepCopy (default dict .Values.experiment) -}}
{{- $mlflow := default dict (get $exp "mlflow") -}}
{{- if and .Values.mlflow.enabled (not (get $mlflow "tracking_uri")) -}}
{{- $_ := set $mlflow "tracking_uri" (include "tomtransfer.mlflowUrl" .) -}}
{{- end -}}
{{- if $mlflow -}}
{{- $_ := set $exp "mlflow" $mlflow -}}
{{- end -}}
{{- $serving := default dict (get $exp "serving") -}}
{{- if and .Values.rayService.enabled (not (get $serving "base_url")) -}}
{{- $_ := set $serving "base_url" (include "tomtransfer.serveUrl" .) -}}
{{- end -}}
{{- if not (hasKey $serving "port") -}}
{{- $_ := set $serving "port" (int .Values.rayService.serve.port) -}}
{{- end -}}
{{- $auth := include "tomtransfer.secretRef" (list . "serveAuthToken") | fromJson -}}
{{- if and $auth.name (not (get $serving "auth_token_env")) -}}
{{- $_ := set $serving "auth_token_env" .Values.secrets.serveAuthToken.env -}}
{{- end -}}
{{- $_ := set $exp "serving" $serving -}}
{{- $key := include "tomtransfer.secretRef" (list . "teacherApiKey") | fromJson -}}
{{- $teacher := dig "models" "teacher" dict $exp -}}
{{- if and $key.name (eq (get $teacher "engine" | toString) "openai") (not (get $teacher "api_key_env")) -}}
{{- $_ := set $teacher "api_key_env" .Values.secrets.teacherApiKey.env -}}
{{- end -}}
{{- if not (get $exp "output_dir") -}}
{{- if .Values.storage.data.enabled -}}
{{- $_ := set $exp "output_dir" (printf "%s/runs" .Values.storage.data.mountPath) -}}
{{- else -}}
{{- $_ := set $exp "output_dir" "/tmp/tomtransfer/runs" -}}
{{- end -}}
{{- end -}}
{{- /* Adapters may be loaded only from the run outputs on the shared volume (where jobs train them). */ -}}
{{- if not (hasKey $serving "adapter_root") -}}
{{- $_ := set $serving "adapter_root" (get $exp "output_dir") -}}
{{- end -}}
{{- toYaml $exp -}}
{{- end -}}

{{/*
The part of the experiment the serving app reads (tomtransfer.services.teacher.app:build_app), inline in
serveConfigV2 as args.config_data: a change there is applied by Serve in place, and job-only sections
(generate, training, evaluate) and the sweep file never touch the serving cluster.
*/}}
{{- define "tomtransfer.servingConfig" -}}
{{- $exp := include "tomtransfer.experimentYaml" . | fromYaml -}}
{{- pick $exp "name" "output_dir" "models" "sampling" "scenarios" "serving" "mlflow" | toJson -}}
{{- end -}}

{{/* Checksum of what the job pods read from the ConfigMap (the experiment and the sweep file). */}}
{{- define "tomtransfer.configChecksum" -}}
{{- printf "%s\n%s" (include "tomtransfer.experimentYaml" .) (toYaml .Values.jobs.sweep.config) | sha256sum -}}
{{- end -}}

{{- define "tomtransfer.dataClaimName" -}}
{{- default (printf "%s-data" (include "tomtransfer.fullname" .)) .Values.storage.data.existingClaim -}}
{{- end -}}

{{/* One secretKeyRef env var: (dict "name" ENV "ref" REF) */}}
{{- define "tomtransfer.secretEnv" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ .ref.name }}
      key: {{ .ref.key }}
{{- end -}}

{{/* MLflow basic-auth credentials of the clients (MLFLOW_TRACKING_USERNAME/PASSWORD). */}}
{{- define "tomtransfer.mlflowAuthEnv" -}}
{{- $a := .Values.mlflow.auth -}}
{{- if and .Values.mlflow.enabled $a.enabled }}
{{ include "tomtransfer.secretEnv" (dict "name" "MLFLOW_TRACKING_USERNAME" "ref" (dict "name" $a.existingSecret.name "key" $a.existingSecret.usernameKey)) }}
{{ include "tomtransfer.secretEnv" (dict "name" "MLFLOW_TRACKING_PASSWORD" "ref" (dict "name" $a.existingSecret.name "key" $a.existingSecret.passwordKey)) }}
{{- end }}
{{- end -}}

{{/* Object-store environment (endpoint, region, credentials by reference). */}}
{{- define "tomtransfer.objectStoreEnv" -}}
{{- $os := .Values.storage.objectStore -}}
{{- if $os.endpointUrl }}
- name: AWS_ENDPOINT_URL
  value: {{ $os.endpointUrl | quote }}
- name: MLFLOW_S3_ENDPOINT_URL
  value: {{ $os.endpointUrl | quote }}
{{- end }}
{{- if $os.region }}
- name: AWS_DEFAULT_REGION
  value: {{ $os.region | quote }}
{{- end }}
{{- if $os.credentialsSecret.name }}
{{ include "tomtransfer.secretEnv" (dict "name" "AWS_ACCESS_KEY_ID" "ref" (dict "name" $os.credentialsSecret.name "key" $os.credentialsSecret.accessKeyIdKey)) }}
{{ include "tomtransfer.secretEnv" (dict "name" "AWS_SECRET_ACCESS_KEY" "ref" (dict "name" $os.credentialsSecret.name "key" $os.credentialsSecret.secretAccessKeyKey)) }}
{{- end }}
{{- end -}}

{{/*
Environment of a Ray container: (dict "root" $ "role" "serve"|"job").
Secrets only through secretKeyRef; the teacher API key only reaches the serving pods.
*/}}
{{- define "tomtransfer.rayEnv" -}}
{{- $root := .root -}}
- name: TOMTRANSFER_CONFIG
  value: {{ printf "%s/experiment.yaml" (include "tomtransfer.configDir" $root) | quote }}
- name: HOME
  value: {{ include "tomtransfer.homeDir" $root | quote }}
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
- name: PYTHONUNBUFFERED
  value: "1"
{{- if $root.Values.storage.data.enabled }}
{{- /* Shared caches: model aliases fetched once (tomtransfer models), adapters, Hugging Face. */}}
- name: TOMTRANSFER_CACHE
  value: {{ printf "%s/cache" $root.Values.storage.data.mountPath | quote }}
- name: HF_HOME
  value: {{ printf "%s/hf" $root.Values.storage.data.mountPath | quote }}
{{- end }}
{{- $tracking := dig "mlflow" "tracking_uri" "" (include "tomtransfer.experimentYaml" $root | fromYaml) }}
{{- if $tracking }}
- name: MLFLOW_TRACKING_URI
  value: {{ $tracking | quote }}
{{- end }}
{{- include "tomtransfer.mlflowAuthEnv" $root }}
{{- $hf := include "tomtransfer.secretRef" (list $root "hfToken") | fromJson }}
{{- if $hf.name }}
{{ include "tomtransfer.secretEnv" (dict "name" "HF_TOKEN" "ref" $hf) }}
{{- end }}
{{- $auth := include "tomtransfer.secretRef" (list $root "serveAuthToken") | fromJson }}
{{- if $auth.name }}
{{ include "tomtransfer.secretEnv" (dict "name" $root.Values.secrets.serveAuthToken.env "ref" $auth) }}
{{- end }}
{{- if eq .role "serve" }}
{{- $key := include "tomtransfer.secretRef" (list $root "teacherApiKey") | fromJson }}
{{- if $key.name }}
{{ include "tomtransfer.secretEnv" (dict "name" $root.Values.secrets.teacherApiKey.env "ref" $key) }}
{{- end }}
{{- end }}
{{- include "tomtransfer.objectStoreEnv" $root }}
{{- with $root.Values.ray.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- if eq .role "job" }}
{{- with $root.Values.jobs.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Writable scratch volumes of every container (the root filesystem is read-only). */}}
{{- define "tomtransfer.scratchVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.ray.tmpSizeLimit }}
- name: home
  emptyDir:
    sizeLimit: 10Gi
{{- end -}}

{{- define "tomtransfer.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: {{ include "tomtransfer.homeDir" . }}
{{- end -}}

{{/* Volumes of a Ray pod. */}}
{{- define "tomtransfer.rayVolumes" -}}
- name: experiment-config
  configMap:
    name: {{ include "tomtransfer.fullname" . }}-experiment
{{ include "tomtransfer.scratchVolumes" . }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.ray.shmSizeLimit }}
{{- if .Values.storage.data.enabled }}
- name: data
  persistentVolumeClaim:
    claimName: {{ include "tomtransfer.dataClaimName" . }}
{{- end }}
{{- end -}}

{{- define "tomtransfer.rayVolumeMounts" -}}
- name: experiment-config
  mountPath: {{ include "tomtransfer.configDir" . }}
  readOnly: true
{{ include "tomtransfer.scratchMounts" . }}
- name: dshm
  mountPath: /dev/shm
{{- if .Values.storage.data.enabled }}
- name: data
  mountPath: {{ .Values.storage.data.mountPath }}
{{- end }}
{{- end -}}

{{/* Container resources with `gpus` folded in as nvidia.com/gpu (requests == limits). */}}
{{- define "tomtransfer.groupResources" -}}
{{- $res := deepCopy (default dict .resources) -}}
{{- $gpus := int (default 0 .gpus) -}}
{{- if gt $gpus 0 -}}
{{- $limits := default dict (get $res "limits") -}}
{{- $_ := set $limits "nvidia.com/gpu" $gpus -}}
{{- $_ := set $res "limits" $limits -}}
{{- $requests := default dict (get $res "requests") -}}
{{- $_ := set $requests "nvidia.com/gpu" $gpus -}}
{{- $_ := set $res "requests" $requests -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}

{{/*
Pod template of a Ray head or worker:
(dict "root" $ "component" "serve"|"job" "stage" "" "head" true|false "group" GROUP
      "serve" true|false "autoscaler" true|false)
*/}}
{{- define "tomtransfer.rayPodTemplate" -}}
{{- $root := .root -}}
{{- $group := .group -}}
metadata:
  labels:
    {{- include "tomtransfer.componentLabels" (dict "root" $root "component" .component) | nindent 4 }}
    {{- if .stage }}
    tomtransfer.io/stage: {{ .stage }}
    {{- end }}
  {{- /* Serving pods carry no config checksum: their config is inline in serveConfigV2. */}}
  {{- $annotations := deepCopy (default dict $root.Values.podAnnotations) }}
  {{- if eq .component "job" }}
  {{- $_ := set $annotations "checksum/experiment" (include "tomtransfer.configChecksum" $root) }}
  {{- end }}
  {{- with $annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ include "tomtransfer.serviceAccountName" $root }}
  {{- /* Only an autoscaling head talks to the Kubernetes API (KubeRay binds the role to this account). */}}
  automountServiceAccountToken: {{ and .head .autoscaler }}
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- range . }}
    - name: {{ . }}
    {{- end }}
  {{- end }}
  {{- with $root.Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with (default $root.Values.nodeSelector $group.nodeSelector) }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with (default $root.Values.tolerations $group.tolerations) }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with (default $root.Values.affinity $group.affinity) }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if and .head .serve $root.Values.modelDownload.enabled }}
  initContainers:
    {{- include "tomtransfer.modelDownloadContainers" $root | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ ternary "ray-head" "ray-worker" .head }}
      image: {{ include "tomtransfer.image" $root | quote }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      ports:
        {{- if .head }}
        - name: gcs-server
          containerPort: 6379
        - name: dashboard
          containerPort: {{ $root.Values.ray.dashboardPort }}
        - name: client
          containerPort: 10001
        {{- end }}
        {{- if .serve }}
        - name: serve
          containerPort: {{ $root.Values.rayService.serve.port }}
        {{- end }}
        - name: metrics
          containerPort: 8080
      env:
        {{- include "tomtransfer.rayEnv" (dict "root" $root "role" .component) | nindent 8 }}
      resources:
        {{- include "tomtransfer.groupResources" $group | nindent 8 }}
      {{- if $root.Values.ray.probes.enabled }}
      {{- include "tomtransfer.rayProbes" (dict "root" $root "group" $group "head" .head "serve" .serve) | nindent 6 }}
      {{- end }}
      securityContext:
        {{- toYaml $root.Values.containerSecurityContext | nindent 8 }}
      lifecycle:
        preStop:
          exec:
            command: ["/bin/sh", "-c", "ray stop"]
      volumeMounts:
        {{- include "tomtransfer.rayVolumeMounts" $root | nindent 8 }}
  volumes:
    {{- include "tomtransfer.rayVolumes" $root | nindent 4 }}
{{- end -}}

{{/* rayStartParams of a head: a non-schedulable head advertises no CPUs. */}}
{{- define "tomtransfer.headStartParams" -}}
{{- $params := dict "dashboard-port" (toString .dashboardPort) -}}
{{- if and (hasKey .group "schedulable") (not .group.schedulable) -}}
{{- $_ := set $params "num-cpus" "0" -}}
{{- end -}}
{{- range $k, $v := (default dict .group.rayStartParams) -}}
{{- $_ := set $params $k (toString $v) -}}
{{- end -}}
{{- if $params -}}
{{- toYaml $params -}}
{{- else -}}
{}
{{- end -}}
{{- end -}}

{{- define "tomtransfer.startParams" -}}
{{- $params := dict -}}
{{- range $k, $v := (default dict .) -}}
{{- $_ := set $params $k (toString $v) -}}
{{- end -}}
{{- if $params -}}
{{- toYaml $params -}}
{{- else -}}
{}
{{- end -}}
{{- end -}}


{{/*
Probes of a Ray container: (dict "root" $ "group" GROUP "head" bool "serve" bool). KubeRay injects
its own probes only into a container that has none (pod.go initLivenessAndReadinessProbe): v1.4-1.5
always exec `wget ... | grep success`, v1.6+ an HTTP GET of /api/healthz for Ray >= 2.53, but still
wget for the readiness of RayService workers. These need neither wget nor a KubeRay version.
*/}}
{{- define "tomtransfer.rayProbes" -}}
{{- $p := .root.Values.ray.probes -}}
{{- $agent := int (default $p.agentPort (index (default dict .group.rayStartParams) "dashboard-agent-listen-port")) -}}
livenessProbe:
  httpGet:
    path: /api/healthz
    port: {{ $agent }}
  initialDelaySeconds: 30
  periodSeconds: 5
  timeoutSeconds: {{ ternary 5 2 .head }}
  failureThreshold: {{ $p.livenessFailureThreshold }}
readinessProbe:
  {{- if and .serve (not .head) }}
  {{- /* A serving worker takes traffic once its Serve proxy is up (the head's serve label is set by
         the RayService controller instead). */}}
  httpGet:
    path: /-/healthz
    port: {{ .root.Values.rayService.serve.port }}
  initialDelaySeconds: 10
  periodSeconds: 5
  timeoutSeconds: 2
  failureThreshold: 1
  {{- else }}
  httpGet:
    path: /api/healthz
    port: {{ $agent }}
  initialDelaySeconds: 10
  periodSeconds: 5
  timeoutSeconds: {{ ternary 5 2 .head }}
  failureThreshold: {{ $p.readinessFailureThreshold }}
  {{- end }}
{{- end -}}

{{/* Init containers that download the Hugging Face repos into the shared cache (modelDownload). */}}
{{- define "tomtransfer.modelDownloadContainers" -}}
{{- $root := . -}}
{{- if not .Values.storage.data.enabled -}}
{{- fail "modelDownload needs storage.data.enabled (the weights go to the shared volume)" -}}
{{- end -}}
{{- if not .Values.modelDownload.repos -}}
{{- fail "modelDownload.enabled needs modelDownload.repos (e.g. [{id: org/model, allowPatterns: ['*.safetensors', '*.json']}])" -}}
{{- end -}}
{{- $hf := include "tomtransfer.secretRef" (list . "hfToken") | fromJson -}}
{{- range $i, $repo := .Values.modelDownload.repos }}
{{- $args := list "download" $repo.id }}
{{- with $repo.revision }}{{ $args = concat $args (list "--revision" .) }}{{ end }}
{{- range (default list $repo.allowPatterns) }}{{ $args = concat $args (list "--include" .) }}{{ end }}
- name: {{ printf "fetch-model-%d" $i }}
  image: {{ include "tomtransfer.image" $root | quote }}
  imagePullPolicy: {{ $root.Values.image.pullPolicy }}
  command: ["hf"]
  args:
    {{- toYaml $args | nindent 4 }}
  env:
    - name: HOME
      value: {{ include "tomtransfer.homeDir" $root | quote }}
    - name: HF_HOME
      value: {{ printf "%s/hf" $root.Values.storage.data.mountPath | quote }}
    - name: HF_HUB_DISABLE_TELEMETRY
      value: "1"
    {{- if $hf.name }}
    {{- include "tomtransfer.secretEnv" (dict "name" "HF_TOKEN" "ref" $hf) | nindent 4 }}
    {{- end }}
  resources:
    {{- toYaml $root.Values.modelDownload.resources | nindent 4 }}
  securityContext:
    {{- toYaml $root.Values.containerSecurityContext | nindent 4 }}
  volumeMounts:
    {{- include "tomtransfer.scratchMounts" $root | nindent 4 }}
    - name: data
      mountPath: {{ $root.Values.storage.data.mountPath }}
{{- end }}
{{- end -}}
