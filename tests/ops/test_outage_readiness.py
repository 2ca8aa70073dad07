"""Issue 11 item 2, the idle case: `/readyz` turns false while Redis or Kafka is unreachable even when no
record arrives (a caught-up consumer is the normal state of a healthy deployment).

One service process, all input processed, then (1) Redis paused with SIGSTOP for ~15 s, (2) the broker paused
for ~15 s. During each pause `/readyz` must turn 503 and the matching `*_up` gauge 0; after SIGCONT both come
back; `/healthz` stays 200. Both outages are observed before asserting, so one report names every gap.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from pipeline.devstack.processes import free_port
from tests.helpers.service import ServiceProcess, input_records, service_settings
from tests.ops.probe import get, scrape, value

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _observe(port: int, pid: int, gauge: str, pause_s: float = 15.0, recover_s: float = 40.0) -> dict:
    """Pause `pid`, watch /readyz, /healthz and `gauge` during the pause and after SIGCONT."""
    seen = {"ready_during": set(), "up_during": set(), "health": set(), "recovered": False}
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        while time.monotonic() - started < pause_s:
            seen["ready_during"].add(get(f"http://127.0.0.1:{port}/readyz")[0])
            seen["up_during"].add(value(scrape(port), gauge))
            seen["health"].add(get(f"http://127.0.0.1:{port}/healthz")[0])
            time.sleep(0.5)
    finally:
        os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + recover_s
    while time.monotonic() < deadline and not seen["recovered"]:
        seen["health"].add(get(f"http://127.0.0.1:{port}/healthz")[0])
        seen["recovered"] = get(f"http://127.0.0.1:{port}/readyz")[0] == 200 and value(scrape(port), gauge) == 1
        time.sleep(0.5)
    return seen


def test_readiness_false_while_redis_or_kafka_paused_on_an_idle_service(kafka_stack, redis_server, produce, tmp_path):
    topic = kafka_stack.make_topic("idle-in", 1)
    out_topic = kafka_stack.make_topic("idle-out", 1)
    port = free_port()
    config = service_settings(kafka_stack.bootstrap, redis_server.url, topic, out_topic,
                              kafka_stack.group("idle"), redis_server.unique_prefix("idle"))
    config["redis"]["socket_timeout_s"] = 2.0
    config["checkpoint"].update({"every_records": 2, "every_seconds": 1.0, "retry_initial_s": 0.2, "retry_max_s": 1.0})
    config["service"].update({"metrics_port": port, "metrics_host": "127.0.0.1"})
    produce(kafka_stack.bootstrap, topic, input_records(1, 4)[0], partition=0)
    svc = ServiceProcess.start(config, tmp_path, "idle")
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            s = scrape(port) if get(f"http://127.0.0.1:{port}/healthz")[0] == 200 else {}
            if s and value(s, "sinkstream_records_total") == 4 and value(s, "sinkstream_checkpoint_seconds_count"):
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"the service never processed and checkpointed its input:\n{svc.log()[-3000:]}")
        time.sleep(2.0)  # idle now: nothing left to checkpoint
        assert get(f"http://127.0.0.1:{port}/readyz")[0] == 200

        redis = _observe(port, redis_server.process.pid, "sinkstream_redis_up")
        kafka = _observe(port, kafka_stack.process.pid, "sinkstream_kafka_up")
        problems = []
        for name, seen in (("redis", redis), ("kafka", kafka)):
            if 503 not in seen["ready_during"]:
                problems.append(f"{name} paused: /readyz never answered 503 (saw {seen['ready_during']})")
            if 0 not in seen["up_during"]:
                problems.append(f"{name} paused: sinkstream_{name}_up never 0 (saw {seen['up_during']})")
            if not seen["recovered"]:
                problems.append(f"{name} resumed: /readyz 200 and sinkstream_{name}_up 1 did not come back")
            if seen["health"] != {200}:
                problems.append(f"{name}: /healthz answered {seen['health']}")
        assert not problems, "; ".join(problems)
        svc.kill(signal.SIGTERM)
        assert svc.proc.returncode == 0, svc.log()[-3000:]
    finally:
        svc.kill(signal.SIGKILL)
