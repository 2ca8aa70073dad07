"""The Helm chart, rendered by Helm's own engine for every shipped variant: strict Kubernetes schemas, the CRD
objects against their vendored schemas (deploy/schemas), the scaling/alerting/network rules against the
service's settings, the Grafana dashboard, and values that must be refused."""

from __future__ import annotations

import copy
import json
import re
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import helm_python as helm
import jsonschema
import kubernetes_validate
import promql_parser
import pytest
import yaml

from tests.deploy.rendering import (
    CHART,
    DEPLOY,
    VARIANTS,
    by_kind,
    consumer,
    container,
    embedded_config,
    render_chart,
    rendered,
    rendered_text,
)

K8S_VERSION = "1.30.0"
SCHEMAS = DEPLOY / "schemas"
BROKEN = Path(__file__).parent / "broken"
ROOT = DEPLOY.parent

# The service's metrics contract (deploy/README.md, "Metrics"): dashboards and alerts may use only these.
METRICS = {
    "sinkstream_partition_lag_records": "gauge",
    "sinkstream_records_total": "counter",
    "sinkstream_tokens_total": "counter",
    "sinkstream_checkpoint_age_seconds": "gauge",
    "sinkstream_checkpoint_seconds": "histogram",
    "sinkstream_checkpoint_size_bytes": "histogram",
    "sinkstream_checkpoint_failures_total": "counter",
    "sinkstream_resident_streams": "gauge",
    "sinkstream_streams_spilled_total": "counter",
    "sinkstream_streams_reloaded_total": "counter",
    "sinkstream_cache_evictions_total": "counter",
    "sinkstream_model_step_seconds": "histogram",
    "sinkstream_batch_tokens": "histogram",
    "sinkstream_batch_streams": "histogram",
    "sinkstream_errors_total": "counter",
    "sinkstream_kafka_up": "gauge",
    "sinkstream_redis_up": "gauge",
    "sinkstream_build_info": "info",
    "sinkstream_annotations_total": "counter",
    "sinkstream_assigned_partitions": "gauge",
    "sinkstream_ready": "gauge",
    "sinkstream_state_losses_total": "counter",
}
# Series that are not sinkstream's own: Prometheus' scrape health and kube-state-metrics (crash loops).
FOREIGN_SERIES = {"up", "kube_pod_container_status_restarts_total", "kube_pod_container_status_waiting_reason"}
ERROR_TYPES = {"bad_input", "redis", "kafka", "snapshot_refused", "fenced", "model_step", "state_lost"}


def series_allowed(name: str) -> bool:
    if name in METRICS or name in FOREIGN_SERIES:
        return True
    base, _, suffix = name.rpartition("_")
    return suffix in {"bucket", "sum", "count"} and METRICS.get(base) == "histogram"


def metric_of(series: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if series.endswith(suffix) and METRICS.get(series.removesuffix(suffix)) == "histogram":
            return series.removesuffix(suffix)
    return series


def selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    """(metric name, {label: value}) of every vector selector in a PromQL expression; raises on bad syntax."""
    found: list[tuple[str, dict[str, str]]] = []

    def walk(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            labels = {m.name: m.value for m in node.matchers.matchers}
            found.append((node.name or labels.get("__name__", ""), labels))
        for attr in ("lhs", "rhs", "expr", "args", "param", "vector_selector"):
            child = getattr(node, attr, None)
            for c in child if isinstance(child, list) else [child]:
                if c is not None and hasattr(c, "prettify"):
                    walk(c)

    walk(promql_parser.parse(expr))
    return found


# --- every variant: render, strict schemas, lint ------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_objects_pass_strict_kubernetes_schema(variant: str) -> None:
    docs = rendered(variant)
    builtin = [d for d in docs if d["kind"] not in CRD_KINDS]
    assert builtin, f"{variant}: nothing rendered"
    for doc in builtin:
        assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True) == "1.30", doc["metadata"]["name"]


def _strict(schema: Any) -> Any:
    """A CRD schema as the API server applies it: unknown fields are errors (kubectl --validate=strict)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@cache
def crd_validator(api_version: str, kind: str) -> jsonschema.Draft7Validator:
    group, version = api_version.split("/")
    path = SCHEMAS / f"{group}_{kind}_{version}.json".lower()
    assert path.is_file(), f"no vendored schema for {api_version} {kind}: expected {path.name}"
    return jsonschema.Draft7Validator(_strict(json.loads(path.read_text())))


CRD_KINDS = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PrometheusRule"}


def validate_crd_object(doc: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError when a CRD object does not match its vendored schema; the metadata goes
    through kubernetes-validate as an ObjectMeta (the CRD schemas leave it open)."""
    crd_validator(doc["apiVersion"], doc["kind"]).validate({k: v for k, v in doc.items() if k != "metadata"})
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]},
                                 K8S_VERSION, strict=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_crd_objects_match_vendored_schemas(variant: str) -> None:
    for doc in rendered(variant):
        if doc["kind"] in CRD_KINDS:
            validate_crd_object(doc)


