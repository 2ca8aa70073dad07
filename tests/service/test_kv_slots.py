"""One owner of KV capacity (`pipeline.service.backend.KVSlots`, issue 17): named reservations, yes-or-no
answers, and a full pool of multi-pass records that still rolls a failed stream back to its record's start."""

from __future__ import annotations

import pytest

from connectors.memory import MemorySink, MemorySource, MemoryStore, MemoryTopic
from pipeline.service.backend import CacheFull, KVSlots, PoolBackend
from pipeline.service.engine import Engine
from pipeline.service.service import Service
from pipeline.settings import load_settings


def test_reservations_answer_yes_or_no_and_backups_borrow_only_idle_stream_slots():
    slots = KVSlots({"stream": 2, "backup": 1, "pad": 1, "scratch": 1})
    assert slots.capacity == 5 and slots.room("stream") == 2 and slots.room("backup") == 3
    assert slots.take("stream") is not None and slots.take("backup") is not None
    assert slots.room("backup") == 1  # the reserved one is taken; one idle stream slot may be borrowed
    assert slots.take("backup") is not None and slots.borrowed == 1
    assert slots.room("stream") == 0 and slots.take("stream") is None  # the borrowed slot is not a stream's now
    assert slots.take("backup") is None
    slots.give("backup")
    assert slots.borrowed == 0 and slots.room("stream") == 1
    with slots.hold("scratch"):
        with pytest.raises(CacheFull, match="no scratch KV slot"):
            with slots.hold("scratch"):
                pass
    assert slots.room("scratch") == 1
    with pytest.raises(ValueError, match="expected a pad slot in use"):
        slots.give("pad")


def test_the_pool_has_exactly_the_reserved_slots(text_lm):
    settings = load_settings(None, cache={"sinks": 4, "window": 32, "chunk": 16},
                             service={"max_resident_streams": 3, "backup_slots": 2})
    backend = Engine(text_lm, settings).backend
    assert isinstance(backend, PoolBackend)
    assert backend.pool.capacity == 3 + 2 + 1 + 1 and backend.slots.used["pad"] == 1
    handles = [backend.new() for _ in range(3)]
    with pytest.raises(CacheFull, match="all 3 resident KV slots are in use"):
        backend.new()
    backend.release(handles[0])
    backend.release(backend.new())
    assert backend.pool.free_slots == 1 + 2 + 1  # one stream slot, the backups and the scratch slot


def _run(lm, settings, topic, fail_on: int | None):
    sink, service = MemorySink(), None
    service = Service(settings, Engine(lm, settings), MemorySource.factory(topic), sink, MemoryStore())
    backend = service.engine.backend
    assert isinstance(backend, PoolBackend)
    taken: list[str] = []
    real_take, real_step = backend.take_backup, backend.step

    def take_backup(handle, tokens):
        backup = real_take(handle, tokens)
        taken.append("wait" if backup is None else "slot" if backup.slot is not None else "columns")
        return backup

    def step(slots, chunks, prev):
        if fail_on is not None and any(fail_on in chunk for chunk in chunks):
            raise RuntimeError("injected failure of the model step")  # not a device failure: recoverable
        return real_step(slots, chunks, prev)

    backend.take_backup = take_backup  # type: ignore[method-assign]
    backend.step = step  # type: ignore[method-assign]
    assert service.run(idle_exit_s=0.2, install_signals=False) == 0
    assert backend.slots.used["backup"] == 0 and backend.slots.borrowed == 0  # every backup given back
    return sink.values("out"), taken


