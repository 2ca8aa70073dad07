"""No code of ours reads a private name (one leading underscore) of a kafka-python, redis-py or prometheus_client
object (issue 17's acceptance): such names move without notice between releases.

The check is static (ast): names bound to those libraries' modules or to what their callables return are
followed through assignments (`x = KafkaConsumer(...)`, `self.client = redis.Redis(...)`, module-level metric
objects) and attribute chains; reading `_name` on one of them, directly or through `getattr(obj, "_name")`,
is reported with file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LIBRARIES = ("kafka", "redis", "prometheus_client")
FOLDERS = ("model", "connectors", "pipeline", "tests")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


class _Checker(ast.NodeVisitor):
    def __init__(self) -> None:
        self.names: set[str] = set()  # local or module names holding a library module or object
        self.self_attrs: set[str] = set()  # attributes of `self` holding one
        self.found: list[tuple[int, str]] = []

    # ---- what holds a library object ------------------------------------------------------------------------
    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] in LIBRARIES:
                self.names.add((alias.asname or alias.name).split(".")[0])

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module and node.module.split(".")[0] in LIBRARIES:
            for alias in node.names:
                self.names.add(alias.asname or alias.name)

    def tainted(self, node: ast.AST) -> bool:
        if isinstance(node, ast.Name):
            return node.id in self.names
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "self" and node.attr in self.self_attrs:
                return True
            return self.tainted(node.value)
        if isinstance(node, ast.Call):
            return self.tainted(node.func)
        if isinstance(node, ast.Subscript):
            return self.tainted(node.value)
        return False

    def _bind(self, target: ast.AST, value: ast.AST) -> None:
        if not self.tainted(value):
            return
        if isinstance(target, ast.Name):
            self.names.add(target.id)
        elif isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
            self.self_attrs.add(target.attr)

    def visit_Assign(self, node: ast.Assign) -> None:
        for target in node.targets:
            self._bind(target, node.value)
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self._bind(node.target, node.value)
        self.generic_visit(node)

    # ---- private reads --------------------------------------------------------------------------------------
    def visit_Attribute(self, node: ast.Attribute) -> None:
        if _private(node.attr) and self.tainted(node.value):
            self.found.append((node.lineno, ast.unparse(node)))
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        name = node.args[1] if len(node.args) >= 2 else None
        if (isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr", "setattr")
                and isinstance(name, ast.Constant) and isinstance(name.value, str)
                and _private(name.value) and self.tainted(node.args[0])):
            self.found.append((node.lineno, ast.unparse(node)))
        self.generic_visit(node)


def private_reads(source: str) -> list[tuple[int, str]]:
    tree = ast.parse(source)
    checker = _Checker()
    for _ in range(2):  # a second pass sees names bound below their first use (methods before __init__)
        checker.found = []
        checker.visit(tree)
    return checker.found


def test_the_check_finds_what_the_code_used_to_do():
    """The three forms the code had before issue 17: a module alias, a consumer attribute through getattr, a
    metric object's value."""
    before = '''
from kafka import KafkaConsumer
from kafka.record import util as _record_util
from prometheus_client import Gauge
import redis

RESIDENT = Gauge("x", "y")
ACCELERATED = _record_util._crc32c is None

class Source:
    def silent(self):
        sensors = getattr(getattr(self._consumer, "_fetcher", None), "_sensors", None)
        return sensors

    def __init__(self):
        self._consumer = KafkaConsumer()
        self._redis = redis.Redis()

    def used(self):
        return int(RESIDENT._value.get()), self._redis._pool, self._own_private
'''
    found = [text for _, text in private_reads(before)]
    assert found == ["_record_util._crc32c", "getattr(self._consumer, '_fetcher', None)",
                     "RESIDENT._value", "self._redis._pool"], found


def test_no_code_reads_private_names_of_kafka_redis_or_prometheus_objects():
    offenders = []
    for folder in FOLDERS:
        for path in sorted((REPO / folder).rglob("*.py")):
            for line, text in private_reads(path.read_text()):
                offenders.append(f"{path.relative_to(REPO)}:{line}: {text}")
    assert offenders == [], "\n".join(offenders)
