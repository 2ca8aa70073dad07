"""The service against the real broker (tansu) and the real Redis, seen through an independent client.

Producers and consumers here are confluent-kafka (librdkafka), which shares no code with the service.
The expected output is an uninterrupted run computed offline with the same model; crashes (SIGKILL at
random points), restarts, rebalances and a paused zombie owner must not change a single byte of it after
duplicates are dropped by annotation id.
"""

from __future__ import annotations

import json
import random
import signal
import time
from collections import defaultdict

import pytest

from model.loader import cpu_bf16_flags, load_model
from tests.helpers.service import (
    SUITE_DTYPE,
    BaselineInBackground,
    ServiceProcess,
    check_output,
    input_records,
    load,
    service_settings,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def real_model():
    """The default model per dtype, loaded once per module."""
    models: dict[str, object] = {}

    def get(dtype: str):
        if dtype not in models:
            models[dtype] = load_model("smollm2-135m", device="cpu", dtype=dtype)
        return models[dtype]

    return get


needs_bf16 = pytest.mark.skipif(not cpu_bf16_flags(),
                                reason="this CPU has none of amx_bf16, avx512_bf16 (auto stays float32)")


@pytest.fixture
def scenario(kafka_stack, redis_server, produce, real_model, tmp_path):
    """Factory: a fresh input topic filled with keyed log streams, its output topic and the expected output.
    Service and baseline model get the same explicit `dtype`."""

    def make(partitions: int, per_partition: int, templates: bool = False, dtype: str = SUITE_DTYPE):
        topic = kafka_stack.make_topic("in", partitions)
        out_topic = kafka_stack.make_topic("out", 1)
        config = service_settings(kafka_stack.bootstrap, redis_server.url, topic, out_topic,
                                  kafka_stack.group("svc"), redis_server.unique_prefix("svc"), dtype=dtype)
        if templates:  # issue 18 with everything on: a reference of normal, both memories bounded (evicting)
            config["templates"] = {"reference": str(_reference(tmp_path)), "partition_max_clusters": 2,
                                   "stream_max_clusters": 4, "reference_session": r"blk_-?\d+"}
        records = input_records(partitions, per_partition)
        for p, items in records.items():
            produce(kafka_stack.bootstrap, topic, items, partition=p)
        # Computed while the test's services run (one torch thread each): read only when the output is checked.
        expected = BaselineInBackground(load(config), real_model(dtype), topic, records)
        return config, out_topic, expected

    return make


def _reference(tmp_path):
    """A reference of normal: the first 40 lines of each Loghub sample the streams draw from (they start at 50)."""
    from pipeline.evaluation.datasets import loghub_dir

    path = tmp_path / "normal.txt"
    names = ("HDFS_2k.log", "OpenSSH_2k.log", "Zookeeper_2k.log", "Apache_2k.log")
    path.write_text("".join(line + "\n" for f in names
                            for line in (loghub_dir() / f).read_text(errors="replace").splitlines()[:40]))
    return path


def _check_templates(messages, manifests):
    """Issue 18 was on: lines carry templates (some in the reference, some not) and verdicts; manifests hold
    the partition's template memory."""
    lines = [x for m in messages if m["value"]["kind"] == "score" for x in m["value"]["score"]["lines"]]
    assert lines and all(x["template"] is not None and x["score"] is not None for x in lines)
    assert {x["template"]["seen_reference"] > 0 for x in lines} == {True, False}
    verdicts = [m["value"]["score"]["verdict"] for m in messages
                if m["value"]["kind"] == "score" and m["value"]["score"]["lines"]]
    assert all(v["lines"] > 0 and v["key_score"] is not None for v in verdicts)
    # the reference's HDFS lines are sessions (templates.reference_session): every verdict has a distance
    assert all(0.0 <= v["profile_distance"] <= 1.0 for v in verdicts)
    for doc in manifests:
        assert doc["manifest"]["templates"]["ref_lines"] == 160 and doc["manifest"]["templates"]["lines"] > 0
        assert doc["manifest"]["templates"]["profiles"]  # the normal sessions' profiles are saved with it


def _have_all(expected):
    return lambda got: {m["value"]["id"] for m in got} >= set(expected)


@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=needs_bf16)])
def test_sigkill_at_random_points_then_restart_gives_identical_annotations(
    scenario, read_topic, kafka_stack, redis_server, tmp_path, dtype
):
    config, out_topic, expected = scenario(partitions=2, per_partition=24, templates=True, dtype=dtype)
    rng = random.Random(20231105)
    bootstrap = kafka_stack.bootstrap
    for attempt in range(3):
        svc = ServiceProcess.start(config, tmp_path, f"crash{attempt}")
        svc.wait_for_log('"partition.assigned"')
        seen = len(read_topic(bootstrap, out_topic, 1, until=lambda g: False, timeout_s=1.0))
        target = seen + rng.randint(3, 9)
        read_topic(bootstrap, out_topic, 1, until=lambda g, target=target: len(g) >= target, timeout_s=90)
        svc.kill(signal.SIGKILL)  # no shutdown hook, no final checkpoint
        assert svc.proc.returncode == -signal.SIGKILL
    final = ServiceProcess.start(config, tmp_path, "final", idle_exit_s=4)
    assert final.wait(300) == 0, final.log()[-3000:]
    messages = read_topic(bootstrap, out_topic, 1, until=_have_all(expected), timeout_s=60)
    duplicates = check_output(messages, expected)
    assert duplicates > 0, "the kills should have caused replays; the test did not exercise the resume path"
    for p in range(2):  # the last run left a checkpoint at the end of every partition
        assert _manifest(redis_server, config, p)["manifest"]["next_offset"] == 24
    _check_templates(messages, [_manifest(redis_server, config, p) for p in range(2)])


