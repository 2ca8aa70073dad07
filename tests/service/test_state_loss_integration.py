"""Issue 19 items 1 and 4 through the real service, broker and Redis (read back with an independent client).

Each test starts its own redis-server: FLUSHALL and `maxmemory` must not touch the session-wide one that
other tests' keys live in.

- Redis FLUSHALL mid-run: the service tells lost state from fencing, claims afresh, re-checkpoints the streams
  it holds and carries on: every offset annotated (byte-identical to the uninterrupted run: all streams were
  in memory, none lost context), `state.lost` logged and counted, the checkpoint back within one interval.
- Redis out of memory (`maxmemory` just above what it holds, `noeviction`): checkpoints fail and back off, the
  partition pauses at `checkpoint.max_uncheckpointed_records`, readiness is false and the metrics say why;
  with the memory back it recovers by itself, loses nothing and exits 0.
"""

from __future__ import annotations

import json
import signal
import time

import pytest
import redis as redis_lib

from model.loader import load_model
from pipeline.devstack.processes import free_port, start_redis
from tests.helpers.service import (
    SUITE_DTYPE,
    ServiceProcess,
    baseline,
    check_output,
    input_records,
    load,
    service_settings,
)
from tests.ops.probe import get, scrape, value

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def real_model():
    return load_model("smollm2-135m", device="cpu", dtype=SUITE_DTYPE)


@pytest.fixture
def own_redis(tmp_path):
    proc = start_redis(tmp_path / "own-redis")
    client = redis_lib.Redis(host="127.0.0.1", port=proc.port)
    try:
        yield f"redis://127.0.0.1:{proc.port}/0", client
    finally:
        client.close()
        proc.stop()


def _manifest(client, config, partition):
    raw = client.get(f"{config['redis']['key_prefix']}:manifest:{{{config['kafka']['input_topic']}:{partition}}}")
    return None if raw is None else json.loads(raw)


def _events(log: str, event: str) -> list[dict]:
    out = []
    for line in log.splitlines():
        if f'"{event}"' in line:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def test_redis_flushall_mid_run_is_state_loss_not_fencing(kafka_stack, own_redis, produce, read_topic, real_model,
                                                          tmp_path):
    url, client = own_redis
    topic = kafka_stack.make_topic("flush-in", 2)
    out_topic = kafka_stack.make_topic("flush-out", 1)
    config = service_settings(kafka_stack.bootstrap, url, topic, out_topic, kafka_stack.group("flush"), "flush")
    interval = 5.0
    config["checkpoint"].update({"every_records": 5, "every_seconds": interval})
    port = free_port()
    config["service"].update({"metrics_port": port, "metrics_host": "127.0.0.1"})
    records = input_records(2, 24)
    for p, items in records.items():
        produce(kafka_stack.bootstrap, topic, items, partition=p)
    expected = baseline(load(config), real_model, topic, records)
    svc = ServiceProcess.start(config, tmp_path, "flush", idle_exit_s=8)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not all(_manifest(client, config, p) for p in range(2)):
            time.sleep(0.2)
        assert all(_manifest(client, config, p) for p in range(2)), svc.log()[-3000:]
        client.flushall()
        flushed = time.monotonic()
        back: dict[int, float] = {}
        while time.monotonic() - flushed < 120 and len(back) < 2 and svc.proc.poll() is None:
            for p in range(2):
                if p not in back and _manifest(client, config, p) is not None:
                    back[p] = time.monotonic() - flushed
            time.sleep(0.1)
        assert svc.wait(300) == 0, svc.log()[-3000:]
    finally:
        svc.kill(signal.SIGKILL)
    log = svc.log()
    assert "Traceback" not in log and '"partition.dropped"' not in log, log[-3000:]
    lost, reclaimed = _events(log, "state.lost"), _events(log, "state.reclaimed")
    assert lost and reclaimed, log[-3000:]
    # No partition was left without a checkpoint for longer than one interval (plus a model step or two on a
    # loaded machine): the loss is found by the next checkpoint, the partition claimed afresh and written.
    assert set(back) == {0, 1} and max(back.values()) <= interval + 10.0, (back, log[-3000:])
    messages = read_topic(kafka_stack.bootstrap, out_topic, 1,
                          until=lambda got: {m["value"]["id"] for m in got} >= set(expected), timeout_s=60)
    check_output(messages, expected)  # every offset annotated, not one byte changed (every stream was resident)
    for p in range(2):
        doc = _manifest(client, config, p)
        assert doc["manifest"]["next_offset"] == 24 and doc["epoch"] >= 2, doc
    assert max(r["epoch"] for r in reclaimed) >= 2


