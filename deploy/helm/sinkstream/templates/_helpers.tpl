{{/* Names and labels. */}}
{{- define "sinkstream.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "sinkstream.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: consumer
{{- end -}}

{{- define "sinkstream.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "sinkstream.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Where the model comes from, as config.yaml's model.name. */}}
{{- define "sinkstream.modelName" -}}
{{- if eq .Values.model.source "baked" -}}
{{- .Values.model.name -}}
{{- else -}}
{{- required "model.path is required for model.source pvc/init (directory under /models)" .Values.model.path
    | trimPrefix "/" | printf "/models/%s" -}}
{{- end -}}
{{- end -}}

{{- define "sinkstream.kafkaTls" -}}
{{- if has .Values.kafka.securityProtocol (list "SSL" "SASL_SSL") }}true{{ end -}}
{{- end -}}

{{- define "sinkstream.kafkaSasl" -}}
{{- if has .Values.kafka.securityProtocol (list "SASL_PLAINTEXT" "SASL_SSL") }}true{{ end -}}
{{- end -}}

{{/* Render-time checks of values that depend on each other (the JSON schema checks each value alone). */}}
{{- define "sinkstream.validate" -}}
{{- $v := .Values -}}
{{- if and (not $v.keda.enabled) (gt (int $v.replicas) (int $v.kafka.partitions)) -}}
{{- fail (printf "replicas (%d) must be <= kafka.partitions (%d): extra consumers get no partition" (int $v.replicas) (int $v.kafka.partitions)) -}}
{{- end -}}
{{- if $v.keda.enabled -}}
{{- if gt (int $v.keda.maxReplicaCount) (int $v.kafka.partitions) -}}
{{- fail (printf "keda.maxReplicaCount (%d) must be <= kafka.partitions (%d)" (int $v.keda.maxReplicaCount) (int $v.kafka.partitions)) -}}
{{- end -}}
{{- if gt (int $v.keda.minReplicaCount) (int $v.keda.maxReplicaCount) -}}
{{- fail (printf "keda.minReplicaCount (%d) must be <= keda.maxReplicaCount (%d)" (int $v.keda.minReplicaCount) (int $v.keda.maxReplicaCount)) -}}
{{- end -}}
{{- if le (int $v.keda.lagThreshold) (int $v.checkpoint.everyRecords) -}}
{{- fail (printf "keda.lagThreshold (%d) must be > checkpoint.everyRecords (%d): committed offsets trail by up to one checkpoint interval" (int $v.keda.lagThreshold) (int $v.checkpoint.everyRecords)) -}}
{{- end -}}
{{- /* Committed offsets trail by up to everyRecords per partition even when caught up: that noise alone
       (partitions x everyRecords in total) must not ask for more than minReplicaCount replicas. */ -}}
{{- $noise := mul (int $v.kafka.partitions) (int $v.checkpoint.everyRecords) -}}
{{- $floor := max 1 (int $v.keda.minReplicaCount) -}}
{{- if lt (mul (int $v.keda.lagThreshold) $floor) $noise -}}
{{- fail (printf "keda.lagThreshold (%d) x max(1, keda.minReplicaCount) (%d) must be >= kafka.partitions x checkpoint.everyRecords (%d): checkpoint-lagged commits alone would scale out" (int $v.keda.lagThreshold) $floor $noise) -}}
{{- end -}}
{{- $session := div (int $v.kafka.sessionTimeoutMs) 1000 -}}
{{- if lt (int $v.keda.cooldownPeriod) (int $session) -}}
{{- fail (printf "keda.cooldownPeriod (%ds) must be >= kafka.sessionTimeoutMs (%ds)" (int $v.keda.cooldownPeriod) (int $session)) -}}
{{- end -}}
{{- if lt (int $v.keda.scaleDownStabilizationSeconds) (int $session) -}}
{{- fail (printf "keda.scaleDownStabilizationSeconds (%ds) must be >= kafka.sessionTimeoutMs (%ds)" (int $v.keda.scaleDownStabilizationSeconds) (int $session)) -}}
{{- end -}}
{{- end -}}
{{- if and (include "sinkstream.kafkaSasl" .) (not $v.kafka.saslUsername) -}}
{{- fail (printf "kafka.saslUsername is required with kafka.securityProtocol %s" $v.kafka.securityProtocol) -}}
{{- end -}}
{{- if and $v.kafka.tls.clientCertificate (not $v.kafka.tls.secretName) -}}
{{- fail "kafka.tls.clientCertificate needs kafka.tls.secretName (a Secret with ca.crt, tls.crt, tls.key)" -}}
{{- end -}}
{{- if and $v.redis.tls.secretName (not (hasPrefix "rediss://" $v.redis.url)) -}}
{{- fail (printf "redis.tls.secretName is set but redis.url is not rediss://: %s" $v.redis.url) -}}
{{- end -}}
{{- if and (eq $v.model.source "pvc") (not $v.model.pvc.claimName) (not $v.model.pvc.create) -}}
{{- fail "model.source pvc needs model.pvc.claimName (an existing claim) or model.pvc.create: true" -}}
{{- end -}}
{{- if and (eq $v.model.source "init") (not $v.model.init.image) -}}
{{- fail "model.source init needs model.init.image" -}}
{{- end -}}
{{- end -}}

{{- define "sinkstream.pvcName" -}}
{{- default (printf "%s-model" (include "sinkstream.fullname" .)) .Values.model.pvc.claimName -}}
{{- end -}}

{{/* The whole config.yaml: structured values over extraConfig. */}}
{{- define "sinkstream.config" -}}
{{- $v := .Values -}}
{{- $kafka := dict
    "bootstrap_servers" $v.kafka.bootstrapServers
    "input_topic" $v.kafka.inputTopic
    "output_topic" $v.kafka.outputTopic
    "group_id" $v.kafka.groupId
    "auto_offset_reset" $v.kafka.autoOffsetReset
    "max_poll_records" $v.kafka.maxPollRecords
    "session_timeout_ms" $v.kafka.sessionTimeoutMs
    "max_poll_interval_ms" $v.kafka.maxPollIntervalMs
    "security_protocol" $v.kafka.securityProtocol -}}
{{- if include "sinkstream.kafkaSasl" . -}}
{{- $_ := set $kafka "sasl_mechanism" $v.kafka.saslMechanism -}}
{{- $_ := set $kafka "sasl_username" $v.kafka.saslUsername -}}
{{- end -}}
{{- if and (include "sinkstream.kafkaTls" .) $v.kafka.tls.secretName -}}
{{- $_ := set $kafka "ssl_cafile" "/etc/sinkstream-secrets/kafka/ca.crt" -}}
{{- if $v.kafka.tls.clientCertificate -}}
{{- $_ := set $kafka "ssl_certfile" "/etc/sinkstream-secrets/kafka/tls.crt" -}}
{{- $_ := set $kafka "ssl_keyfile" "/etc/sinkstream-secrets/kafka/tls.key" -}}
{{- end -}}
{{- end -}}
{{- $redis := dict "url" $v.redis.url "key_prefix" $v.redis.keyPrefix "socket_timeout_s" $v.redis.socketTimeoutS -}}
{{- if $v.redis.tls.secretName -}}
{{- $_ := set $redis "ssl_ca_certs" "/etc/sinkstream-secrets/redis/ca.crt" -}}
{{- end -}}
{{- $cfg := dict
    "log_format" "json"
    "log_level" $v.logLevel
    "model" (dict "name" (include "sinkstream.modelName" .)
                  "device" (ternary "cuda" "cpu" (eq $v.device "gpu"))
                  "dtype" $v.model.dtype
                  "threads" $v.model.threads
                  "row_plans" "/tmp/sinkstream-row-plans")
    "cache" (dict "sinks" $v.cache.sinks "window" $v.cache.window "chunk" $v.cache.chunk)
    "kafka" $kafka
    "redis" $redis
    "checkpoint" (dict "every_records" $v.checkpoint.everyRecords "every_seconds" $v.checkpoint.everySeconds)
    "service" (dict "max_resident_streams" $v.cache.maxResidentStreams
                    "metrics_port" $v.metrics.port
                    "metrics_host" $v.metrics.host) -}}
{{- toYaml (mustMergeOverwrite (deepCopy $v.extraConfig) $cfg) -}}
{{- end -}}
