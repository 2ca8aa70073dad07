"""Properties of a stream session on hostile input, on a tiny Llama with SmolLM2's tokenizer (`text_lm`).

`StreamSession.prepare` must take any bytes (invalid UTF-8, NUL, control bytes, records that end inside a
character) without raising, hand out valid `str` lines that give back the stream's text, and stay within the
record limits. `finish` must publish annotations that validate and fit `service.max_annotation_bytes`.
`StreamSession.restore` must refuse a damaged snapshot with `SnapshotError` only.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import struct

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from connectors.memory import MemorySink, MemorySource, MemoryStore, MemoryTopic
from connectors.protocols import Record
from model.snapshot import SnapshotError
from pipeline.service import annotations as ann
from pipeline.service.engine import Engine
from pipeline.service.service import Service
from pipeline.service.session import StreamSession, stream_key
from pipeline.settings import load_settings

LIMITS = {"max_pending_bytes": 64, "max_record_bytes": 512, "max_record_tokens": 96, "max_annotation_bytes": 4096}


def _settings(**service):
    return load_settings(None, cache={"sinks": 2, "window": 32, "chunk": 16}, kafka={"output_topic": "out"},
                         checkpoint={"every_records": 2, "every_seconds": 3600}, service={**LIMITS, **service})


@pytest.fixture(scope="module")
def engine(text_lm):
    return Engine(text_lm, _settings())


@contextlib.contextmanager
def _session(engine, key: str = "s"):
    """A session whose KV slot is given back afterwards (pooled backends hold a fixed number of slots)."""
    session = StreamSession(engine, key)
    try:
        yield session
    finally:
        release = getattr(session, "release", None)
        if release is not None:
            release()


_records = st.lists(st.one_of(st.binary(max_size=200),
                              st.text(max_size=80).map(lambda t: t.encode("utf-8", "surrogatepass")),
                              st.sampled_from([b"\n" * 300, b"\xff\xfe\x00\x01", b"\xe2\x82", b"\xac ok\n",
                                               b"x" * 700])),
                    min_size=1, max_size=8)


@given(_records)
def test_prepare_takes_any_bytes_and_stays_within_the_limits(engine, values):
    with _session(engine) as session:
        for offset, value in enumerate(values):
            work = engine.prepare(session, Record("in", 0, offset, b"s", value))
            assert all(isinstance(line, str) for line in work.lines)
            for line in work.lines:
                line.encode("utf-8")  # no lone surrogates
            assert work.tokens <= LIMITS["max_record_tokens"]
            assert len(session.chunker.pending) <= LIMITS["max_pending_bytes"]
            reasons = [p.reason for p in work.problems]
            assert ("record_too_large" in reasons) == (len(value) > LIMITS["max_record_bytes"])
            session.counters.next_offset = offset + 1  # what Engine.finish does


@given(st.lists(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n"), max_size=12),
                max_size=6),
       st.lists(st.integers(0, 10_000), max_size=10))
def test_valid_utf8_lines_round_trip_through_prepare_however_records_cut_them(engine, lines, cuts):
    text = "".join(line + "\n" for line in lines)  # lines of at most 48 bytes: below max_pending_bytes
    raw = text.encode()
    points = sorted({c % (len(raw) + 1) for c in cuts})
    bounds = [0, *points, len(raw)]
    got, problems = [], []
    with _session(engine) as session:
        for offset, (a, b) in enumerate(itertools.pairwise(bounds)):
            work = engine.prepare(session, Record("in", 0, offset, b"s", raw[a:b]))
            got += work.lines
            problems += work.problems
            session.counters.next_offset = offset + 1
        assume(not problems)  # a record over max_record_tokens (96) skips lines, reported (tested elsewhere)
        assert "".join(got) == text and session.chunker.pending == b""


@given(st.binary(max_size=200), st.binary(max_size=120))
def test_annotations_validate_and_fit_the_limit_for_keys_of_ordinary_size(engine, value, key):
    record = Record("in", 0, 0, key, value)
    with _session(engine, stream_key(record)) as session:  # the service names the stream after the key
        annotations = session.process(record)
    for a in annotations:
        ann.validate(a)
        assert len(ann.encode_bounded(a, LIMITS["max_annotation_bytes"])) <= LIMITS["max_annotation_bytes"]


# ---- known bugs (coordinator) -----------------------------------------------------------------------------------


@given(st.integers(5_000, 50_000))
@example(5_000)
def test_annotations_fit_the_limit_whatever_the_key(engine, key_bytes):
    record = Record("in", 0, 0, b"k" * key_bytes, b"a line\n")
    with _session(engine, stream_key(record)) as session:
        annotations = session.process(record)
    for a in annotations:
        assert len(ann.encode_bounded(a, LIMITS["max_annotation_bytes"])) <= LIMITS["max_annotation_bytes"]


def _snapshot_with_extra(engine, edit) -> bytes:
    with _session(engine) as session:
        session.process(Record("in", 0, 0, b"s", b"INFO hello\npart"))
        blob = session.snapshot()
    n = struct.unpack("<Q", blob[:8])[0]
    table = json.loads(blob[8 : 8 + n])
    header = json.loads(table["__metadata__"]["sinkstream"])
    edit(header["extra"])
    table["__metadata__"]["sinkstream"] = json.dumps(header)
    raw = json.dumps(table).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + blob[8 + n :]


_extra_edits = st.sampled_from([
    lambda e: e.pop("stream"), lambda e: e.pop("counters"), lambda e: e.__setitem__("counters", [1, 2]),
    lambda e: e["counters"].__setitem__("bogus", 1), lambda e: e.__setitem__("stats", "x"),
    lambda e: e.__setitem__("pending", "not base64!"), lambda e: e.__setitem__("primed", "x"),
    lambda e: e.__setitem__("primed", float("inf")), lambda e: e.__setitem__("primed", None),
])


@given(_extra_edits)
@example(lambda e: e.pop("stream"))
def test_a_damaged_session_extra_is_refused_with_snapshot_error(engine, edit):
    blob = _snapshot_with_extra(engine, edit)
    try:
        restored = StreamSession.restore(engine, blob)
        if hasattr(restored, "release"):
            restored.release()
    except SnapshotError:
        pass
    except Exception as exc:
        raise AssertionError(f"{type(exc).__name__} escaped StreamSession.restore: {exc}") from exc


def test_a_snapshot_that_restore_cannot_read_resets_the_stream_instead_of_stopping_the_service(text_lm):
    settings = _settings()
    topic, store = MemoryTopic("in"), MemoryStore()
    for i in range(3):
        topic.append(0, b"s", f"INFO request {i}\n".encode())
    Service(settings, Engine(text_lm, settings), MemorySource.factory(topic), MemorySink(), store).run(
        idle_exit_s=0.2, install_signals=False)
    key = store.read_manifest("in:0")["snapshots"]["s"]
    engine = Engine(text_lm, settings)
    store.blobs[key] = _snapshot_with_extra(engine, lambda e: e.__setitem__("primed", float("inf")))
    topic.append(0, b"s", b"INFO request 3\n")
    sink = MemorySink()
    service = Service(settings, Engine(text_lm, settings), MemorySource.factory(topic), sink, store)
    assert service.run(idle_exit_s=0.2, install_signals=False) == 0
    reasons = [p["reason"] for a in sink.values("out") if a["kind"] == "error" for p in a["error"]["problems"]]
    assert "context_reset" in reasons