def test_prod_variant_renders_every_crd_kind() -> None:
    assert {d["kind"] for d in rendered("prod")} >= CRD_KINDS


@pytest.mark.parametrize(
    ("kind", "mutate"),
    [
        ("ScaledObject", lambda d: d["spec"].__setitem__("maxReplicas", 3)),  # unknown field (HPA's name)
        ("ScaledObject", lambda d: d["spec"].__setitem__("cooldownPeriod", "5m")),  # wrong type
        ("ScaledObject", lambda d: d["spec"]["triggers"][0].pop("type")),  # required
        ("ScaledObject", lambda d: d["spec"]["triggers"][0]["metadata"].__setitem__("lagThreshold", 5000)),  # not str
        ("ServiceMonitor", lambda d: d["spec"]["endpoints"][0].__setitem__("portName", "metrics")),  # unknown field
        ("PrometheusRule", lambda d: d["spec"]["groups"][0]["rules"][0].__setitem__("for", 15)),  # wrong type
        ("TriggerAuthentication", lambda d: d["spec"]["secretTargetRef"][0].pop("key")),  # required
    ],
    ids=["so-unknown", "so-type", "so-required", "so-metadata-type", "sm-unknown", "rule-type", "ta-required"],
)
def test_crd_validation_can_fail(kind: str, mutate: Any) -> None:
    doc = copy.deepcopy(by_kind("prod", kind))
    validate_crd_object(doc)
    mutate(doc)
    with pytest.raises(jsonschema.ValidationError):
        validate_crd_object(doc)


def test_schema_readme_names_every_vendored_schema() -> None:
    readme = (SCHEMAS / "README.md").read_text()
    for path in SCHEMAS.glob("*.json"):
        assert path.name in readme, f"{path.name} is not described in deploy/schemas/README.md"
    assert re.search(r"kedacore/keda.*[0-9a-f]{40}", readme) and re.search(r"prometheus-operator.*[0-9a-f]{40}", readme)


@pytest.mark.parametrize("variant", VARIANTS)
def test_helm_lint_strict(variant: str) -> None:
    values_path = CHART / "ci" / f"{variant}-values.yaml"
    values = helm.values_from_yaml(values_path.read_text()) if variant != "default" else None
    report = helm.lint(CHART, values, strict=True, kube_version="v1.30.0")
    # Severity 1 (info) is fine; warnings count as errors with strict.
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == [] and report["errors"] == [], problems or report["errors"]


