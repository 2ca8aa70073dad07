"""`sinkstream adapt` -> `model.adapter` -> the service, on a tiny random model with SmolLM2's tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from connectors.memory import MemorySink, MemorySource, MemoryStore, MemoryTopic
from connectors.protocols import Record
from model.loader import AdapterError, adapter_fingerprint, load_model, merge_adapter
from model.snapshot import SnapshotError
from pipeline.cli.main import main
from pipeline.service.engine import Engine
from pipeline.service.service import Service
from pipeline.service.session import StreamSession
from pipeline.settings import load_settings
from pipeline.training.adapt import AdaptConfig, mean_loss, split_blocks, token_blocks, train_adapter
from tests.helpers.models import build_text_lm

NORMAL = [f"node-{i % 7} heartbeat ok seq={i % 13} load=0.{i % 9}" for i in range(400)]
CFG = AdaptConfig(steps=40, batch=4, block=32, lr=5e-2, rank=4, alpha=8, seed=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny model saved as a Hugging Face folder, so `load_model` (the service's loader) can read it."""
    lm = build_text_lm(seed=3)
    folder = tmp_path_factory.mktemp("tiny")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, model_dir):
    out = tmp_path_factory.mktemp("adapter")
    lm = load_model(str(model_dir), device="cpu", dtype="float32")
    report = train_adapter(lm, NORMAL, CFG, out)
    return out, report


def _record(value: bytes) -> Record:
    return Record("in", 0, 0, b"k", value, {}, -1)


def _settings(**model):
    return load_settings(None, model=model, cache={"sinks": 4, "window": 32, "chunk": 16},
                         kafka={"output_topic": "out"}, checkpoint={"every_records": 1})


def test_adapting_lowers_the_held_out_loss_and_writes_a_fingerprinted_adapter(adapter, model_dir):
    out, report = adapter
    # a random model learns the repeated pattern (measured 10.82 -> 10.24 nats)
    assert report["held_out_loss_after"] < report["held_out_loss_before"] - 0.3
    assert report["adapter_fingerprint"] == adapter_fingerprint(out)
    assert json.loads((out / "adapt.json").read_text())["adapter_fingerprint"] == report["adapter_fingerprint"]
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors", "adapt.json"}
    # the base model's weights were not touched by training: its held-out loss is the one measured before
    lm = load_model(str(model_dir), device="cpu", dtype="float32")
    held = split_blocks(token_blocks(lm.tokenizer, NORMAL, CFG.block), CFG.holdout)[1]
    assert mean_loss(lm.model, held, 4, lm.device) == pytest.approx(report["held_out_loss_before"], abs=1e-3)


def test_the_merged_adapter_has_the_trained_loss_and_its_own_fingerprint(adapter, model_dir):
    out, report = adapter
    base = load_model(str(model_dir), device="cpu", dtype="float32")
    merged = load_model(str(model_dir), device="cpu", dtype="float32", adapter=out)
    assert merged.adapter == report["adapter_fingerprint"] and base.adapter is None
    assert merged.fingerprint != base.fingerprint
    assert merged.fingerprint == load_model(str(model_dir), device="cpu", dtype="float32", adapter=out).fingerprint
    held = split_blocks(token_blocks(merged.tokenizer, NORMAL, CFG.block), CFG.holdout)[1]
    assert mean_loss(merged.model, held, 4, merged.device) == pytest.approx(report["held_out_loss_after"], abs=1e-3)
    # same modules and shapes as the base model: the pooled path runs the same forward
    assert [(n, p.shape) for n, p in merged.model.named_parameters()] == \
        [(n, p.shape) for n, p in base.model.named_parameters()]
    assert merged.model.config._attn_implementation == base.model.config._attn_implementation


def test_a_changed_adapter_weight_changes_the_fingerprint(adapter, tmp_path):
    from safetensors.torch import load_file, save_file

    out, _ = adapter
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / name).write_bytes((out / name).read_bytes())
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    first = sorted(tensors)[0]
    tensors[first] = tensors[first].clone()
    tensors[first].view(-1)[0] += 1e-3
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    assert adapter_fingerprint(tmp_path) != adapter_fingerprint(out)