def test_a_full_pool_of_multi_pass_records_rolls_a_failed_stream_back_to_its_record_start(text_lm, one_thread):
    """Three resident streams fill the pool (no idle stream slot to borrow) and one backup slot is reserved; in
    one group every stream is fed a record of several forward passes. The records take turns on the backup slot
    (two wait), and the stream whose record fails on a later pass is rolled back to the record's start: its
    next record is scored exactly as if the failed record had never come (a reset would have lost its first
    record), and the other streams' model outputs are bit-identical to a run without the failure."""
    long = "".join(f"GET /item/{i} 200 served in {i % 7} ms\n" for i in range(5))
    topic = MemoryTopic("in")
    for key in (b"k0", b"k1", b"bad"):
        topic.append(0, key, b"INFO start of the stream\n")
    for key in (b"k0", b"k1", b"bad"):
        body = long + ("poison now\n" if key == b"bad" else "fine now\n")
        topic.append(0, key, body.encode())
    for key in (b"k0", b"k1", b"bad"):
        topic.append(0, key, b"INFO after the long record\n")
    # One group holds the first two records of every stream (a failed stream's records left in its group all
    # fail with it); the third ones come in the next group.
    def settings_for(batch_tokens):
        return load_settings(None, cache={"sinks": 4, "window": 64, "chunk": 16},
                             kafka={"output_topic": "out", "max_poll_records": 64},
                             service={"max_resident_streams": 3, "backup_slots": 1, "batch_tokens": batch_tokens},
                             checkpoint={"every_records": 1000, "every_seconds": 3600})

    engine = Engine(text_lm, settings_for(1000))
    assert len(engine.tokenize(long)) > 2 * 16  # several passes each
    poison = engine.tokenize("poison now\n")[0]
    settings = settings_for(sum(len(engine.tokenize(line)) for r in topic.partitions[0][:6]
                                for line in r.value.decode().splitlines(keepends=True)))

    failed, taken = _run(text_lm, settings, topic, fail_on=poison)
    clean, _ = _run(text_lm, settings, topic, fail_on=None)
    print("backups:", taken)
    assert "columns" in taken  # most backups are a few columns, not a slot
    bad = [a for a in failed if a["stream"] == "bad"]
    assert [a["kind"] for a in bad] == ["score", "error", "score"]
    problems = bad[1]["error"]["problems"]
    assert [p["reason"] for p in problems] == ["model_step_failed"]  # no context_reset
    assert bad[1]["tokens_seen"] == bad[0]["tokens_seen"]  # back to the record's start
    # The stream's next record sees exactly its first record: as a run in which the long record never came.
    skipped = MemoryTopic("in")
    for r in topic.partitions[0]:
        if not (r.key == b"bad" and b"poison" in r.value):
            skipped.append(0, r.key, r.value)
    reference = [a for a in _run(text_lm, settings, skipped, fail_on=None)[0] if a["stream"] == "bad"]
    assert [x["score"]["lines"] for x in (bad[2], reference[1])] == [reference[1]["score"]["lines"]] * 2
    assert bad[2]["tokens_seen"] == reference[1]["tokens_seen"]
    # The other streams' model outputs are bit-identical to the run without the failure (their template ids and
    # combined scores may differ: the partition's template memory never saw the failed record's lines).
    def model_side(values):
        return [(a["id"], a["tokens_seen"], [(x["mean_nll"], x["top"], x["z"]) for x in a["score"]["lines"]])
                for a in values if a["stream"] != "bad"]

    assert model_side(failed) == model_side(clean)


def test_a_column_backup_rolls_a_slot_back_exactly_after_a_record_of_several_forwards(text_lm, one_thread):
    """Deep in a stream (the ring has wrapped many times), a record of several forwards overwrites kept-window
    columns; the column backup taken before it puts the slot back bit for bit, and the next forward from the
    rolled-back slot equals one from a slot that never saw the record."""
    import torch

    settings = load_settings(None, cache={"sinks": 4, "window": 64, "chunk": 16},
                             service={"max_resident_streams": 2, "backup_slots": 1})
    backend = Engine(text_lm, settings).backend
    assert isinstance(backend, PoolBackend)
    pool = backend.pool
    gen = torch.Generator().manual_seed(7)

    def ids(n):
        return torch.randint(100, 20_000, (n,), generator=gen).tolist()

    slot, other = backend.new(), backend.new()
    backup = None
    for _ in range(200):  # walk the stream until a 40-token record has no frame move inside it
        chunk = ids(8)
        backend.step([slot, other], [chunk, chunk], [None, None])
        backup = backend.take_backup(slot, 40)
        if (backup is not None and backup.slot is None and backup.cols is not None and backup.cols.numel()
                and pool.seen[slot] > 2 * pool.ring):
            break
        if backup is not None:
            backend.drop_backup(backup)
        backup = None
    assert backup is not None and pool.seen[slot] > 2 * pool.ring
    before = pool.slot_tensors(slot)
    assert all(torch.equal(a, b) for (a, b) in zip(pool.slot_tensors(other).layers[0], before.layers[0]))
    record = ids(40)
    for start in range(0, 40, 16):  # the record's forwards, then a failure would roll it back
        backend.step([slot], [record[start:start + 16]], [None])
    backend.roll_back(slot, backup)
    backend.drop_backup(backup)
    after = pool.slot_tensors(slot)
    assert (after.seen, after.base) == (before.seen, before.base)
    for (k0, v0), (k1, v1) in zip(before.layers, after.layers):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)
    nxt = ids(16)
    ours, theirs = backend.step([slot, other], [nxt, nxt], [None, None])
    assert torch.equal(ours.nll[1:], theirs.nll[1:]) and torch.equal(ours.last_logits, theirs.last_logits)
