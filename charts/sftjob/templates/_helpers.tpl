{{/* Object name: the release name (or fullnameOverride). Pod hostnames are <name>-<index>, so keep it short. */}}
{{- define "sftjob.fullname" -}}
{{- $name := default .Release.Name .Values.fullnameOverride -}}
{{- if gt (len $name) 53 -}}
{{- fail (printf "name %q is longer than 53 characters: pod hostnames are <name>-<index> (63 max); set fullnameOverride" $name) -}}
{{- end -}}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" $name) -}}
{{- fail (printf "name %q may contain only a-z, 0-9 and '-' (it names the Job and the pods' hostnames); set fullnameOverride" $name) -}}
{{- end -}}
{{- if and (gt (int .Values.nodes) 1) (not (regexMatch "^[a-z]" $name)) -}}
{{- fail (printf "name %q must start with a letter when nodes > 1 (it names the headless Service); set fullnameOverride" $name) -}}
{{- end -}}
{{- $name -}}
{{- end -}}

{{- define "sftjob.selectorLabels" -}}
app.kubernetes.io/name: sftjob
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "sftjob.labels" -}}
{{ include "sftjob.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: trainer
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- with .Values.labels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "sftjob.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "sftjob.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "sftjob.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ default .Chart.AppVersion .Values.image.tag }}
{{- end -}}
{{- end -}}

{{/* run.resilience.grace_seconds, with RunSpec's default (a test keeps the two equal). */}}
{{- define "sftjob.graceSeconds" -}}
{{- $res := (default dict .Values.run).resilience | default dict -}}
{{- $res.grace_seconds | default 120 | int -}}
{{- end -}}

{{/* RunSpec's ResilienceSpec.MIN_GRACE_SECONDS: the trainer's SFTJOB_GRACE_SECONDS must meet it (a test renders both sides). */}}
{{- define "sftjob.minGraceSeconds" -}}
30
{{- end -}}

{{/* Non-retryable exit codes: job/errors.py NON_RETRYABLE, sorted (the API requires it); a test compares. */}}
{{- define "sftjob.nonRetryableExitCodes" -}}
[64, 65, 66, 73, 77, 78]
{{- end -}}

{{/* run.output.uri; `output:` may also be the shorthand string. */}}
{{- define "sftjob.outputUri" -}}
{{- $out := (default dict .Values.run).output -}}
{{- if kindIs "string" $out -}}{{ $out }}{{- else if kindIs "map" $out -}}{{ $out.uri | default "" }}{{- end -}}
{{- end -}}
