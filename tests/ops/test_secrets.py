"""Issue 11 item 5: no secret appears in any log line or on the metrics port.

A redis-server of its own with `--requirepass` (the binary the fixtures use), reached through a URL that carries
the password (`redis://:PASSWORD@host:port/0`), and a Kafka SASL password set (with PLAINTEXT the broker never
asks for it, but the settings hold it and the clients get it). The service runs at DEBUG with its metrics port
on, processes records, checkpoints into the password-protected Redis and exits; then it runs once more with a
wrong Redis password and must fail with a message naming the address. Neither secret may appear in any line
of either run's output, nor in `/metrics`, `/status.json` or `/`.
"""

from __future__ import annotations

import subprocess
import time
import uuid

import pytest
import redis

from pipeline.devstack.processes import HOST, free_port, redis_server_binary
from tests.helpers.service import ServiceProcess, input_records, service_settings
from tests.ops.probe import get


@pytest.fixture
def password_redis(tmp_path):
    """A redis-server that requires a password: (port, password); stopped after the test."""
    password = f"s3cret-{uuid.uuid4().hex}"
    port = free_port()
    workdir = tmp_path / "redis-auth"
    workdir.mkdir()
    argv = [str(redis_server_binary()), "--port", str(port), "--bind", HOST, "--requirepass", password,
            "--save", "", "--appendonly", "no", "--dir", str(workdir), "--daemonize", "no"]
    with open(workdir / "redis.log", "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    client = redis.Redis(host=HOST, port=port, password=password, socket_timeout=1.0)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError as exc:
                if proc.poll() is not None or time.monotonic() > deadline:
                    started = (workdir / "redis.log").read_text()
                    raise AssertionError(f"redis-server --requirepass did not start: {started}") from exc
                time.sleep(0.1)
        with pytest.raises(redis.AuthenticationError):  # the password is really required
            redis.Redis(host=HOST, port=port, socket_timeout=1.0).set("probe", b"x")
        yield port, password
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=30)


def _leaks(text: str, secrets: list[str]) -> list[str]:
    """Lines of `text` that contain any of `secrets`."""
    return [line for line in text.splitlines() if any(s in line for s in secrets)]


@pytest.mark.integration
@pytest.mark.slow
def test_redis_url_password_and_sasl_password_never_logged_nor_exported(
    kafka_stack, password_redis, produce, tmp_path
):
    redis_port, redis_password = password_redis
    sasl_password = f"sasl-{uuid.uuid4().hex}"
    secrets = [redis_password, sasl_password]
    topic = kafka_stack.make_topic("secret-in", 1)
    out_topic = kafka_stack.make_topic("secret-out", 1)
    metrics_port = free_port()
    url = f"redis://:{redis_password}@{HOST}:{redis_port}/0"
    config = service_settings(kafka_stack.bootstrap, url, topic, out_topic, kafka_stack.group("secret"), "secret")
    config["log_level"] = "DEBUG"
    config["kafka"].update({"sasl_username": "sinkstream", "sasl_password": sasl_password})
    config["checkpoint"].update({"every_records": 3, "every_seconds": 1.0})
    config["service"].update({"metrics_port": metrics_port, "metrics_host": "127.0.0.1"})
    produce(kafka_stack.bootstrap, topic, input_records(1, 8)[0], partition=0)

    svc = ServiceProcess.start(config, tmp_path, "secret", idle_exit_s=3)
    svc.wait_for_log('"checkpoint.done"', timeout_s=180)  # the password-protected Redis took a checkpoint
    paths = ("/metrics", "/status.json", "/", "/readyz")
    pages = {path: get(f"http://127.0.0.1:{metrics_port}{path}") for path in paths}
    assert svc.wait(180) == 0, svc.log()[-3000:]
    for path, (code, body) in pages.items():
        assert code == 200, (path, code, body[:300])
        assert not _leaks(body, secrets), f"a secret is served on {path}: {_leaks(body, secrets)[:3]}"
    log = svc.log()
    assert not _leaks(log, secrets), f"a secret is in the log: {_leaks(log, secrets)[:3]}"
    assert f"{HOST}:{redis_port}" in log  # the Redis address is logged, without its password
    assert '"level": "debug"' in log  # DEBUG lines were written and checked too
    stored = redis.Redis(host=HOST, port=redis_port, password=redis_password)
    assert stored.keys("secret:manifest:*"), "no checkpoint in the password-protected Redis"
    stored.close()

    # A wrong password: the run fails, naming the address, and neither password appears.
    wrong = f"wrong-{uuid.uuid4().hex}"
    config["redis"]["url"] = f"redis://:{wrong}@{HOST}:{redis_port}/0"
    bad = ServiceProcess.start(config, tmp_path, "secret-wrong")
    started = time.monotonic()
    assert bad.wait(120) == 2, bad.log()[-3000:]  # a user error, at once: waiting cannot fix a password
    assert time.monotonic() - started < 30, "a refused password was retried for service.startup_wait_s"
    log = bad.log()
    assert f"{HOST}:{redis_port}" in log and "refused them" in log, log[-3000:]
    leaked = _leaks(log, [*secrets, wrong])
    assert not leaked, f"a secret is in the failing run's output: {leaked[:3]}"


def test_settings_errors_never_echo_a_password(tmp_path, capfd, monkeypatch):
    """A mistyped setting is reported with what arrived, except secrets: a Redis URL with a password in it
    (wrong scheme), a misspelled password key and a password of the wrong type must not be echoed to the log."""
    from pipeline.cli.main import main

    url_password, key_password, sasl_password = (f"pw-{uuid.uuid4().hex}" for _ in range(3))
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        f"redis:\n  url: 'reddis://:{url_password}@127.0.0.1:6379/0'\n  pasword: '{key_password}'\n"
        f"kafka:\n  sasl_password: ['{sasl_password}']\n"
    )
    monkeypatch.chdir(tmp_path)
    assert main(["--log-format", "json", "run", "--config", str(cfg)]) == 2
    out = capfd.readouterr()
    text = out.out + out.err
    assert "redis.url" in text and "redis.pasword" in text and "kafka.sasl_password" in text, text
    assert not _leaks(text, [url_password, key_password, sasl_password]), text
