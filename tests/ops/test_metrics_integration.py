"""Issue 11 acceptance: the metrics, /readyz and /healthz of a running `sinkstream run`, seen by a scraper.

One service process against the real broker (tansu) and the real Redis, `service.metrics_port` on a free
loopback port. Checked from the outside only (HTTP and the JSON log):

- `/readyz` is 503 from the moment the port answers until the partitions were claimed and restored (never 200
  before the `partition.assigned` lines are in the log), then 200;
- while records flow, lag per partition is exported and falls to 0, records/tokens/annotations counters grow,
  the checkpoint age resets after a checkpoint; build info and the connectivity gauges are right;
- Redis paused (SIGSTOP) with records still flowing: `/readyz` 503 and `sinkstream_redis_up` 0, then 200 and 1
  after SIGCONT; `/healthz` answers 200 all along.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import torch

from model.loader import pick_dtype_with_reason
from pipeline.devstack.processes import free_port
from tests.helpers.service import ServiceProcess, input_records, service_settings
from tests.ops.probe import get, labelled, scrape, value

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PARTITIONS = 2
FIRST = 12  # records per partition produced before the service starts
MORE = 3  # per partition, after the idle phase (a checkpoint must follow)


def _wait(what: str, check, timeout_s: float, every_s: float = 0.2):
    """Call `check()` until it returns something truthy; fail with `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every_s)
    raise AssertionError(f"expected {what} within {timeout_s} s; last observation: {last!r}")


class _ReadinessWatch(threading.Thread):
    """Polls /readyz from process start; with each answer, notes how many `partition.assigned` lines the log
    held at that moment (the log line is written before the service marks itself ready)."""

    def __init__(self, port: int, svc: ServiceProcess):
        super().__init__(daemon=True)
        self.port, self.svc = port, svc
        self.seen: list[tuple[int | None, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and self.svc.proc.poll() is None:
            code, _ = get(f"http://127.0.0.1:{self.port}/readyz", timeout_s=1.0)
            if code is not None:
                self.seen.append((code, self.svc.log().count('"partition.assigned"')))
            if code == 200:
                return
            time.sleep(0.02)


def _lag(samples) -> dict[str, float]:
    return {dict(labels)["partition"]: v for labels, v in labelled(samples, "sinkstream_partition_lag_records").items()}


def _age(samples) -> dict[str, float]:
    ages = labelled(samples, "sinkstream_checkpoint_age_seconds")
    return {dict(labels)["partition"]: v for labels, v in ages.items()}


def test_metrics_readiness_and_redis_pause_seen_from_outside(kafka_stack, redis_server, produce, tmp_path):
    topic = kafka_stack.make_topic("ops-in", PARTITIONS)
    out_topic = kafka_stack.make_topic("ops-out", 1)
    port = free_port()
    config = service_settings(kafka_stack.bootstrap, redis_server.url, topic, out_topic,
                              kafka_stack.group("ops"), redis_server.unique_prefix("ops"))
    config["redis"]["socket_timeout_s"] = 2.0
    config["checkpoint"].update({"every_records": 5, "every_seconds": 1.0, "retry_initial_s": 0.2, "retry_max_s": 1.0})
    config["service"].update({"metrics_port": port, "metrics_host": "127.0.0.1"})
    records = input_records(PARTITIONS, 120)
    for p in range(PARTITIONS):
        produce(kafka_stack.bootstrap, topic, records[p][:FIRST], partition=p)
    parts = {f"{topic}:{p}" for p in range(PARTITIONS)}

    t0 = time.monotonic()
    phases: dict[str, float] = {}
    svc = ServiceProcess.start(config, tmp_path, "ops")
    watch = _ReadinessWatch(port, svc)
    watch.start()
    try:
        # ---- readiness: 503 until every assigned partition was claimed and restored ------------------------
        watch.join(timeout=150)
        assert not watch.is_alive(), f"/readyz never answered 200 within 150 s: {watch.seen[-5:]}\n{svc.log()[-3000:]}"
        assert watch.seen and watch.seen[-1][0] == 200, f"service exited: {svc.log()[-3000:]}"
        early = [(code, assigned) for code, assigned in watch.seen if assigned < PARTITIONS]
        assert all(code == 503 for code, _ in early), (
            f"/readyz answered 200 before the partitions were assigned and restored: {early[-5:]}")
        assert early, "the metrics port never answered before the partitions were assigned: nothing was checked"
        assert all(code == 503 for code, _ in watch.seen[:-1])
        assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        phases["ready"] = time.monotonic() - t0

        # ---- records flow: lag falls to 0, counters grow ---------------------------------------------------
        history = []

        def drained():
            s = scrape(port)
            history.append(s)
            lag = _lag(s)
            done = value(s, "sinkstream_records_total") == PARTITIONS * FIRST
            return s if done and set(lag) == parts and all(v == 0 for v in lag.values()) else None

        s1 = _wait("every record processed and lag 0 on every partition", drained, 180, every_s=0.1)
        assert any(v > 0 for s in history for v in _lag(s).values()), "lag was never above 0 while records were pending"
        processed = [value(s, "sinkstream_records_total") for s in history]
        assert processed == sorted(processed) and processed[0] < processed[-1], processed
        assert value(s1, "sinkstream_tokens_total") > 0
        assert value(s1, "sinkstream_annotations_total", kind="score") >= PARTITIONS * FIRST
        assert value(s1, "sinkstream_assigned_partitions") == PARTITIONS
        assert value(s1, "sinkstream_redis_up") == 1 and value(s1, "sinkstream_kafka_up") == 1
        assert value(s1, "sinkstream_ready") == 1
        started = next(json.loads(line) for line in svc.log().splitlines() if '"service.started"' in line)
        build = {dict(labels)["fingerprint"]: dict(labels) for labels in labelled(s1, "sinkstream_build_info")}
        assert list(build) == [started["fingerprint"]], build
        info = build[started["fingerprint"]]
        # the suite's services run `dtype: auto` (tests.helpers.service.SUITE_DTYPE): the metric says what it chose
        # and why, as the start-up log does
        dtype, reason = pick_dtype_with_reason("auto", torch.device("cpu"))
        assert (info["model"], info["device"], info["dtype"], info["sinks"], info["window"]) == (
            "smollm2-135m", "cpu", str(dtype).removeprefix("torch."), "4", "252"), info
        assert info["dtype_reason"] == reason == started["dtype_reason"] and reason.startswith("auto: "), info
        assert info["version"]
        phases["drained"] = time.monotonic() - t0

        # ---- idle: every `every_seconds` (1 s here) a partition re-checks its checkpoint, so state loss is found
        # within one interval (issue 19) and the age stays near that interval; new records are checkpointed too ---
        count0 = value(scrape(port), "sinkstream_checkpoint_seconds_count")

        def rechecked():
            s = scrape(port)
            a = _age(s)
            return s if set(a) == parts and value(s, "sinkstream_checkpoint_seconds_count") >= count0 + 2 * PARTITIONS \
                else None

        idle = _age(_wait("idle re-checks of every partition's checkpoint", rechecked, 30))
        assert max(idle.values()) < 5.0, idle
        checkpoints = value(scrape(port), "sinkstream_checkpoint_seconds_count")
        tokens = value(scrape(port), "sinkstream_tokens_total")
        for p in range(PARTITIONS):
            produce(kafka_stack.bootstrap, topic, records[p][FIRST:FIRST + MORE], partition=p)

        def reset():
            s = scrape(port)
            return s if value(s, "sinkstream_tokens_total") > tokens and set(_age(s)) == parts else None

        s2 = _wait("the new records scored", reset, 60)
        assert value(s2, "sinkstream_checkpoint_seconds_count") >= checkpoints + PARTITIONS
        assert value(s2, "sinkstream_tokens_total") > tokens
        assert value(s2, "sinkstream_checkpoint_failures_total", reason="store") == 0
        phases["checkpoint_reset"] = time.monotonic() - t0

        # ---- Redis paused while records flow: not ready, redis_up 0; back after SIGCONT ------------------
        feeding = threading.Event()
        feeding.set()

        def feed():
            from confluent_kafka import Producer

            producer = Producer({"bootstrap.servers": kafka_stack.bootstrap})
            i = FIRST + MORE
            while feeding.is_set() and i < len(records[0]):
                for p in range(PARTITIONS):
                    key, val, _ = records[p][i]
                    producer.produce(topic, key=key, value=val, partition=p)
                producer.flush(10)
                i += 1
                time.sleep(0.4)

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        health: list[int | None] = []
        paused_ready: list[int | None] = []
        os.kill(redis_server.process.pid, signal.SIGSTOP)
        paused_at = time.monotonic()
        try:
            def noticed():
                health.append(get(f"http://127.0.0.1:{port}/healthz")[0])
                s = scrape(port)
                code = get(f"http://127.0.0.1:{port}/readyz")[0]
                return (code, s) if code == 503 and value(s, "sinkstream_redis_up") == 0 else None

            _, s3 = _wait("/readyz 503 and sinkstream_redis_up 0 while Redis is paused", noticed, 14, every_s=0.25)
            assert value(s3, "sinkstream_ready") == 0
            while time.monotonic() - paused_at < 15:
                health.append(get(f"http://127.0.0.1:{port}/healthz")[0])
                paused_ready.append(get(f"http://127.0.0.1:{port}/readyz")[0])
                time.sleep(0.25)
        finally:
            os.kill(redis_server.process.pid, signal.SIGCONT)
        assert paused_ready and set(paused_ready) == {503}, paused_ready

        def recovered():
            health.append(get(f"http://127.0.0.1:{port}/healthz")[0])
            s = scrape(port)
            code = get(f"http://127.0.0.1:{port}/readyz")[0]
            return s if code == 200 and value(s, "sinkstream_redis_up") == 1 else None

        s4 = _wait("/readyz 200 and sinkstream_redis_up 1 after SIGCONT", recovered, 30, every_s=0.25)
        assert value(s4, "sinkstream_checkpoint_failures_total", reason="store") >= 1
        assert value(s4, "sinkstream_errors_total", type="redis") >= 1
        assert set(health) == {200}, f"/healthz must stay 200 through the Redis pause, got {health}"
        phases["redis_recovered"] = time.monotonic() - t0
        feeding.clear()
        feeder.join(timeout=30)
        svc.kill(signal.SIGTERM)
        assert svc.proc.returncode == 0, svc.log()[-3000:]
        log = svc.log()
        assert '"redis.unavailable"' in log and '"redis.available"' in log and "Traceback" not in log, log[-3000:]
        phases["stopped"] = time.monotonic() - t0
        print("phases (s since start):", {k: round(v, 1) for k, v in phases.items()})
    finally:
        watch.stop.set()
        svc.kill(signal.SIGKILL)
