"""Properties of manifest parsing (`RedisStateStore.read_manifest` / `_parse_manifest`) on fakeredis: whatever
bytes sit under a partition's manifest key, the store returns the documented checkpoint document
(`connectors.manifest.CheckpointDocument`) or raises `CorruptStateError`, the error the service turns into
"reset the partition's context with a notice". Anything else escapes `Service._claim` (inside the rebalance
callback) and stops the process on every restart: a crash loop.
"""

from __future__ import annotations

import json

import fakeredis
from hypothesis import example, given
from hypothesis import strategies as st

from connectors.errors import CorruptStateError
from connectors.manifest import CheckpointDocument
from connectors.redis_store import RedisStateStore

PID = "in:0"
_SERVER = fakeredis.FakeServer()  # one in-memory server for the module; each example overwrites the key


def _store() -> tuple[RedisStateStore, fakeredis.FakeRedis]:
    client = fakeredis.FakeRedis(server=_SERVER)
    return RedisStateStore(client, key_prefix="fuzz"), client


def _read(raw: bytes):
    store, client = _store()
    client.set(f"fuzz:manifest:{{{PID}}}", raw)
    try:
        return store.read_manifest(PID)
    except CorruptStateError as exc:
        return exc


def _valid_doc() -> dict:
    return {"format": 1, "partition": PID, "epoch": 3, "seq": 7, "written_at_ms": 1700000000000,
            "snapshots": {"s": "fuzz:snap:{in:0}:s:3:7"},
            "manifest": {"next_offset": 12, "topic": "in", "partition": 0}}


_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=10)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=10,
)


@given(st.binary(max_size=300))
def test_arbitrary_bytes_are_refused_with_corrupt_state(raw):
    result = _read(raw)
    assert isinstance(result, (dict, CorruptStateError))
    if isinstance(result, dict):  # only a real document is accepted (arbitrary bytes almost never are)
        CheckpointDocument.model_validate(result)


@given(st.data())
def test_mutations_of_a_valid_document_are_refused_or_still_documents(data):
    raw = bytearray(json.dumps(_valid_doc()).encode())
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "truncate", "insert"]))
        at = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if op == "flip" and raw:
            raw[at] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "truncate":
            del raw[at:]
        else:
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    result = _read(bytes(raw))
    assert isinstance(result, (dict, CorruptStateError))


def test_a_valid_document_round_trips():
    assert _read(json.dumps(_valid_doc()).encode()) == _valid_doc()


# ---- known bugs (coordinator: connectors/redis_store.py _parse_manifest) --------------------------------------


@given(st.fixed_dictionaries({"format": st.just(1),
                              "snapshots": st.dictionaries(st.text(max_size=4), _json, max_size=2),
                              "manifest": _json}))
@example({"format": 1, "snapshots": {}, "manifest": []})
@example({"format": 1, "snapshots": {"s": None}, "manifest": {}})
def test_any_json_document_is_a_checkpoint_document_or_refused(doc):
    result = _read(json.dumps(doc).encode())
    assert isinstance(result, CorruptStateError) or CheckpointDocument.model_validate(result)


@given(st.integers(20_000, 200_000))
@example(100_000)
def test_a_deeply_nested_manifest_is_refused_with_corrupt_state(depth):
    try:
        result = _read(b"[" * depth)
    except RecursionError as exc:
        raise AssertionError("RecursionError escaped read_manifest") from exc
    assert isinstance(result, CorruptStateError)


def test_a_manifest_of_the_wrong_shape_resets_the_partition_instead_of_stopping_the_service(text_lm):
    from connectors.memory import MemorySink, MemorySource, MemoryTopic
    from pipeline.service.engine import Engine
    from pipeline.service.service import Service
    from pipeline.settings import load_settings

    settings = load_settings(None, cache={"sinks": 2, "window": 32, "chunk": 16}, kafka={"output_topic": "out"},
                             checkpoint={"every_records": 2, "every_seconds": 3600})
    server = fakeredis.FakeServer()
    client = fakeredis.FakeRedis(server=server)
    store = RedisStateStore(client, key_prefix="wrong-shape")
    client.set("wrong-shape:manifest:{in:0}", json.dumps({**_valid_doc(), "snapshots": {}, "manifest": []}))
    topic = MemoryTopic("in")
    topic.append(0, b"s", b"INFO one\n")
    sink = MemorySink()
    service = Service(settings, Engine(text_lm, settings), MemorySource.factory(topic), sink, store)
    assert service.run(idle_exit_s=0.2, install_signals=False) == 0
    errors = [a for a in sink.values("out") if a["kind"] == "error"]
    assert any(a["error"]["problems"][0]["reason"] == "context_reset" for a in errors)
