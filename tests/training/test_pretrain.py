"""`sinkstream pretrain --quick` as a test of the harness: files, resume, determinism, evaluation JSON shape.

Uses the real data (Canterbury texts fetched once into $SINKSTREAM_HOME, Loghub from ../shared) and trains two
tiny models for 24 steps each (about 10-20 s per run on one thread).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.cli.main import main
from pipeline.training.config import QUICK

STEPS = QUICK.steps


def cli(*argv: str) -> int:
    """`sinkstream pretrain ...` through the real entry point (registration, logging, exit codes)."""
    return main(
        ["--log-format", "json", "--log-level", "WARNING", "pretrain", *argv, "--threads", "1", "--no-progress"]
    )


@pytest.fixture(scope="module")
def interrupted_then_resumed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("pretrain") / "run"
    assert cli("--out", str(run), "--quick", "--stop-after", str(STEPS // 2)) == 0
    for variant in ("vanilla", "sink"):
        meta = json.loads((run / variant / "checkpoint" / "trainer.json").read_text())
        assert meta["step"] == STEPS // 2
        assert not (run / variant / "model").exists(), "a stopped run must not export a final model"
    assert not (run / "results.json").exists()
    assert cli("--out", str(run), "--quick", "--resume") == 0
    return run


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("pretrain") / "straight"
    assert cli("--out", str(run), "--quick") == 0
    return run


def test_checkpoint_files(interrupted_then_resumed: Path) -> None:
    run = interrupted_then_resumed
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    assert json.loads((run / "study.json").read_text())["steps"] == STEPS
    for variant in ("vanilla", "sink"):
        folder = run / variant / "checkpoint"
        meta = json.loads((folder / "trainer.json").read_text())
        assert meta["step"] == STEPS
        weights = load_file(str(folder / "model.safetensors"))
        assert "model.layers.0.self_attn.q_proj.weight" in weights and "model.norm.weight" in weights
        optimizer = load_file(str(folder / "optimizer.safetensors"))
        steps = {k: v for k, v in optimizer.items() if k.endswith(".step")}
        assert steps and all(float(v) == STEPS for v in steps.values()), "AdamW's step count must survive resume"
        assert any(k.endswith(".exp_avg_sq") for k in optimizer)
        assert (run / variant / "model" / "config.json").is_file()
        # the resumed part of the log continues at the saved step, with no step trained twice
        assert [e["step"] for e in meta["log"]] == list(range(1, STEPS + 1))


def test_resume_equals_an_uninterrupted_run(interrupted_then_resumed: Path, straight: Path) -> None:
    for variant in ("vanilla", "sink"):
        a = load_file(str(interrupted_then_resumed / variant / "checkpoint" / "model.safetensors"))
        b = load_file(str(straight / variant / "checkpoint" / "model.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=f"{variant}: {key} differs after resume")


def test_the_two_variants_differ_only_by_the_sink_token(straight: Path) -> None:
    a = load_file(str(straight / "vanilla" / "checkpoint" / "model.safetensors"))
    b = load_file(str(straight / "sink" / "checkpoint" / "model.safetensors"))
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], b["model.layers.0.self_attn.q_proj.weight"])


def test_eval_json_shape(interrupted_then_resumed: Path) -> None:
    run = interrupted_then_resumed
    results = json.loads((run / "results.json").read_text())
    cache = QUICK.eval_cache
    expected = [f"{s}+{cache - s}" for s in QUICK.eval_sinks] + ["dense"]
    for variant in ("vanilla", "sink"):
        rows = results["streaming"][variant]
        for kind in QUICK.eval_kinds:
            mine = [r for r in rows if r["stream"] == kind]
            assert [r["config"] for r in mine] == expected
            # both variants score the same targets: every held-out token after the first
            assert {r["targets"] for r in mine} == {QUICK.eval_tokens - 1}
            assert all(math.isfinite(r["perplexity"]) and r["perplexity"] > 1.0 for r in mine)
        att = results["attention"][variant]
        share = att["share"]
        assert len(share) == QUICK.layers and all(len(layer) == 4 for layer in share)
        assert all(0.0 <= v <= 1.0 for layer in share for v in layer)
        assert len(att["head_first"]) == QUICK.layers and all(len(layer) == QUICK.heads for layer in att["head_first"])
        assert len(att["sink_rate"]) == 4 and all(0.0 <= v <= 100.0 for v in att["sink_rate"])
        probes = results["training"][variant]
        assert [p["step"] for p in probes] == [0, STEPS // 2, STEPS]
        assert probes[-1]["heldout_loss"] < probes[0]["heldout_loss"], "training must lower the held-out loss"
        assert results["budget"][variant]["tokens_seen"] == STEPS * QUICK.batch_size * QUICK.seq_len
    for name in (
        "table.md",
        "sink_token_attention.png",
        "sink_token_training.png",
        "sink_token_perplexity.png",
        "sink_token_heads.png",
    ):
        assert (run / name).stat().st_size > 0
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in (run / "table.md").read_text().splitlines()
            if line.startswith("|")]
    assert any(row[:2] == ["sink", "prose"] for row in rows)


def test_existing_run_without_resume_is_refused(interrupted_then_resumed: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli("--out", str(interrupted_then_resumed), "--quick") == 2
    assert "--resume" in capsys.readouterr().err