# --- values that must be refused ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("unknown-key-values.yaml", "additional properties 'resourcez' not allowed"),
        ("wrong-type-values.yaml", "got string, want integer"),
        ("keda-beyond-partitions-values.yaml", "keda.maxReplicaCount (16) must be <= kafka.partitions (8)"),
        ("keda-lag-below-cadence-values.yaml", "keda.lagThreshold (400) must be > checkpoint.everyRecords (500)"),
        ("keda-commit-noise-values.yaml", "keda.lagThreshold (5000) x max(1, keda.minReplicaCount) (1) must be >="),
        ("keda-cooldown-below-session-values.yaml", "keda.cooldownPeriod (60s) must be >= kafka.sessionTimeoutMs"),
        ("sasl-without-user-values.yaml", "kafka.saslUsername is required"),
        ("pvc-without-claim-values.yaml", "model.source pvc needs model.pvc.claimName"),
        ("init-without-image-values.yaml", "model.source init needs model.init.image"),
        ("replicas-beyond-partitions-values.yaml", "replicas (9) must be <= kafka.partitions (8)"),
        ("bad-enum-values.yaml", "'/kafka/securityProtocol': value must be one of"),
    ],
)
def test_broken_values_file_fails_to_render(path: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(helm.HelmError) as excinfo:
        render_chart.render(BROKEN / path)
    assert message in str(excinfo.value)
    # The CLI the docs point at fails the same way (exit 1, Helm's message on stderr).
    assert render_chart.main(["-f", str(BROKEN / path)]) == 1
    assert message in capsys.readouterr().err


def test_broken_manifest_fails_strict_validation() -> None:
    """Values the chart's schema lets through (extraEnv is passed on as it is) but Kubernetes would refuse."""
    values_file = BROKEN / "bad-env-manifest-values.yaml"
    docs = [d for d in yaml.safe_load_all(render_chart.render(values_file)) if d]
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    with pytest.raises(kubernetes_validate.ValidationError, match="configMapKeyRefz"):
        kubernetes_validate.validate(sts, K8S_VERSION, strict=True)


# --- scaling --------------------------------------------------------------------------------------------------


def test_keda_bounds_follow_partitions_checkpoints_and_session(tmp_path: Path) -> None:
    scaled = by_kind("prod", "ScaledObject")
    config = yaml.safe_load(embedded_config("prod"))
    values = yaml.safe_load((CHART / "ci" / "prod-values.yaml").read_text())
    spec = scaled["spec"]
    trigger = spec["triggers"][0]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert spec["maxReplicaCount"] <= values["kafka"]["partitions"]
    assert int(meta["lagThreshold"]) > config["checkpoint"]["every_records"]
    # KEDA wants ceil(total lag / lagThreshold) replicas; commit lag alone (every partition one checkpoint
    # interval behind) must not ask for more than the minimum.
    noise = values["kafka"]["partitions"] * config["checkpoint"]["every_records"]
    assert -(-noise // int(meta["lagThreshold"])) <= spec["minReplicaCount"]
    session_s = config["kafka"]["session_timeout_ms"] / 1000
    assert spec["cooldownPeriod"] >= session_s
    assert spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] \
        >= session_s
    assert meta["consumerGroup"] == config["kafka"]["group_id"]
    assert meta["topic"] == config["kafka"]["input_topic"]
    assert meta["bootstrapServers"] == config["kafka"]["bootstrap_servers"]
    assert meta["allowIdleConsumers"] == "false"
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet",
                                      "name": consumer("prod")["metadata"]["name"]}
    assert "replicas" not in consumer("prod")["spec"], "KEDA owns the replica count; the chart must not fight it"
    # SASL_SSL with a client certificate: the scaler authenticates like the consumers.
    assert meta["sasl"] == "scram_sha512" and meta["tls"] == "enable"
    auth = by_kind("prod", "TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
    env = {e["name"]: e for e in container("prod")["env"]}
    password_ref = env["SINKSTREAM_KAFKA__SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert refs["password"] == (password_ref["name"], password_ref["key"])
    tls_volume = next(v for v in consumer("prod")["spec"]["template"]["spec"]["volumes"] if v["name"] == "kafka-tls")
    assert {refs[p] for p in ("ca", "cert", "key")} == {
        (tls_volume["secret"]["secretName"], k) for k in ("ca.crt", "tls.crt", "tls.key")}
    assert auth["spec"]["env"] == [{"parameter": "username", "name": "SINKSTREAM_KAFKA__SASL_USERNAME",
                                    "containerName": "sinkstream"}]
    assert env["SINKSTREAM_KAFKA__SASL_USERNAME"]["value"] == config["kafka"]["sasl_username"]


# --- monitoring ------------------------------------------------------------------------------------------------


def test_service_monitor_scrapes_the_metrics_port() -> None:
    monitor = by_kind("prod", "ServiceMonitor")
    service = by_kind("prod", "Service", "sinkstream")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"] and "metrics" in port_names
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["sinkstream"]}


def _rules() -> list[dict[str, Any]]:
    return [r for g in by_kind("prod", "PrometheusRule")["spec"]["groups"] for r in g["rules"]]


def test_alerts_cover_the_failure_modes() -> None:
    names = {r["alert"] for r in _rules()}
    assert {"SinkstreamLagGrowing", "SinkstreamCheckpointStale", "SinkstreamCheckpointFailures",
            "SinkstreamRedisDown", "SinkstreamCrashLooping", "SinkstreamStateLost"} <= names
    for rule in _rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]


