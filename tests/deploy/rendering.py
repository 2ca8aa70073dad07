"""Render the Helm chart for tests: scripts/render_chart.py (Helm's own engine via helm-python-sdk), parsed.

`rendered(variant)` is cached per variant: a render takes well under a second, but the tests ask often.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "sinkstream"
CI_VALUES = CHART / "ci"
# Every variant the chart ships: the defaults plus each ci/*-values.yaml.
VARIANTS = ["default"] + sorted(p.name.removesuffix("-values.yaml") for p in CI_VALUES.glob("*-values.yaml"))

_spec = importlib.util.spec_from_file_location("render_chart", ROOT / "scripts" / "render_chart.py")
assert _spec and _spec.loader
render_chart = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render_chart)


def values_file(variant: str) -> Path | None:
    return None if variant == "default" else CI_VALUES / f"{variant}-values.yaml"


@functools.cache
def rendered_text(variant: str) -> str:
    return render_chart.render(values_file(variant))


def rendered(variant: str) -> list[dict[str, Any]]:
    """The objects of one variant, in `helm template` order (a fresh copy: tests may mutate them)."""
    return [doc for doc in yaml.safe_load_all(rendered_text(variant)) if doc is not None]


def by_kind(variant: str, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in rendered(variant) if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{variant}: expected one {kind} {name or ''}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def consumer(variant: str) -> dict[str, Any]:
    """The sinkstream StatefulSet (not the example Redis)."""
    sets = [d for d in rendered(variant) if d["kind"] == "StatefulSet"
            and d["metadata"]["labels"].get("app.kubernetes.io/component") == "consumer"]
    assert len(sets) == 1, f"{variant}: expected one consumer StatefulSet, got {len(sets)}"
    return sets[0]


def container(variant: str) -> dict[str, Any]:
    containers = consumer(variant)["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, f"expected one container, got {[c['name'] for c in containers]}"
    return containers[0]


def embedded_config(variant: str) -> str:
    return by_kind(variant, "ConfigMap", "sinkstream-config")["data"]["config.yaml"]
