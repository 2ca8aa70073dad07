"""Snapshot/restore is bit-exact; damaged or mismatched snapshots are refused with a clear error."""

from __future__ import annotations

import pytest
import torch

from model.snapshot import SnapshotError, dump_cache, load_cache, read_header
from model.stepper import SinkModel
from tests.helpers.models import VOCAB, build_tiny


def _ids(n, seed=5):
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "gpt2", "falcon", "mpt"])
@pytest.mark.parametrize("cut", [2, 15, 37])
def test_restore_is_bit_exact(tiny_lm, arch, cut):
    lm = tiny_lm(arch)
    runner = SinkModel(lm)
    ids = _ids(60)
    chunk = 5 if lm.arch.exact_chunks else 1
    straight = runner.new_cache(4, 12, max_chunk=chunk)
    runner.step(straight, ids[:cut])
    blob = dump_cache(straight, extra={"offset": cut}, tensors={"last": torch.arange(3.0)})
    expected = runner.step(straight, ids[cut:])

    resumed, extra, tensors = load_cache(lm, blob)
    assert extra == {"offset": cut} and torch.equal(tensors["last"], torch.arange(3.0))
    assert resumed.seen == cut
    got = runner.step(resumed, ids[cut:])
    assert torch.equal(got, expected), (got - expected).abs().max()


def test_snapshot_is_trimmed_and_header_is_readable(tiny_lm):
    lm = tiny_lm("llama")
    runner = SinkModel(lm)
    cache = runner.new_cache(4, 12, max_chunk=16)
    runner.step(cache, _ids(40))
    header = read_header(dump_cache(cache))
    assert header["format"] == 1 and header["seen"] == 40 and header["sinks"] == 4 and header["window"] == 12
    assert header["fingerprint"] == lm.fingerprint and header["dtype"] == "torch.float32"
    restored, _, _ = load_cache(lm, dump_cache(cache))
    assert restored.layers[0].keys.shape[-2] == 4 + 11  # sinks + window - 1: what the next token keeps


def test_corrupted_snapshot_is_refused(tiny_lm):
    lm = tiny_lm("llama")
    runner = SinkModel(lm)
    cache = runner.new_cache(4, 12)
    runner.step(cache, _ids(30))
    blob = bytearray(dump_cache(cache))
    blob[-10] ^= 0xFF  # flip bits inside tensor data
    with pytest.raises(SnapshotError, match="corrupt: crc32c"):
        load_cache(lm, bytes(blob))
    with pytest.raises(SnapshotError, match="truncated"):
        load_cache(lm, bytes(blob[:100]))
    with pytest.raises(SnapshotError, match="expected a sinkstream snapshot"):
        load_cache(lm, b"abc")


def test_snapshot_from_another_model_is_refused(tiny_lm):
    lm = tiny_lm("llama")
    other = build_tiny("llama", seed=7)  # same config, different weights
    runner = SinkModel(lm)
    cache = runner.new_cache(4, 12)
    runner.step(cache, _ids(20))
    with pytest.raises(SnapshotError, match="fingerprint mismatch"):
        load_cache(other, dump_cache(cache))


def test_generation_rolls_back_exactly(tiny_lm):
    lm = tiny_lm("llama")
    runner = SinkModel(lm)
    ids = _ids(50)
    a, b = runner.new_cache(4, 12, max_chunk=8), runner.new_cache(4, 12, max_chunk=8)
    runner.step(a, ids[:30])
    runner.step(b, ids[:30])
    before = [(layer.keys, layer.values) for layer in b.layers]
    generated = runner.generate(b, prompt=[1, 2, 3], max_new_tokens=20)
    assert len(generated) == 20 and all(0 <= g < VOCAB for g in generated)
    assert b.seen == 30 and all(lay.keys is k and lay.values is v for lay, (k, v) in zip(b.layers, before))
    assert torch.equal(runner.step(b, ids[30:]), runner.step(a, ids[30:]))


def test_failed_step_leaves_cache_untouched(tiny_lm):
    lm = tiny_lm("llama")
    runner = SinkModel(lm)
    cache = runner.new_cache(4, 12, max_chunk=8)
    runner.step(cache, _ids(20))
    state = cache.state()
    with pytest.raises(IndexError):
        runner.step(cache, torch.tensor([1, 2, VOCAB + 50]))  # out-of-vocabulary id fails inside the model
    assert cache.seen == state.seen and cache.plan is None
    assert all(lay.keys is k for lay, (k, _) in zip(cache.layers, state.tensors))
