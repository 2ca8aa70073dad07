"""Dialogue mode (`service.mode: dialogue`) against the real broker (tansu) and the real Redis, seen through an
independent client (confluent-kafka), with the real SmolLM2-135M-Instruct model.

Keyed user turns of a few conversations go in; the service is SIGKILLed mid-conversation twice and restarted;
after dropping duplicates by id, the `reply` annotations must be byte-identical to an uninterrupted run
computed offline the same way as the score baseline (`tests.helpers.service.baseline`, one session per
conversation, record by record).
"""

from __future__ import annotations

import json
import random
import signal

import pytest

from model.loader import load_model
from tests.helpers.service import SUITE_DTYPE, ServiceProcess, baseline, check_output, load, service_settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Two conversations per partition, interleaved; five turns each.
CONVERSATIONS = {
    0: {b"ada": ["Hi! What is your name?", "What is a log file?", "Why do servers write logs?",
                 "Name one log level.", "Thanks, goodbye."],
        b"bo": ["Hello there.", "What is Kafka?", "What is a topic?", "And a partition?", "Bye!"]},
    1: {b"cy": ["Good morning.", "What is Redis?", "Is it fast?", "What is a cache?", "See you."],
        b"di": ["Hey.", "Tell me a fact about the sea.", "Another one?", "Why is it blue?", "Thanks!"]},
}


@pytest.fixture(scope="module")
def real_model():
    return load_model("smollm2-135m", device="cpu", dtype=SUITE_DTYPE)


def _records() -> dict[int, list[tuple[bytes, bytes, dict]]]:
    out: dict[int, list] = {}
    for p, convs in CONVERSATIONS.items():
        items = []
        for i in range(5):
            for key, turns in convs.items():
                items.append((key, turns[i].encode(), {}))
        out[p] = items
    return out


def test_sigkill_mid_conversation_then_restart_gives_identical_replies(
    kafka_stack, redis_server, produce, read_topic, real_model, tmp_path
):
    bootstrap = kafka_stack.bootstrap
    topic = kafka_stack.make_topic("dialogue-in", 2)
    out_topic = kafka_stack.make_topic("dialogue-out", 1)
    config = service_settings(bootstrap, redis_server.url, topic, out_topic, kafka_stack.group("dialogue"),
                              redis_server.unique_prefix("dialogue"))
    config["service"].update({"mode": "dialogue"})
    config["dialogue"] = {"max_reply_tokens": 8}
    config["checkpoint"]["every_records"] = 3
    records = _records()
    for p, items in records.items():
        produce(bootstrap, topic, items, partition=p)
    expected = baseline(load(config), real_model, topic, records)
    total = sum(len(items) for items in records.values())
    assert len(expected) == total and all(aid.endswith("/reply") for aid in expected)
    replies = [json.loads(v) for v in expected.values()]
    assert {r["reply"]["turn"] for r in replies} == set(range(5))
    assert all(r["reply"]["text"].strip() for r in replies)  # the instruct model answers something

    rng = random.Random(12)
    runs = []
    for attempt in range(2):
        svc = ServiceProcess.start(config, tmp_path, f"dialogue-crash{attempt}")
        svc.wait_for_log('"partition.assigned"')
        seen = len(read_topic(bootstrap, out_topic, 1, until=lambda g: False, timeout_s=1.0))
        target = seen + rng.randint(3, 6)
        read_topic(bootstrap, out_topic, 1, until=lambda g, target=target: len(g) >= target, timeout_s=180)
        svc.kill(signal.SIGKILL)  # mid-conversation: no shutdown hook, no final checkpoint
        assert svc.proc.returncode == -signal.SIGKILL
        runs.append(svc)
    final = ServiceProcess.start(config, tmp_path, "dialogue-final", idle_exit_s=4)
    runs.append(final)
    assert final.wait(300) == 0, final.log()[-3000:]
    assert "Traceback" not in final.log(), final.log()[-3000:]
    messages = read_topic(bootstrap, out_topic, 1, until=lambda g: {m["value"]["id"] for m in g} >= set(expected),
                          timeout_s=60)
    check_output(messages, expected)  # every reply byte-identical to the uninterrupted run, replayed copies too
    # The resume path ran: a conversation restored mid-way from a checkpoint. (Whether a kill also leaves replies
    # published after the last checkpoint, i.e. replayed copies, depends on where it lands against the 3-record
    # cadence; in the 2026-12-06 runs both kills landed right after a checkpoint, so it is not asserted here.)
    resumed = [json.loads(line)["resume_offset"] for svc in runs for line in svc.log().splitlines()
               if '"partition.assigned"' in line]
    assert any(o is not None and 0 < o < 10 for o in resumed), resumed  # a conversation restored mid-way
    for p in records:
        key = f"{config['redis']['key_prefix']}:manifest:{{{topic}:{p}}}"
        manifest = json.loads(redis_server.client().get(key))
        assert manifest["manifest"]["next_offset"] == len(records[p])
