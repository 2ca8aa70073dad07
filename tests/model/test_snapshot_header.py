"""The snapshot header is a typed document: what dump_cache writes parses back, anything else is refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save as st_save

from model.snapshot import FORMAT_VERSION, SnapshotError, SnapshotHeader, dump_cache, parse_header, read_header
from model.stepper import SinkModel


def _blob_with(header: dict) -> bytes:
    return st_save({"k.0": torch.zeros(1)}, metadata={"sinkstream": json.dumps(header)})


def _valid(tiny_lm) -> dict:
    runner = SinkModel(tiny_lm("llama"))
    cache = runner.new_cache(4, 12, max_chunk=16)
    runner.step(cache, torch.arange(20) % 90)
    return read_header(dump_cache(cache, extra={"lines": 3}))


def test_written_header_parses_into_the_model(tiny_lm):
    raw = _valid(tiny_lm)
    header = parse_header(_blob_with(raw))
    assert isinstance(header, SnapshotHeader)
    assert (header.format, header.seen, header.sinks, header.window, header.extra) == (
        FORMAT_VERSION,
        20,
        4,
        12,
        {"lines": 3},
    )


def test_unknown_key_and_bad_field_are_refused_by_name(tiny_lm):
    raw = _valid(tiny_lm)
    with pytest.raises(SnapshotError, match=r"snapshot header field 'surprise': Extra inputs are not permitted; got 1"):
        parse_header(_blob_with({**raw, "surprise": 1}))
    with pytest.raises(SnapshotError, match=r"snapshot header field 'sinks': .*greater than or equal to 0; got -1"):
        parse_header(_blob_with({**raw, "sinks": -1}))
    with pytest.raises(SnapshotError, match="expected snapshot format 1, got 2"):
        parse_header(_blob_with({**raw, "format": 2}))
