"""Integration tests of pipeline.devstack.processes: real tansu and redis-server processes in a temporary home."""

from __future__ import annotations

import json
import os
import socket

import pytest
import redis

from connectors.kafka.admin import kafka_metadata
from pipeline.cli.stack import stack_command
from pipeline.devstack.processes import StackError, is_running, start_redis, stop_process
from pipeline.devstack.stack import read_stack, stack_down, stack_status, stack_up

pytestmark = pytest.mark.integration


def test_stack_up_status_down_roundtrip(tmp_path, capsys):
    home = tmp_path / "home"
    info = stack_up(home)
    try:
        data = json.loads((home / "stack" / "stack.json").read_text())
        assert data["bootstrap_servers"] == info.bootstrap_servers
        assert data["redis_url"] == info.redis_url and info.redis_url.startswith("redis://127.0.0.1:")
        assert set(data["pids"]) == {"tansu", "redis"}
        assert read_stack(home) == info
        assert kafka_metadata(info.bootstrap_servers)["brokers"], "broker answered metadata without brokers"
        assert redis.Redis.from_url(info.redis_url).ping()
        assert stack_up(home).pids == info.pids  # idempotent: the running stack is reused
        status = stack_status(home)
        assert status["running"] and all(p["reachable"] for p in status["processes"].values())
        assert stack_command("status", home) == 0
        assert "stack: running" in capsys.readouterr().out
    finally:
        stopped = stack_down(home)
    assert stopped == {"tansu": True, "redis": True}
    assert not any(is_running(pid, name) for name, pid in info.pids.items())
    assert not (home / "stack" / "stack.json").exists() and read_stack(home) is None
    assert stack_command("status", home) == 1
    assert stack_command("down", home) == 0
    out = capsys.readouterr().out
    assert "stack: not running" in out and "nothing was running" in out
    assert stack_command("sideways", home) == 2
    assert "expected one of up, down, status; got 'sideways'" in capsys.readouterr().err


def test_redis_data_survives_only_when_asked(tmp_path):
    home = tmp_path / "home"
    info = stack_up(home)
    try:
        redis.Redis.from_url(info.redis_url).set("kept", b"1")
        stack_down(home)
        info = stack_up(home, keep_redis_data=True)  # append-only file replayed
        assert redis.Redis.from_url(info.redis_url).get("kept") == b"1"
        stack_down(home)
        info = stack_up(home)  # fresh (memory-only) broker: stale checkpoints are cleared
        assert redis.Redis.from_url(info.redis_url).get("kept") is None
    finally:
        stack_down(home)


def test_stack_command_up_prints_summary(tmp_path, capsys):
    home = tmp_path / "home"
    try:
        assert stack_command("up", home) == 0
        out = capsys.readouterr().out
        info = read_stack(home)
        assert info is not None and info.bootstrap_servers in out and info.redis_url in out
    finally:
        stack_down(home)


def test_dead_process_makes_read_stack_none(tmp_path):
    home = tmp_path / "home"
    info = stack_up(home)
    try:
        os.kill(info.pids["redis"], 9)
        os.waitpid(info.pids["redis"], 0)  # our own child: wait until it is really gone
        assert read_stack(home) is None
        status = stack_status(home)
        assert status["running"] is False and status["processes"]["redis"]["alive"] is False
        assert status["processes"]["tansu"]["reachable"] is True
        assert stack_command("status", home) == 1
        assert stack_up(home).pids["redis"] != info.pids["redis"]  # up replaces the broken stack
    finally:
        stack_down(home)


def test_start_failure_reports_log_tail(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(StackError) as err:
            start_redis(tmp_path, port=port, timeout_s=10)
    msg = str(err.value)
    # redis-server exits at once when it cannot bind: the error comes from the exit, not from the timeout
    assert msg.startswith("redis exited with code 1 before accepting connections on 127.0.0.1:")
    assert f"127.0.0.1:{port}" in msg and "last lines of" in msg and "Address already in use" in msg


def test_stop_process_leaves_a_recycled_pid_alone_and_kills_after_the_grace(tmp_path):
    """A pid that runs another program is not ours to stop; one that ignores SIGTERM is killed after the grace."""
    import subprocess
    import sys
    import time

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert not is_running(other.pid, "redis") and stop_process(other.pid, "redis") is False
        assert other.poll() is None  # still running: not ours
    finally:
        other.kill()
        other.wait()
    proc = start_redis(tmp_path)
    os.kill(proc.pid, 19)  # SIGSTOP: SIGTERM stays pending, only SIGKILL ends it
    started = time.monotonic()
    assert stop_process(proc.pid, "redis", timeout_s=0.5) is True
    assert 0.5 <= time.monotonic() - started < 5
    assert not is_running(proc.pid, "redis")  # gone and reaped (psutil waited for our child)