def test_alert_queries_parse_and_use_only_documented_metrics() -> None:
    service = by_kind("prod", "Service", "sinkstream")["metadata"]["name"]
    for rule in _rules():
        found = selectors(rule["expr"])
        assert found, rule["alert"]
        for name, labels in found:
            assert series_allowed(name), f"{rule['alert']}: {name} is not a documented metric"
            if name.startswith("sinkstream_") or name == "up":
                assert labels.get("job") == service, f"{rule['alert']}: {name} must select job={service}"
            if name == "sinkstream_errors_total" and "type" in labels:
                assert labels["type"] in ERROR_TYPES


def test_checkpoint_age_alert_threshold_is_a_multiple_of_the_cadence() -> None:
    config = yaml.safe_load(embedded_config("prod"))
    rule = next(r for r in _rules() if r["alert"] == "SinkstreamCheckpointStale")
    threshold = float(re.search(r"sinkstream_checkpoint_age_seconds\{[^}]*\}\)\s*>\s*([0-9.]+)", rule["expr"])[1])
    factor = threshold / config["checkpoint"]["every_seconds"]
    assert factor >= 2 and factor == int(factor), f"threshold {threshold}s is not N x the checkpoint cadence"


def test_promql_check_can_fail() -> None:
    with pytest.raises(ValueError):
        selectors("sum by (pod (sinkstream_ready)")
    assert not series_allowed("sinkstream_record_seconds")  # an old name the contract dropped
    assert not series_allowed("sinkstream_ready_bucket")  # suffixes only for histograms
    assert series_allowed("sinkstream_model_step_seconds_bucket")


def _dashboard() -> dict[str, Any]:
    return json.loads((CHART / "dashboards" / "sinkstream.json").read_text())


def _dashboard_exprs(dash: dict[str, Any]) -> list[str]:
    exprs = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            # Grafana's variables, as Grafana substitutes them before the query reaches Prometheus.
            exprs.append(target["expr"].replace("$__rate_interval", "5m").replace("$namespace", "ns")
                         .replace("$job", "sinkstream"))
    return exprs


