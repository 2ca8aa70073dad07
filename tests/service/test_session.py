"""Chunking, scoring and snapshots of one stream session (no broker needed)."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from connectors.protocols import Record
from pipeline.service.annotations import encode, schema
from pipeline.service.chunker import LineChunker
from pipeline.service.engine import Engine
from pipeline.service.normalizer import normalize_line
from pipeline.service.scoring import RunningStats
from pipeline.service.session import RESET_HEADER, StreamSession, stream_key
from pipeline.settings import load_settings

LOG = [
    "081109 203615 148 INFO dfs.DataNode$PacketResponder: PacketResponder 1 for block blk_38865049064139660 terminating\n",  # noqa: E501
    "081109 203807 222 INFO dfs.DataNode$PacketResponder: PacketResponder 0 for block blk_-6952295868487656571 terminating\n",  # noqa: E501
    "081109 204005 35 INFO dfs.FSNamesystem: BLOCK* NameSystem.addStoredBlock: blockMap updated: 10.251.73.220:50010\n",
    "Ünïcödé line with emoji 🚀 and CJK 漢字\n",
] * 5


def _records(chunks: list[bytes], key: bytes | None = b"s1", headers=None):
    return [Record("in", 0, i, key, c, dict(headers or {}), 0) for i, c in enumerate(chunks)]


def _settings(**over):
    base = {"cache": {"sinks": 4, "window": 48, "chunk": 16}, "score": {"warmup_lines": 3, "anomaly_z": 1.0}}
    base.update(over)
    return load_settings(None, **base)


def test_chunker_output_depends_only_on_content():
    data = "".join(LOG).encode()
    whole = LineChunker().feed(data)
    pieces = LineChunker()
    got = []
    for i in range(0, len(data), 7):  # cuts inside lines and inside multi-byte characters
        got += pieces.feed(data[i : i + 7])
    assert got == whole == LOG
    assert pieces.pending == b""


def test_chunker_cuts_endless_lines_on_character_boundaries():
    chunker = LineChunker(max_pending_bytes=10)
    out = chunker.feed("ééééééé".encode())  # 14 bytes, no newline
    assert out == ["ééééé"] and chunker.pending == "éé".encode()


def test_normalizer_masks_variable_fields():
    line = "081109 203615 148 INFO blk_-38865 from 10.251.73.220:50010 id 9f8e7d6c5b 2015-07-29 19:04:12\n"
    assert normalize_line(line) == "<NUM> <NUM> <NUM> INFO blk_<NUM> from <IP> id <HEX> <TS>\n"
    # An address with a port is one IP, not a number and a date; a dotted time is not a date.
    assert normalize_line("from 172.16.96.116:33569 on 03/06/2005\n") == "from <IP> on <DATE>\n"
    assert "<DATE>" not in normalize_line("at 15.42.50\n")


def test_running_stats_match_numpy_definition():
    xs = [1.0, 2.5, 0.5, 4.0, 3.0]
    stats = RunningStats()
    for x in xs:
        stats.update(x)
    t = torch.tensor(xs, dtype=torch.float64)
    assert stats.mean == pytest.approx(float(t.mean())) and stats.std == pytest.approx(float(t.std()))
    assert stats.z(5.0) == pytest.approx((5.0 - float(t.mean())) / float(t.std()))


def test_session_scores_every_line_and_matches_the_schema(text_lm):
    engine = Engine(text_lm, _settings())
    session = StreamSession(engine, "s1")
    data = "".join(LOG).encode()
    annotations = []
    for record in _records([data[i : i + 150] for i in range(0, len(data), 150)]):
        annotations += session.process(record)
    validator = jsonschema.Draft202012Validator(schema())
    for a in annotations:
        validator.validate(a)
        json.loads(encode(a))
    lines = [line for a in annotations for line in a["score"]["lines"]]
    assert [line["line_no"] for line in lines] == list(range(len(LOG)))
    assert [line["text"] for line in lines] == [x.rstrip("\n") for x in LOG]
    assert sum(a["score"]["tokens"] for a in annotations) == session.tokens_seen
    assert lines[0]["mean_nll"] is not None and lines[0]["z"] is None  # no statistics yet
    assert all(len(line["top"]) == 3 for line in lines)
    assert [a["id"] for a in annotations] == [f"in/0/{i}/score" for i in range(len(annotations))]


def test_resume_from_snapshot_is_bit_identical(text_lm):
    engine = Engine(text_lm, _settings())
    data = "".join(LOG).encode()
    records = _records([data[i : i + 111] for i in range(0, len(data), 111)])
    straight = StreamSession(engine, "s1")
    expected = [encode(a) for r in records for a in straight.process(r)]
    for cut in (1, 5, len(records) - 2):
        first = StreamSession(engine, "s1")
        got = [encode(a) for r in records[:cut] for a in first.process(r)]
        resumed = StreamSession.restore(engine, first.snapshot())
        got += [encode(a) for r in records for a in resumed.process(r)]  # replays from offset 0: skipped
        assert got == expected


def test_reset_header_starts_the_stream_afresh(text_lm):
    engine = Engine(text_lm, _settings())
    fresh = StreamSession(engine, "s1").process(_records([LOG[0].encode()])[0])[0]
    session = StreamSession(engine, "s1")
    for record in _records([x.encode() for x in LOG[:6]]):
        session.process(record)
    reset = Record("in", 0, 6, b"s1", LOG[0].encode(), {RESET_HEADER: b"1"}, 0)
    again = session.process(reset)[0]
    assert again["score"]["lines"][0]["mean_nll"] == fresh["score"]["lines"][0]["mean_nll"]
    assert again["score"]["lines"][0]["line_no"] == 0 and session.tokens_seen == fresh["tokens_seen"]


def test_notes_generate_then_roll_back(text_lm):
    settings = _settings(note={"every_tokens": 40, "max_new_tokens": 5})
    engine = Engine(text_lm, settings)
    with_notes, without = StreamSession(engine, "s1"), StreamSession(Engine(text_lm, _settings()), "s1")
    notes = []
    for record in _records([x.encode() for x in LOG[:8]]):
        out = with_notes.process(record)
        notes += [a for a in out if a["kind"] == "note"]
        plain = without.process(record)
        assert out[0]["score"] == plain[0]["score"]  # notes never change the stream's context
    assert notes and all(n["id"].endswith("/note") and n["note"]["tokens_generated"] >= 1 for n in notes)
    assert with_notes.tokens_seen == without.tokens_seen


def test_stream_keys():
    assert stream_key(Record("t", 3, 0, None, b"", {}, 0)) == "partition-3"
    assert stream_key(Record("t", 0, 0, b"host-a", b"", {}, 0)) == "host-a"
    assert stream_key(Record("t", 0, 0, b"\xff\x00", b"", {}, 0)) == "hex:ff00"


def test_special_token_text_in_a_record_is_scored_as_text(text_lm):
    """A log line carrying any special marker of the tokenizer (an LLM gateway's log, say) is tokenized as the
    characters it is: its token count is the split tokenization's, and no special id reaches the model."""
    tokenizer = text_lm.tokenizer
    markers = [tokenizer.convert_ids_to_tokens(i) for i in sorted(tokenizer.all_special_ids)]
    assert "<|endoftext|>" in markers and "<|im_start|>" in markers
    lines = [f"gateway: completion {i} ended with {m} after {m}user turn\n" for i, m in enumerate(markers)]
    engine = Engine(text_lm, _settings())
    session = StreamSession(engine, "llm-gateway")
    annotations = []
    for record in _records([line.encode() for line in lines]):
        annotations += session.process(record)
    scored = [line for a in annotations for line in a["score"]["lines"]]
    assert [line["text"] for line in scored] == [line.rstrip("\n") for line in lines]
    specials = set(tokenizer.all_special_ids)
    for a, line in zip(annotations, lines):
        split = tokenizer(line, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        parsed = tokenizer(line, add_special_tokens=False)["input_ids"]
        assert a["score"]["tokens"] == len(split) > len(parsed)
        assert not set(split) & specials
    assert session.tokens_seen == sum(a["score"]["tokens"] for a in annotations)
