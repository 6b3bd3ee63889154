{{- define "emgate.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "emgate.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Selector labels of one component: include "emgate.selector" (list . "mlflow") */}}
{{- define "emgate.selector" -}}
{{- $ := index . 0 -}}
app.kubernetes.io/name: {{ $.Chart.Name }}
app.kubernetes.io/instance: {{ $.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "emgate.mlflowSelector" -}}
{{- include "emgate.selector" (list . "mlflow") -}}
{{- end -}}

{{- define "emgate.mlflowHost" -}}
{{- printf "%s-mlflow.%s.svc.cluster.local" (include "emgate.fullname" .) .Release.Namespace -}}
{{- end -}}

{{- define "emgate.mlflowUrl" -}}
{{- printf "http://%s:%d" (include "emgate.mlflowHost" .) (int .Values.mlflow.port) -}}
{{- end -}}

{{- define "emgate.gateImage" -}}
{{- printf "%s/emgate-gate:%s" .Values.image.registry (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Pod-level security context: non-root with a fixed uid/gid, RuntimeDefault seccomp. Arg: uid */}}
{{- define "emgate.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ . }}
runAsGroup: {{ . }}
fsGroup: {{ . }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Container-level security context, the same for every container and init container */}}
{{- define "emgate.containerSecurityContext" -}}
runAsNonRoot: true
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Volume of the MLflow server: needed for the SQLite stores and for artifacts on local disk */}}
{{- define "emgate.mlflowNeedsVolume" -}}
{{- if or (eq .Values.mlflow.backend "sqlite") (not (hasPrefix "s3://" .Values.mlflow.artifactRoot)) -}}true{{- end -}}
{{- end -}}

{{/* Env entries that define MLFLOW_BACKEND_DSN for the postgresql and external backends (nothing for sqlite) */}}
{{- define "emgate.mlflowDsnEnv" -}}
{{- $m := .Values.mlflow -}}
{{- if eq $m.backend "external" }}
- name: MLFLOW_BACKEND_DSN
  valueFrom:
    secretKeyRef:
      name: {{ $m.externalDsnSecret.name }}
      key: {{ $m.externalDsnSecret.key }}
{{- else if eq $m.backend "postgresql" }}
{{- $pg := .Values.postgresql }}
- name: POSTGRES_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $pg.passwordSecret.name }}
      key: {{ $pg.passwordSecret.key }}
- name: MLFLOW_BACKEND_DSN
  value: {{ printf "postgresql://%s:$(POSTGRES_PASSWORD)@%s-postgres.%s.svc.cluster.local:5432/%s" $pg.username (include "emgate.fullname" .) .Release.Namespace $pg.database | quote }}
{{- end }}
{{- end -}}