def test_rebalance_moves_partitions_with_state_and_fences_the_zombie(
    scenario, read_topic, kafka_stack, redis_server, tmp_path
):
    config, out_topic, expected = scenario(partitions=4, per_partition=24, templates=True)
    bootstrap = kafka_stack.bootstrap
    first = ServiceProcess.start(config, tmp_path, "p1")
    first.wait_for_log('"partition.assigned"')
    second = ServiceProcess.start(config, tmp_path, "p2")
    second.wait_for_log('"partition.assigned"')
    first.wait_for_log('"partition.revoked"')  # cooperative rebalance handed some partitions over
    owned_by_second = _assigned(second.log())
    assert owned_by_second and len(owned_by_second) < 4, owned_by_second
    read_topic(bootstrap, out_topic, 1, until=lambda g: len(g) >= 16, timeout_s=120)

    first.kill(signal.SIGSTOP)  # a zombie: alive, but silent past its session timeout
    before = len(second.log())
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(_assigned(second.log()[before:])) == 0:
        time.sleep(0.5)
    taken_over = _assigned(second.log()[before:])
    assert taken_over - owned_by_second, f"the survivor never took over the zombie's partitions: {second.log()[-2000:]}"
    first.kill(signal.SIGCONT)  # the zombie wakes up and tries to go on with its stale state
    read_topic(bootstrap, out_topic, 1, until=_have_all(expected), timeout_s=300)
    # Every annotation can be out before the survivor has caught up: the zombie published some past its last
    # checkpoint, and the survivor re-processes them from there. Stop it once every manifest is at the end.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not all(_at_end(redis_server, config, p, 24) for p in range(4)):
        time.sleep(0.5)
    second.kill(signal.SIGTERM)
    assert second.proc.returncode == 0, second.log()[-3000:]
    first.kill(signal.SIGTERM)

    messages = read_topic(bootstrap, out_topic, 1, until=_have_all(expected), timeout_s=30)
    try:
        check_output(messages, expected)
    except AssertionError as exc:  # say what each member did with its partitions
        raise AssertionError(f"{exc}\n--- p1 ---\n{_partition_events(first.log())}\n"
                             f"--- p2 ---\n{_partition_events(second.log())}") from None
    # No stale owner overwrote state: every manifest is at the end of its partition, written under an epoch
    # no newer than the current one (a zombie's writes are refused by the compare-and-set).
    store = redis_server.client()
    for p in range(4):
        doc = _manifest(redis_server, config, p)
        assert doc["manifest"]["next_offset"] == 24
        assert doc["epoch"] <= int(
            store.get(f"{config['redis']['key_prefix']}:epoch:{{{config['kafka']['input_topic']}:{p}}}")
        )
    _check_templates(messages, [_manifest(redis_server, config, p) for p in range(4)])
    zombie = first.log()
    assert '"checkpoint.fenced"' in zombie or '"partition.lost"' in zombie, zombie[-3000:]


