"""The modules of `pipeline/service` import one another one way (issue 17): no cycle, no import of a sibling
inside a function (the usual way to hide a cycle), each module importable on its own, and the service mode
chosen in one place (`Engine`), not by `dialogue is not None` branches on the hot path."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

SERVICE = Path(__file__).resolve().parents[2] / "pipeline" / "service"
PACKAGE = "pipeline.service"


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(SERVICE.glob("*.py")) if p.stem != "__init__"}


def _sibling(node: ast.Import | ast.ImportFrom) -> list[str]:
    """The `pipeline.service` modules an import statement names."""
    names: list[str] = []
    if isinstance(node, ast.ImportFrom):
        if node.module == PACKAGE:
            names += [alias.name for alias in node.names]
        elif node.module and node.module.startswith(PACKAGE + "."):
            names.append(node.module.split(".")[2])
    else:
        names += [a.name.split(".")[2] for a in node.names if a.name.startswith(PACKAGE + ".")]
    return names


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    """(module -> siblings it imports at module level, imports of siblings inside functions)."""
    modules = _modules()
    edges: dict[str, set[str]] = {name: set() for name in modules}
    nested: list[str] = []
    for name, tree in modules.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)) and _sibling(inner):
                        nested.append(f"{name}.py:{inner.lineno} imports {_sibling(inner)} inside {node.name}()")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges[name].update(s for s in _sibling(node) if s in modules)
    return edges, nested


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_service_modules_import_one_way_without_cycles_or_imports_inside_functions():
    edges, nested = _graph()
    assert nested == []
    assert _cycle(edges) is None
    # The layering the design relies on: sessions know the engine and the modes only through protocols.
    assert "engine" in edges["service"] and "session" in edges["score_mode"] and "session" in edges["dialogue_mode"]
    assert not {"engine", "score_mode", "dialogue_mode", "batcher", "service"} & edges["session"]


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_every_service_module_imports_on_its_own():
    """Each module imported first, in a process where no other `pipeline.service` module is loaded yet (an import
    cycle shows up as an ImportError for some first module). One forked child per module, after the third-party
    libraries are loaded once."""
    names = sorted(_modules())
    code = (
        "import importlib, json, os, sys, traceback\n"
        "import torch, transformers, pydantic, prometheus_client, structlog  # loaded once, before the forks\n"
        "failed = {}\n"
        f"for name in {names!r}:\n"
        "    read, write = os.pipe()\n"
        "    if os.fork() == 0:\n"
        "        os.close(read)\n"
        "        try:\n"
        "            importlib.import_module('pipeline.service.' + name)\n"
        "            message = b''\n"
        "        except BaseException as exc:\n"
        "            message = repr(exc).encode()\n"
        "        os.write(write, message)\n"
        "        os._exit(0)\n"
        "    os.close(write)\n"
        "    with os.fdopen(read, 'rb') as pipe:\n"
        "        message = pipe.read().decode()\n"
        "    os.wait()\n"
        "    if message:\n"
        "        failed[name] = message\n"
        "print(json.dumps({'checked': len(" + repr(names) + "), 'failed': failed}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"checked": len(names), "failed": {}}


def test_the_mode_is_chosen_in_one_place():
    """Every comparison in `pipeline/service` that looks at the mode (`service.mode`, `"dialogue"`, a dialogue
    attribute against None) outside the dialogue mode's own module: exactly one, where `Engine` picks its `Mode`."""
    found = []
    for name, tree in _modules().items():
        if name == "dialogue_mode":  # its conversation state is None before the first reply: not a mode branch
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                text = ast.unparse(node)
                if re.search(r"\bmode\b|'dialogue'|dialogue is (not )?None", text):
                    found.append(f"{name}: {text}")
    assert found == ["engine: settings.service.mode == 'dialogue'"]
