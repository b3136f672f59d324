{{/*
Helpers of the specmesh chart.

Names and labels shared with the control plane live in specmesh/k8s.py (LABEL_AGENT,
LABEL_TRACK, service_account_name, A2A_HTTP_PORT) and
specmesh/names.py (resource_name); tests/unit/test_helm_chart.py joins both sides.
*/}}

{{/* The logical agent name pattern of specmesh.names.LOGICAL_NAME_PATTERN. */}}
{{- define "specmesh.logicalNamePattern" -}}
^[A-Za-z]([A-Za-z0-9_.-]*[A-Za-z0-9])?$
{{- end }}

{{/*
specmesh.resourceName: a logical agent name -> its DNS-1123 resource name, exactly like
specmesh.names.resource_name: lower-case, "_" and "." -> "-". Fails on an invalid name.
*/}}
{{- define "specmesh.resourceName" -}}
{{- $name := toString . -}}
{{- if or (eq $name "") (gt (len $name) 63) (not (regexMatch (include "specmesh.logicalNamePattern" dict) $name)) -}}
{{- fail (printf "agents: invalid agent name %q: must be 1-63 characters, start with a letter, end with a letter or digit, and hold only letters, digits, '-', '_' and '.'" $name) -}}
{{- end -}}
{{- $name | lower | replace "_" "-" | replace "." "-" -}}
{{- end }}

{{/* specmesh.k8s.service_account_name */}}
{{- define "specmesh.agentServiceAccount" -}}
specmesh-agent-{{ include "specmesh.resourceName" . }}
{{- end }}