def _partition_events(log: str) -> str:
    """The lines of a service log that tell what happened to its partitions (rebalances, claims, fencing)."""
    keep = ('"kafka.rebalance"', '"partition.', '"checkpoint.fenced"', '"state.', '"service.')
    return "\n".join(line[:300] for line in log.splitlines() if any(k in line for k in keep))[-6000:]


def _assigned(log: str) -> set[str]:
    parts = set()
    for line in log.splitlines():
        if '"partition.assigned"' in line:
            parts.add(json.loads(line)["partition"])
    return parts


def _at_end(redis_server, config: dict, partition: int, end: int) -> bool:
    key = f"{config['redis']['key_prefix']}:manifest:{{{config['kafka']['input_topic']}:{partition}}}"
    raw = redis_server.client().get(key)
    return raw is not None and json.loads(raw)["manifest"]["next_offset"] == end


def _manifest(redis_server, config: dict, partition: int) -> dict:
    key = f"{config['redis']['key_prefix']}:manifest:{{{config['kafka']['input_topic']}:{partition}}}"
    raw = redis_server.client().get(key)
    assert raw is not None, f"no manifest at {key}"
    return json.loads(raw)


def test_redis_paused_30s_mid_run_loses_nothing_and_exits_0(scenario, read_topic, kafka_stack, redis_server, tmp_path):
    """Issue 10: a Redis that hangs for 30 s never crashes the service; every input is annotated exactly once
    after dedupe (byte-identical to the uninterrupted baseline) and the run ends with exit code 0."""
    import os

    config, out_topic, expected = scenario(partitions=2, per_partition=24)
    config["redis"]["socket_timeout_s"] = 3.0
    svc = ServiceProcess.start(config, tmp_path, "redis-pause", idle_exit_s=6)
    svc.wait_for_log('"checkpoint.done"')
    os.kill(redis_server.process.pid, signal.SIGSTOP)
    try:
        svc.wait_for_log('"redis.unavailable"', timeout_s=60)
        time.sleep(30)
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)
    assert svc.wait(300) == 0, svc.log()[-3000:]
    log = svc.log()
    assert '"redis.available"' in log and "Traceback" not in log, log[-3000:]
    messages = read_topic(kafka_stack.bootstrap, out_topic, 1, until=_have_all(expected), timeout_s=60)
    check_output(messages, expected)
    for p in range(2):
        assert _manifest(redis_server, config, p)["manifest"]["next_offset"] == 24


