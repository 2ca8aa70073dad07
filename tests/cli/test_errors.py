"""The error boundary: a user mistake is one line on stderr and exit 2; a bug keeps its traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main as cli_main

REPO = Path(__file__).resolve().parents[2]


def sinkstream(*argv: str, tmp_path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real command line in a subprocess, with a clean SINKSTREAM_* environment."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("SINKSTREAM_")}
    base.update({"SINKSTREAM_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
                 **(env or {})})
    return subprocess.run([sys.executable, "-m", "pipeline.cli.main", *argv], capture_output=True, text=True,
                          env=base, cwd=tmp_path, timeout=120)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


def test_negative_window_is_one_line_naming_the_flag(tmp_path):
    line = one_line(sinkstream("score", "--window", "-3", tmp_path=tmp_path))
    assert line.startswith("sinkstream score: error: argument --window: expected an integer >= 1, got '-3'")


def test_misspelled_config_key_is_one_line_naming_it(tmp_path):
    (tmp_path / "config.yaml").write_text("cache:\n  windw: 512\n")
    line = one_line(sinkstream("run", "--config", "config.yaml", tmp_path=tmp_path))
    assert line == "sinkstream: error: invalid settings: cache.windw: unknown key (misspelled?), got 512"


def test_misspelled_top_level_key_is_rejected_too(tmp_path):
    (tmp_path / "config.yaml").write_text("log_levl: DEBUG\n")
    line = one_line(sinkstream("run", "--config", "config.yaml", tmp_path=tmp_path))
    assert line == "sinkstream: error: invalid settings: log_levl: unknown key (misspelled?), got 'DEBUG'"


def test_out_of_range_and_unknown_enum_values_say_what_was_expected_and_what_arrived(tmp_path):
    (tmp_path / "config.yaml").write_text("kafka:\n  security_protocol: TLS\n  session_timeout_ms: 0\n")
    line = one_line(sinkstream("run", "--config", "config.yaml", tmp_path=tmp_path))
    assert "kafka.session_timeout_ms: Input should be greater than 0; got 0" in line
    assert ("kafka.security_protocol: Input should be 'PLAINTEXT', 'SSL', 'SASL_PLAINTEXT' or 'SASL_SSL'; "
            "got 'TLS'") in line


def test_unknown_environment_variable_is_one_line_naming_it(tmp_path):
    line = one_line(sinkstream("run", tmp_path=tmp_path, env={"SINKSTREAM_KAFKA__BOOTSTRAP_SERVER": "h:9092"}))
    assert line.startswith(
        "sinkstream: error: unknown environment variable SINKSTREAM_KAFKA__BOOTSTRAP_SERVER: expected")


def test_missing_config_file_is_one_line(tmp_path):
    line = one_line(sinkstream("run", "--config", "nope.yaml", tmp_path=tmp_path))
    assert line == "sinkstream: error: config file nope.yaml does not exist (from --config or $SINKSTREAM_CONFIG)"


def test_unreachable_broker_at_start_is_one_line_naming_the_address(tmp_path):
    port = _closed_port()
    (tmp_path / "config.yaml").write_text(
        f"kafka:\n  bootstrap_servers: 127.0.0.1:{port}\nredis:\n  url: redis://:secret@127.0.0.1:{port}/0\n"
        "service:\n  startup_wait_s: 0\n"
    )
    line = one_line(sinkstream("run", "--config", "config.yaml", tmp_path=tmp_path))
    assert line.startswith(f"sinkstream: error: expected a Kafka broker at 127.0.0.1:{port}, none answered")
    assert "secret" not in line


def test_no_addresses_and_no_stack_is_one_line(tmp_path):
    line = one_line(sinkstream("run", tmp_path=tmp_path))
    assert line.startswith("sinkstream: error: expected kafka.bootstrap_servers and redis.url")


def test_a_bug_keeps_its_traceback(monkeypatch):
    def broken(args):
        raise RuntimeError("a bug, not a user mistake")

    monkeypatch.setattr(cli_main.stack, "run", broken)
    with pytest.raises(RuntimeError, match="a bug, not a user mistake"):
        cli_main.main(["stack", "status"])