def test_dashboard_queries_parse_and_cover_every_metric() -> None:
    dash = _dashboard()
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    used = set()
    for expr in _dashboard_exprs(dash):
        for name, labels in selectors(expr):
            assert series_allowed(name) and name.startswith("sinkstream_"), f"undocumented metric {name} in {expr}"
            assert labels.get("namespace") == "ns" and labels.get("job") == "sinkstream", expr
            used.add(metric_of(name))
    assert used == set(METRICS), f"metrics without a panel: {sorted(set(METRICS) - used)}"
    for panel in dash["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "namespace", "job"}


def test_dashboard_configmap_carries_the_json_and_the_sidecar_label() -> None:
    cm = by_kind("prod", "ConfigMap", "sinkstream-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["sinkstream.json"]) == _dashboard()


def test_service_exports_every_metric_the_chart_uses() -> None:
    """The contract from the other side: the service registers each metric under that name and type."""
    from prometheus_client import REGISTRY

    import pipeline.service.metrics  # noqa: F401 (registers the metrics)

    exported = {}
    error_types = set()
    for family in REGISTRY.collect():
        exported[family.name + {"counter": "_total", "info": "_info"}.get(family.type, "")] = family.type
        if family.name == "sinkstream_errors":
            error_types |= {s.labels["type"] for s in family.samples if "type" in s.labels}
    for name, kind in METRICS.items():
        assert exported.get(name) == kind, \
            f"{name}: expected a {kind} from pipeline.service.metrics, got {exported.get(name)}"
    assert error_types == ERROR_TYPES


def test_every_metric_is_documented_in_the_readme() -> None:
    readme = (DEPLOY / "README.md").read_text()
    for name in METRICS:
        assert f"`{name}" in readme, f"{name} is not documented in deploy/README.md"


# --- network ---------------------------------------------------------------------------------------------------


def _ports(rule: dict[str, Any]) -> set[int | str]:
    return {p["port"] for p in rule.get("ports", [])}


@pytest.mark.parametrize("variant", ["prod", "redis-example"])
def test_network_policy_allows_only_kafka_redis_dns_and_prometheus(variant: str) -> None:
    policy = by_kind(variant, "NetworkPolicy")["spec"]
    config = yaml.safe_load(embedded_config(variant))
    assert policy["podSelector"]["matchLabels"].items() <= \
        consumer(variant)["spec"]["template"]["metadata"]["labels"].items()
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    # Ingress: the metrics port only, from Prometheus only.
    [ingress] = policy["ingress"]
    assert _ports(ingress) == {"metrics"}
    assert len(ingress["from"]) == 1 and {"namespaceSelector", "podSelector"} <= ingress["from"][0].keys()
    # Egress: Kafka's and Redis' ports as configured, DNS; nothing else.
    kafka_ports = {int(s.rsplit(":", 1)[1]) for s in config["kafka"]["bootstrap_servers"].split(",")}
    redis_port = urlparse(config["redis"]["url"]).port or 6379
    egress_ports = [_ports(rule) for rule in policy["egress"]]
    assert any(kafka_ports <= ports for ports in egress_ports), (kafka_ports, egress_ports)
    assert any(redis_port in ports for ports in egress_ports), (redis_port, egress_ports)
    assert {53} in egress_ports
    assert all(rule.get("ports") for rule in policy["egress"]), "an egress rule without ports opens every port"
    assert len(policy["egress"]) == 3


def test_redis_egress_targets_the_example_redis() -> None:
    policy = by_kind("redis-example", "NetworkPolicy")["spec"]
    redis_rule = next(r for r in policy["egress"] if 6379 in _ports(r))
    redis_pod_labels = next(d for d in rendered("redis-example") if d["kind"] == "StatefulSet"
                            and d["metadata"]["name"].endswith("-redis"))["spec"]["template"]["metadata"]["labels"]
    assert redis_rule["to"][0]["podSelector"]["matchLabels"].items() <= redis_pod_labels.items()


# --- Redis example -------------------------------------------------------------------------------------------


def test_example_redis_keeps_every_snapshot() -> None:
    docs = rendered("redis-example")
    conf = by_kind("redis-example", "ConfigMap", "sinkstream-redis")["data"]["redis.conf"]
    settings = dict(line.split(None, 1) for line in conf.splitlines() if line and not line.startswith("#"))
    assert settings["appendonly"] == "yes"
    assert settings["appendfsync"] == "everysec"
    assert settings["maxmemory-policy"] == "noeviction"
    redis = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "sinkstream-redis")
    pod = redis["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert c["args"][0] == "/etc/redis/redis.conf" and "--requirepass" in c["args"]
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/data", "/etc/redis"}
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    url = urlparse(yaml.safe_load(embedded_config("redis-example"))["redis"]["url"])
    service = by_kind("redis-example", "Service", "sinkstream-redis")
    assert url.hostname == service["metadata"]["name"] and url.port == service["spec"]["ports"][0]["port"]


# --- model source, device, secrets -------------------------------------------------------------------------


def _volumes(variant: str) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in consumer(variant)["spec"]["template"]["spec"]["volumes"]}


def _mounts(variant: str) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in container(variant)["volumeMounts"]}


def test_model_baked_pvc_and_init_sources() -> None:
    assert "models" not in _volumes("default")
    assert yaml.safe_load(embedded_config("default"))["model"]["name"] == "smollm2-135m"
    for variant in ("model-pvc", "model-init"):
        name = yaml.safe_load(embedded_config(variant))["model"]["name"]
        mount = _mounts(variant)["models"]
        assert mount["readOnly"] is True and name.startswith(mount["mountPath"] + "/"), (name, mount)
    claim = _volumes("model-pvc")["models"]["persistentVolumeClaim"]
    assert claim["readOnly"] is True
    assert by_kind("model-pvc", "PersistentVolumeClaim")["metadata"]["name"] == claim["claimName"]
    assert "emptyDir" in _volumes("model-init")["models"]
    [init] = consumer("model-init")["spec"]["template"]["spec"]["initContainers"]
    assert any(m["name"] == "models" and m["mountPath"] == "/models" and not m.get("readOnly")
               for m in init["volumeMounts"])
    assert init["securityContext"]["allowPrivilegeEscalation"] is False