def test_adapt_then_model_adapter_then_a_service_run(adapter, model_dir):
    """The settings' `model.adapter` reaches the loader; the service scores and checkpoints with the merged model;
    a snapshot taken under the adapter is refused by the base model (and vice versa) with a one-line reason."""
    out, report = adapter
    settings = _settings(name=str(model_dir), adapter=str(out), device="cpu", dtype="float32")
    m = settings.model
    lm = load_model(m.name, m.device, m.dtype, m.threads, adapter=m.adapter)
    topic, store, sink = MemoryTopic("in", partitions=1), MemoryStore(), MemorySink()
    for i in range(3):
        topic.append(0, b"host-a", ("\n".join(NORMAL[i * 5:(i + 1) * 5]) + "\n").encode())
    service = Service(settings, Engine(lm, settings), MemorySource.factory(topic), sink, store)
    assert service.run(idle_exit_s=0.2, install_signals=False) == 0
    published = sink.values("out")
    assert len(published) == 3 and all(a["kind"] == "score" for a in published)
    assert {a["model"]["fingerprint"] for a in published} == {lm.fingerprint}

    session = StreamSession(Engine(lm, settings), "k")
    session.process(_record(b"node-1 heartbeat ok seq=1 load=0.1\n"))
    blob = session.snapshot()
    base = load_model(str(model_dir), device="cpu", dtype="float32")
    with pytest.raises(SnapshotError) as refused:
        StreamSession.restore(Engine(base, _settings(name=str(model_dir), dtype="float32")), blob)
    message = str(refused.value)
    assert "\n" not in message
    assert message == (f"snapshot adapter mismatch: this model runs with no adapter (model.adapter), the snapshot "
                       f"was taken with LoRA adapter {report['adapter_fingerprint']}")
    old = StreamSession(Engine(base, _settings(name=str(model_dir), dtype="float32")), "k")
    old.process(_record(b"node-1 heartbeat ok seq=1 load=0.1\n"))
    with pytest.raises(SnapshotError, match="this model runs with LoRA adapter .* the snapshot was taken with no "
                                            "adapter"):
        StreamSession.restore(Engine(lm, settings), old.snapshot())

    # the service itself: a restart without the adapter resets the stream and says why in the annotation
    topic.append(0, b"host-a", b"node-2 heartbeat ok seq=2 load=0.2\n")
    sink2 = MemorySink()
    plain = _settings(name=str(model_dir), device="cpu", dtype="float32")
    Service(plain, Engine(base, plain), MemorySource.factory(topic), sink2, store).run(
        idle_exit_s=0.2, install_signals=False)
    published = sink2.values("out")
    errors = [a for a in published if a["kind"] == "error"]
    scored = [a for a in published if a["kind"] == "score"]
    assert len(scored) == 1 and scored[0]["model"]["fingerprint"] == base.fingerprint, published
    messages = [p["message"] for a in errors for p in a["error"]["problems"] if p["reason"] == "context_reset"]
    assert len(messages) == 1 and "snapshot adapter mismatch" in messages[0], published


def test_a_folder_that_is_not_an_adapter_is_one_line_error(model_dir, tmp_path):
    lm = load_model(str(model_dir), device="cpu", dtype="float32")
    with pytest.raises(AdapterError, match="expected a folder with adapter_config.json"):
        merge_adapter(lm, tmp_path)


def test_adapt_command_writes_an_adapter_and_reports_the_losses(model_dir, tmp_path, capsys):
    text = tmp_path / "normal.log"
    text.write_text("\n".join(NORMAL) + "\n")
    out = tmp_path / "adapter"
    code = main(["adapt", "--text", str(text), "--out", str(out), "--model", str(model_dir), "--steps", "3",
                 "--block", "32", "--rank", "2", "--no-progress"])
    assert code == 0
    stdout = capsys.readouterr().out
    report = json.loads((out / "adapt.json").read_text())
    assert f"fingerprint {report['adapter_fingerprint']}" in stdout and "held-out loss" in stdout
    assert report["config"]["steps"] == 3 and report["config"]["rank"] == 2


def test_adapt_command_with_too_little_text_is_a_one_line_error(model_dir, tmp_path, capsys):
    text = tmp_path / "short.log"
    text.write_text("one line\n")
    code = main(["adapt", "--text", str(text), "--out", str(tmp_path / "a"), "--model", str(model_dir),
                 "--no-progress"])
    err = capsys.readouterr().err.splitlines()[-1]  # after the weights' loading bar
    assert code == 2 and err == ("sinkstream: error: adapt: expected at least 256 tokens of normal text (two blocks "
                                 "of 128: one to train on, one held out), got 3")


def test_merging_twice_is_refused(adapter, model_dir):
    out, _ = adapter
    merged = load_model(str(model_dir), device="cpu", dtype="float32", adapter=out)
    with pytest.raises(AdapterError, match="already has adapter"):
        merge_adapter(merged, out)
    assert torch.is_tensor(next(merged.model.parameters()))


def test_an_adapter_merges_into_a_loaded_bf16_model_and_stays_row_stable(adapter, model_dir):
    """bf16 on a CPU loads row-stable (`model.row_stable`): merging into that model (as `sinkstream eval anomaly`
    does after training) gives what loading with `adapter=` gives, and the merged model is row-stable again."""
    from model.row_stable import rows_stable

    out, _ = adapter
    loaded = load_model(str(model_dir), device="cpu", dtype="bfloat16")
    assert rows_stable(loaded.model)
    merged = merge_adapter(loaded, out)
    at_load = load_model(str(model_dir), device="cpu", dtype="bfloat16", adapter=out)
    assert rows_stable(merged.model) and rows_stable(at_load.model)
    assert merged.fingerprint == at_load.fingerprint
    ids = torch.tensor([at_load.tokenizer.encode(" ".join(NORMAL[:6]))[:48]])
    with torch.no_grad():
        a, b = merged.model(ids).logits, at_load.model(ids).logits
    assert torch.equal(a, b)
    base = load_model(str(model_dir), device="cpu", dtype="bfloat16")
    with torch.no_grad():
        assert not torch.equal(base.model(ids).logits, a)  # the adapter is in the weights