def test_hostile_records_through_the_real_broker_each_get_a_result(kafka_stack, redis_server, read_topic, tmp_path):
    """Issue 10: invalid UTF-8, NUL/control bytes, an invalid-UTF-8 key, unknown headers, an empty value, a
    tombstone, a 1 MB value without a newline, a 5 MB value and 100,000 newlines, between normal lines: each gets
    a score or an error annotation within the limits, normal lines after them keep flowing, memory stays bounded."""
    import threading

    from confluent_kafka import Producer

    topic = kafka_stack.make_topic("hostile", 1)
    out_topic = kafka_stack.make_topic("hostile-out", 1)
    config = service_settings(kafka_stack.bootstrap, redis_server.url, topic, out_topic,
                              kafka_stack.group("hostile"), redis_server.unique_prefix("hostile"))
    config["service"].update({"max_record_tokens": 512})
    config["kafka"]["max_poll_records"] = 8
    normal = [(b"s", f"INFO block {i} replicated to 3 nodes\n".encode(), None) for i in range(4)]
    hostile = [
        (b"s", b"\xff\xfe bad utf-8 \x00\x01\x02 control\n", None),
        (b"\xc3\x28", b"line under an invalid-UTF-8 key\n", {"x-unknown": b"\x00\xff"}),
        (b"s", b"", None),
        (b"s", None, None),  # tombstone
        (b"s", b"A" * 1_000_000, None),  # 1 MB, no newline
        (b"s", (b"word " * 200 + b"\n") * 5_000, None),  # 5 MB
        (b"s", b"\n" * 100_000, None),
    ]
    items = normal + hostile + normal
    producer = Producer({"bootstrap.servers": kafka_stack.bootstrap, "message.max.bytes": 8_000_000})
    for key, value, headers in items:
        producer.produce(topic, key=key, value=value, headers=list((headers or {}).items()), partition=0)
    assert producer.flush(60) == 0
    svc = ServiceProcess.start(config, tmp_path, "hostile", idle_exit_s=4)
    peak = {"kb": 0}

    def sample():
        while svc.proc.poll() is None:
            try:
                status = open(f"/proc/{svc.proc.pid}/status").read()
                peak["kb"] = max(peak["kb"], int(status.split("VmHWM:")[1].split()[0]))
            except (OSError, IndexError):
                pass
            time.sleep(0.2)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    started = time.monotonic()
    assert svc.wait(600) == 0, svc.log()[-3000:]
    seconds = time.monotonic() - started
    watcher.join(2)
    scored = lambda g: {m["value"]["source"]["offset"] for m in g if m["value"]["kind"] == "score"}  # noqa: E731
    messages = read_topic(kafka_stack.bootstrap, out_topic, 1, until=lambda g: scored(g) >= set(range(len(items))),
                          timeout_s=60)
    by_offset = defaultdict(dict)
    for m in messages:
        by_offset[m["value"]["source"]["offset"]][m["value"]["kind"]] = m["value"]
    assert sorted(by_offset) == list(range(len(items)))  # every record got a result
    assert all("score" in by_offset[o] for o in by_offset)
    reasons = {
        o: [p["reason"] for p in a["error"]["problems"]]
        for o, d in by_offset.items()
        for k, a in d.items()
        if k == "error"
    }
    assert reasons[8] == ["record_too_many_tokens"]  # 1 MB without newline: cut into long lines, budget applies
    assert reasons[9][0] == "record_too_large"  # 5 MB: only the first MiB is read
    assert reasons[10] == ["record_too_many_tokens"]  # 100,000 newlines
    assert sorted(reasons) == [8, 9, 10]
    assert by_offset[5]["score"]["stream"] == "hex:c328"
    tail = [by_offset[o]["score"] for o in range(len(items) - 4, len(items))]
    assert all(t["score"]["lines"] and t["score"]["tokens"] > 0 for t in tail)  # normal lines after the hostile ones
    print(f"hostile run: {seconds:.1f} s for {len(items)} records, service peak RSS {peak['kb'] / 1024:.0f} MiB")
    assert peak["kb"] < 3 * 1024 * 1024, f"peak RSS {peak['kb'] / 1024:.0f} MiB above the documented 3 GiB bound"


def test_sigterm_with_a_full_poll_pending_exits_within_the_grace_period(scenario, read_topic, kafka_stack, tmp_path):
    """Issue 10: shutdown is checked between groups, not after a whole poll: with 48 records in one poll, SIGTERM
    after the first annotation ends the process (exit 0, final checkpoint written) well inside the 120 s grace
    period of deploy/, and the records it did not reach are simply processed by the next owner."""
    config, out_topic, expected = scenario(partitions=1, per_partition=48)
    config["kafka"]["max_poll_records"] = 256
    config["service"]["batch_tokens"] = 64  # a few records per group
    svc = ServiceProcess.start(config, tmp_path, "sigterm")
    read_topic(kafka_stack.bootstrap, out_topic, 1, until=lambda g: len(g) >= 1, timeout_s=120)
    started = time.monotonic()
    svc.kill(signal.SIGTERM)
    seconds = time.monotonic() - started
    assert svc.proc.returncode == 0, svc.log()[-3000:]
    assert seconds < 60, f"SIGTERM took {seconds:.0f} s"
    log = svc.log()
    assert '"service.poll_cut"' in log and '"reason": "shutdown"' in log, log[-3000:]
    done = len(read_topic(kafka_stack.bootstrap, out_topic, 1, until=lambda g: False, timeout_s=2))
    assert done < 48  # it really stopped mid-poll
    final = ServiceProcess.start(config, tmp_path, "sigterm-final", idle_exit_s=4)
    assert final.wait(600) == 0, final.log()[-3000:]
    check_output(read_topic(kafka_stack.bootstrap, out_topic, 1, until=_have_all(expected), timeout_s=60), expected)