def test_cpu_and_gpu_variants() -> None:
    gpu_pod, cpu_pod = (consumer(v)["spec"]["template"]["spec"] for v in ("gpu", "cpu"))
    assert container("gpu")["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu_pod["tolerations"])
    assert yaml.safe_load(embedded_config("gpu"))["model"]["device"] == "cuda"
    assert "nvidia.com/gpu" not in json.dumps(container("cpu")["resources"])
    assert "tolerations" not in cpu_pod
    assert yaml.safe_load(embedded_config("cpu"))["model"]["device"] == "cpu"
    assert container("cpu")["image"].endswith("-cpu")


def test_tls_files_are_mounted_where_the_config_points() -> None:
    config = yaml.safe_load(embedded_config("prod"))
    volumes, mounts = _volumes("prod"), _mounts("prod")
    paths = {config["kafka"]["ssl_cafile"], config["kafka"]["ssl_certfile"], config["kafka"]["ssl_keyfile"],
             config["redis"]["ssl_ca_certs"]}
    for path in paths:
        mount = next(m for m in mounts.values() if path.startswith(m["mountPath"] + "/"))
        assert mount["readOnly"] is True
        secret = volumes[mount["name"]]["secret"]
        assert path.rsplit("/", 1)[1] in {item["path"] for item in secret["items"]}
        assert secret["defaultMode"] == 0o440
    assert config["redis"]["url"].startswith("rediss://")


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_secret_material_in_rendered_output(variant: str) -> None:
    text = rendered_text(variant)
    assert "CHANGE-ME" not in text
    assert not re.search(r"(?i)(password|secret)\s*:\s*['\"]?[^\s'\"{]", embedded_config(variant))
    assert "BEGIN" not in text, "no PEM material in manifests"
    for doc in rendered(variant):
        for c in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            for env in c.get("env", []):
                if re.search(r"(?i)password|token|secret", env["name"]):
                    assert "valueFrom" in env and "value" not in env, (
                        f"{variant}: {env['name']} must come from a Secret"
                    )


def test_config_change_rolls_the_pods() -> None:
    base = consumer("default")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    assert consumer("cpu")["spec"]["template"]["metadata"]["annotations"]["checksum/config"] != base
    assert base == consumer("default")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]


def test_render_script_output_equals_the_library_render(tmp_path: Path) -> None:
    out = tmp_path / "prod.yaml"
    assert render_chart.main(["-f", str(CHART / "ci" / "prod-values.yaml"), "-o", str(out)]) == 0
    assert out.read_text() == rendered_text("prod")
    assert (ROOT / "scripts" / "render-deploy.sh").stat().st_mode & 0o111, "render-deploy.sh must be executable"


def test_names_follow_the_release_name() -> None:
    """Another release name and namespace: every reference between objects still lines up."""
    docs = [d for d in yaml.safe_load_all(render_chart.render(CHART / "ci" / "prod-values.yaml", release="logs",
                                                              namespace="obs")) if d]
    kinds = {d["kind"]: d for d in docs if d["kind"] != "ConfigMap"}
    name = "logs-sinkstream"
    assert all(d["metadata"]["name"].startswith(name) for d in docs), [d["metadata"]["name"] for d in docs]
    sts, service = kinds["StatefulSet"], kinds["Service"]
    assert sts["metadata"]["name"] == service["metadata"]["name"] == sts["spec"]["serviceName"] == name
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert pod_labels["app.kubernetes.io/instance"] == "logs"
    for selector in (sts["spec"]["selector"]["matchLabels"], service["spec"]["selector"],
                     kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
                     kinds["NetworkPolicy"]["spec"]["podSelector"]["matchLabels"]):
        assert selector.items() <= pod_labels.items()
    assert kinds["ScaledObject"]["spec"]["scaleTargetRef"]["name"] == name
    assert kinds["ScaledObject"]["spec"]["triggers"][0]["authenticationRef"]["name"] == \
        kinds["TriggerAuthentication"]["metadata"]["name"]
    assert kinds["ServiceMonitor"]["spec"]["namespaceSelector"] == {"matchNames": ["obs"]}
    assert kinds["ServiceMonitor"]["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    configmaps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] in configmaps
    for rule in kinds["PrometheusRule"]["spec"]["groups"][0]["rules"]:
        for metric, labels in selectors(rule["expr"]):
            if metric.startswith("kube_"):
                assert labels["namespace"] == "obs" and labels["pod"] == f"{name}-[0-9]+", rule["alert"]
            else:
                assert labels["job"] == name, rule["alert"]