{{/* Chart name, release-scoped full name (for the control plane's objects). */}}
{{- define "specmesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end }}

{{- define "specmesh.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end }}

{{- define "specmesh.controlPlane.fullname" -}}
{{- printf "%s-control-plane" (include "specmesh.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end }}

{{- define "specmesh.controlPlane.serviceAccount" -}}
{{- include "specmesh.controlPlane.fullname" . -}}
{{- end }}

{{/* Labels on every object. */}}
{{- define "specmesh.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "specmesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: specmesh
{{- end }}

{{/*
Labels of one agent's objects; args: dict "root" $ "agent" <logical name>. The control
plane's Kubernetes runtime renders these templates and owns the objects (server-side apply,
field manager specmesh-controller): it finds and prunes them by managed-by=specmesh plus
specmesh.io/agent (specmesh/k8s.py LABEL_MANAGED_BY, MANAGED_BY, LABEL_AGENT), so they
say so even when Helm renders them.
*/}}
{{- define "specmesh.agentLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "specmesh.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: specmesh
app.kubernetes.io/part-of: specmesh
app.kubernetes.io/component: agent
specmesh.io/agent: {{ include "specmesh.resourceName" .agent }}
{{- end }}

{{/*
Pod labels of one agent track; args: dict "root" $ "agent" <logical name> "track" <track>.
specmesh.io/agent + specmesh.io/track are what the control plane's Service, DestinationRule
subsets and AuthorizationPolicy select; app/version are what Istio's telemetry likes.
*/}}
{{- define "specmesh.agentPodLabels" -}}
{{ include "specmesh.agentSelector" . }}
app: {{ include "specmesh.resourceName" .agent }}
version: {{ .track }}
app.kubernetes.io/name: {{ include "specmesh.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: agent
app.kubernetes.io/part-of: specmesh
{{- if .root.Values.istio.enabled }}
sidecar.istio.io/inject: "true"
service.istio.io/canonical-name: {{ include "specmesh.resourceName" .agent }}
service.istio.io/canonical-revision: {{ .track }}
{{- end }}
{{- end }}

{{/* Deployment selector of one agent track (immutable: agent + track labels only). */}}
{{- define "specmesh.agentSelector" -}}
specmesh.io/agent: {{ include "specmesh.resourceName" .agent }}
specmesh.io/track: {{ .track }}
{{- end }}

{{/*
One agent's values: agentDefaults deep-merged with the agent's entry (the entry wins).
Args: dict "root" $ "agent" <agent entry>. Returns YAML (use with fromYaml).
*/}}
{{- define "specmesh.agentValues" -}}
{{- $defaults := deepCopy .root.Values.agentDefaults -}}
{{- $base := dict "tracks" (dict "stable" (dict "replicas" 1) "canary" (dict "enabled" false "replicas" 1)) -}}
{{- $merged := mergeOverwrite $base $defaults (deepCopy .agent) -}}
{{- toYaml $merged -}}
{{- end }}

{{/*
Refuses agent lists the schema cannot: two logical names with the same resource name
(scheduleX-assistant and schedulex_assistant), as the store does.
*/}}
{{- define "specmesh.checkAgents" -}}
{{- $seen := dict -}}
{{- range .Values.agents -}}
{{- $rn := include "specmesh.resourceName" .name -}}
{{- if hasKey $seen $rn -}}
{{- fail (printf "agents: agent names %q and %q both map to resource name %q" (get $seen $rn) .name $rn) -}}
{{- end -}}
{{- $_ := set $seen $rn .name -}}
{{- $a := include "specmesh.agentValues" (dict "root" $ "agent" .) | fromYaml -}}
{{- if and $a.autoscaling.enabled (gt (int $a.autoscaling.min) (int $a.autoscaling.max)) -}}
{{- fail (printf "agents[%s].autoscaling: min (%v) must be <= max (%v)" .name $a.autoscaling.min $a.autoscaling.max) -}}
{{- end -}}
{{- end -}}
{{- end }}

{{- define "specmesh.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ default .Chart.AppVersion .Values.image.tag }}
{{- end -}}
{{- end }}

{{/* Container securityContext: non-root, read-only root filesystem, no capabilities. */}}
{{- define "specmesh.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "specmesh.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Pod-identity variables that later ones refer to with $(VAR). */}}
{{- define "specmesh.downwardEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef: {fieldPath: metadata.name}
- name: POD_NAMESPACE
  valueFrom:
    fieldRef: {fieldPath: metadata.namespace}
- name: POD_IP
  valueFrom:
    fieldRef: {fieldPath: status.podIP}
{{- end }}

{{/*
OpenTelemetry exporter settings -> OTEL_* variables. Args: dict "root" $ "attrs" <extra
resource attributes, "k=v,...">. Nothing but the resource attributes when no endpoint.
*/}}
{{- define "specmesh.otelEnv" -}}
{{- $otel := .root.Values.otel -}}
{{- $attrs := list "k8s.namespace.name=$(POD_NAMESPACE)" "k8s.pod.name=$(POD_NAME)" -}}
{{- if .attrs }}{{ $attrs = append $attrs .attrs }}{{ end -}}
{{- if $otel.resourceAttributes }}{{ $attrs = append $attrs $otel.resourceAttributes }}{{ end -}}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ join "," $attrs | quote }}
{{- if $otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $otel.endpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ $otel.protocol | quote }}
- name: OTEL_TRACES_SAMPLER
  value: {{ $otel.tracesSampler | quote }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ $otel.tracesSamplerArg | quote }}
{{- if $otel.headersSecret.name }}
- name: OTEL_EXPORTER_OTLP_HEADERS
  valueFrom:
    secretKeyRef:
      name: {{ $otel.headersSecret.name }}
      key: {{ $otel.headersSecret.key }}
{{- end }}
{{- end }}
{{- end }}

{{/* Vault connection variables (sidecar, control plane). Args: dict "root" $ "role" <role>. */}}
{{- define "specmesh.vaultEnv" -}}
{{- $v := .root.Values.vault -}}
- name: SPECMESH_VAULT_ADDR
  value: {{ $v.addr | quote }}
- name: SPECMESH_VAULT_K8S_ROLE
  value: {{ .role | quote }}
- name: SPECMESH_VAULT_K8S_MOUNT
  value: {{ $v.kubernetesAuthMount | quote }}
- name: SPECMESH_VAULT_K8S_TOKEN_PATH
  value: /var/run/secrets/specmesh/vault/token
- name: SPECMESH_VAULT_KV_MOUNT
  value: {{ $v.kvMount | quote }}
{{- if $v.caConfigMap.name }}
- name: VAULT_CACERT
  value: /etc/specmesh/vault-ca/{{ $v.caConfigMap.key }}
- name: REQUESTS_CA_BUNDLE
  value: /etc/specmesh/vault-ca/{{ $v.caConfigMap.key }}
{{- end }}
{{- end }}

{{/* Volumes for Vault: the projected ServiceAccount token (+ the CA bundle). */}}
{{- define "specmesh.vaultVolumes" -}}
{{- $v := .Values.vault -}}
- name: vault-token
  projected:
    sources:
      - serviceAccountToken:
          path: token
          expirationSeconds: {{ $v.tokenExpirationSeconds }}
          {{- if $v.tokenAudience }}
          audience: {{ $v.tokenAudience | quote }}
          {{- end }}
{{- if $v.caConfigMap.name }}
- name: vault-ca
  configMap:
    name: {{ $v.caConfigMap.name }}
{{- end }}
{{- end }}

{{- define "specmesh.vaultMounts" -}}
- name: vault-token
  mountPath: /var/run/secrets/specmesh/vault
  readOnly: true
{{- if .Values.vault.caConfigMap.name }}
- name: vault-ca
  mountPath: /etc/specmesh/vault-ca
  readOnly: true
{{- end }}
{{- end }}

{{/*
Exec probes of the engine. Its listeners stay on loopback (docs/runtime.md: the engine is
reached only through the sidecar), and kubelet httpGet/tcpSocket probes would come from the
node to the pod IP, so the probe runs inside the container: readiness GETs /readyz,
liveness only checks that the HTTP listener accepts connections (a not-ready engine, e.g.
waiting for its first spec, is not restarted).
*/}}
{{- define "specmesh.engineReadyCommand" -}}
- python
- -I
- -c
- "import sys, urllib.request as r; r.build_opener(r.ProxyHandler({})).open(sys.argv[1], timeout=2)"
- http://127.0.0.1:7103/readyz
{{- end }}

{{- define "specmesh.engineAliveCommand" -}}
- python
- -I
- -c
- "import socket, sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=2).close()"
- "7103"
{{- end }}

{{/* The mesh publisher's rights on the Istio objects it owns (server-side apply, prune). */}}
{{- define "specmesh.meshRules" -}}
- apiGroups: ["networking.istio.io"]
  resources: ["virtualservices", "destinationrules"]
  verbs: ["get", "list", "create", "patch", "delete"]
- apiGroups: ["security.istio.io"]
  resources: ["authorizationpolicies", "peerauthentications", "requestauthentications"]
  verbs: ["get", "list", "create", "patch", "delete"]
{{- if eq .Values.istio.routes "gateway-api" }}
- apiGroups: ["gateway.networking.k8s.io"]
  resources: ["httproutes", "grpcroutes"]
  verbs: ["get", "list", "create", "patch", "delete"]
{{- end }}
{{- end }}

{{/*
The trusted JWT issuers as SPECMESH_JWT_ISSUERS JSON (specmesh/issuers.py: the one format
the sidecars and the control plane read): the control plane's own issuer first (its JWKS
on its Service), then jwt.issuers. An issuer without audiences gets none in the JSON, so
the default ["{agent}"] applies (never [], which would mean "any audience").
*/}}
{{- define "specmesh.jwtIssuers" -}}
{{- include "specmesh.checkJwtIssuers" . -}}
{{- $jwks := printf "http://%s.%s.svc.cluster.local:%v/.well-known/jwks.json" (include "specmesh.controlPlane.fullname" .) .Release.Namespace .Values.controlPlane.httpPort -}}
{{- $own := dict "issuer" .Values.jwt.controlPlaneIssuer "jwksUri" $jwks "jwks" nil -}}
{{- with .Values.jwt.controlPlaneAudiences }}{{ $_ := set $own "audiences" . }}{{ end -}}
{{- $all := list $own -}}
{{- range .Values.jwt.issuers }}
{{- $entry := dict "issuer" .issuer "jwksUri" (.jwksUri | default nil) "jwks" (.jwks | default nil) -}}
{{- with .audiences }}{{ $_ := set $entry "audiences" . }}{{ end -}}
{{- $all = append $all $entry -}}
{{- end }}
{{- toJson $all -}}
{{- end }}

{{/*
Refuses issuer lists the schema cannot (the sidecars and the control plane refuse them
too, at start): an issuer listed twice, or one that is another followed by "/" -- request
principals are <iss>/<sub>, so issuer "a" with subject "b/x" and issuer "a/b" with subject
"x" would be one caller.
*/}}
{{- define "specmesh.checkJwtIssuers" -}}
{{- $names := list .Values.jwt.controlPlaneIssuer -}}
{{- range .Values.jwt.issuers }}{{ $names = append $names .issuer }}{{ end -}}
{{- range $i, $a := $names }}
{{- range $j, $b := $names }}
{{- if and (lt $i $j) (eq $a $b) -}}
{{- fail (printf "jwt.issuers: issuer %q is listed twice (the control plane's own issuer is jwt.controlPlaneIssuer)" $a) -}}
{{- end -}}
{{- if and (ne $i $j) (hasPrefix (printf "%s/" $a) $b) -}}
{{- fail (printf "jwt.issuers: issuers %q and %q overlap: request principals are <iss>/<sub>, so %q with subject \"<rest>/x\" and %q with subject \"x\" would be the same caller" $a $b $a $b) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end }}

{{/*
The A2A task store (taskStore; docs/deploy.md "The A2A task store"). The engine reaches it
only through its sidecar's task-store proxy, on this loopback address, and holds no secret.
*/}}
{{- define "specmesh.taskStoreProxy" -}}
127.0.0.1:7107
{{- end }}

{{/*
Refuses taskStore values the schema cannot: a shared password inside an agent's tree or the
control plane's (the control plane's SPECMESH_TASK_STORE_PASSWORD refuses both: every
agent's policy would read that agent's secrets, or the token-signing key).
*/}}
{{- define "specmesh.checkTaskStore" -}}
{{- $ts := .Values.taskStore -}}
{{- if and $ts.passwordRef (regexMatch "^vault://[^/]+/specmesh/agents/" $ts.passwordRef) -}}
{{- fail (printf "taskStore.passwordRef: %q lies in an agent's tree (specmesh/agents/...), which every agent would then read; put the shared password elsewhere (e.g. vault://%s/specmesh/infra/task-store#password), or set taskStore.perAgentUser for one password per agent" $ts.passwordRef .Values.vault.kvMount) -}}
{{- end -}}
{{- if and $ts.passwordRef (regexMatch "^vault://[^/]+/specmesh/control-plane(/|#)" $ts.passwordRef) -}}
{{- fail (printf "taskStore.passwordRef: %q lies in the control plane's own tree (specmesh/control-plane/, its token-signing key), which no agent may read; put the shared password elsewhere (e.g. vault://%s/specmesh/infra/task-store#password)" $ts.passwordRef .Values.vault.kvMount) -}}
{{- end -}}
{{- end }}

{{/*
The upstream URL and password reference of one agent's task-store proxy, as YAML
{upstream, passwordRef}; args: dict "root" $ "rn" <resource name>. Per-agent mode: the
agent's own Redis ACL user tasks-<rn> and its password in the agent's own tree.
*/}}
{{- define "specmesh.taskStoreUpstream" -}}
{{- $ts := .root.Values.taskStore -}}
{{- if $ts.perAgentUser -}}
{{- $u := urlParse $ts.upstream -}}
upstream: {{ printf "%s://tasks-%s@%s%s" $u.scheme .rn $u.host $u.path | quote }}
passwordRef: {{ printf "vault://%s/specmesh/agents/%s/task-store#password" .root.Values.vault.kvMount .rn | quote }}
{{- else -}}
upstream: {{ $ts.upstream | quote }}
passwordRef: {{ $ts.passwordRef | quote }}
{{- end -}}
{{- end }}

{{/* The TCP port of the task store's Redis (the upstream's, else 6379). */}}
{{- define "specmesh.taskStorePort" -}}
{{- (urlParse .Values.taskStore.upstream).host | regexFind ":[0-9]+$" | trimPrefix ":" | default "6379" -}}
{{- end }}

{{/* The DNS name of an agent's Service; arg: dict "root" $ "agent" <logical name>. */}}
{{- define "specmesh.agentServiceHost" -}}
{{- printf "%s.%s.svc.cluster.local" (include "specmesh.resourceName" .agent) .root.Release.Namespace -}}
{{- end }}