def test_redis_out_of_memory_pauses_at_the_bound_and_recovers_by_itself(kafka_stack, own_redis, produce, read_topic,
                                                                        real_model, tmp_path):
    url, client = own_redis
    client.config_set("maxmemory-policy", "noeviction")
    topic = kafka_stack.make_topic("oom-in", 1)
    out_topic = kafka_stack.make_topic("oom-out", 1)
    config = service_settings(kafka_stack.bootstrap, url, topic, out_topic, kafka_stack.group("oom"), "oom")
    bound = 6
    config["checkpoint"].update({"every_records": 3, "every_seconds": 2.0, "max_uncheckpointed_records": bound,
                                 "retry_initial_s": 0.5, "retry_max_s": 2.0})
    port = free_port()
    config["service"].update({"metrics_port": port, "metrics_host": "127.0.0.1"})
    records = input_records(1, 24)
    produce(kafka_stack.bootstrap, topic, records[0][:4], partition=0)
    expected = baseline(load(config), real_model, topic, records)
    svc = ServiceProcess.start(config, tmp_path, "oom", idle_exit_s=6)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not _manifest(client, config, 0):
            time.sleep(0.2)
        assert _manifest(client, config, 0), svc.log()[-3000:]
        used = int(client.info("memory")["used_memory"])
        client.config_set("maxmemory", used + 256 * 1024)  # the next snapshot (megabytes) does not fit
        produce(kafka_stack.bootstrap, topic, records[0][4:], partition=0)
        seen = {"ready": set(), "redis_up": set(), "failures": 0.0, "paused": False}
        full_since = time.monotonic()
        while time.monotonic() - full_since < 30:  # Redis stays full for 30 s
            if get(f"http://127.0.0.1:{port}/healthz")[0] == 200:
                seen["ready"].add(get(f"http://127.0.0.1:{port}/readyz")[0])
                samples = scrape(port)
                seen["redis_up"].add(value(samples, "sinkstream_redis_up"))
                seen["failures"] = value(samples, "sinkstream_checkpoint_failures_total", reason="store") or 0.0
            seen["paused"] = seen["paused"] or '"partition.paused"' in svc.log()
            time.sleep(0.5)
        during = len(read_topic(kafka_stack.bootstrap, out_topic, 1, until=lambda g: False, timeout_s=2.0))
        client.config_set("maxmemory", 0)
        assert svc.wait(300) == 0, svc.log()[-3000:]
    finally:
        svc.kill(signal.SIGKILL)
    log = svc.log()
    assert "Traceback" not in log, log[-3000:]
    assert "OOM" in log and seen["paused"], log[-3000:]
    assert 503 in seen["ready"] and 0 in seen["redis_up"] and seen["failures"] >= 1, seen
    # Paused at the bound: at most `bound` records past the last checkpoint (plus a group in flight) came out.
    assert during <= 4 + bound + 4, during
    messages = read_topic(kafka_stack.bootstrap, out_topic, 1,
                          until=lambda got: {m["value"]["id"] for m in got} >= set(expected), timeout_s=60)
    check_output(messages, expected)  # nothing lost, nothing changed
    assert _manifest(client, config, 0)["manifest"]["next_offset"] == 24
    assert '"redis.available"' in log
