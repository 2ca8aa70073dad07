"""scripts/gpu-check.sh and pipeline.bench.gpu_check on this CPU: the quick run's summary, failure guarding, and the
streaming-perplexity bookkeeping of the 4M-token part (on a tiny model). No timings are asserted."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.bench import gpu_check
from pipeline.bench.gpu_check import PARTS, GpuCheckSummary, flatness, streaming_perplexity
from tests.helpers.models import VOCAB, build_tiny

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[int, Path]:
    """`bash scripts/gpu-check.sh OUT --device cpu --quick`, once for the module."""
    out = tmp_path_factory.mktemp("gpu-check")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable)
    proc = subprocess.run(["bash", "scripts/gpu-check.sh", str(out), "--device", "cpu", "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert (out / "gpu_check.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.returncode, out


def test_quick_cpu_run_writes_a_complete_summary(quick_run):
    code, out = quick_run
    summary = GpuCheckSummary.model_validate_json((out / "gpu_check.json").read_text())
    assert [p.name for p in summary.parts] == list(PARTS)
    by = {p.name: p for p in summary.parts}
    for part in summary.parts:
        assert part.status in ("ok", "skipped"), (part.name, part.status, part.reason, part.metrics.get("traceback"))
        assert part.reason.strip()
        assert part.seconds >= 0
    assert code == 0 and summary.passed
    # what a CPU can run ran; what needs a GPU or the real weights says why it did not
    for name in ("sink_vs_dense", "many_streams", "checkpoint_cost"):
        assert by[name].status == "ok" and by[name].checks and all(by[name].checks.values()), name
    assert by["cuda_tests"].status == "skipped" and "CUDA" in by["cuda_tests"].reason
    assert by["oracle_fp32"].status == "skipped" and "real SmolLM2 weights" in by["oracle_fp32"].reason
    assert by["perplexity_4m"].status == "skipped" and "real weights" in by["perplexity_4m"].reason
    assert summary.environment["device"] == "cpu" and summary.environment["weights"] == "random"
    assert summary.options["quick"] is True


def test_quick_run_figures_and_markdown(quick_run):
    _, out = quick_run
    data = json.loads((out / "gpu_check.json").read_text())
    by = {p["name"]: p for p in data["parts"]}
    many = by["many_streams"]["metrics"]
    assert many["packed"]["streams"] == 8 and many["packed"]["tokens_per_s"] > 0
    assert many["packed"]["tokens_per_forward"] >= 8  # every stream fed a chunk in the one forward
    assert "tokens_per_s" in many["packed_flex"] or "error" in many["packed_flex"]
    sd = by["sink_vs_dense"]["metrics"]
    assert sd["tokens"] == 64 and sd["fp32_sink_vs_dense_max"] <= 1e-3  # S + W: no eviction yet
    ck = by["checkpoint_cost"]["metrics"]
    assert ck["keys_per_layer"] == 4 + 60 - 1 and ck["snapshot_mb"] >= ck["tensor_mb"] > 0
    md = (out / "gpu_check.md").read_text()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines() if line.startswith("|")]
    assert set(PARTS) <= {row[0] for row in cells}  # every part has its row in the parts table
    assert "**PASSED**" in md and "## Many streams" in md
    assert "gpu_check.done" in (out / "gpu_check.log").read_text()  # the script keeps the run's log


def test_a_failing_part_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    def boom(cfg):
        raise RuntimeError("injected failure")

    def fine(cfg):
        return {"checks": {"ran": True}, "metrics": {"x": 1}}

    def unmet(cfg):
        return {"checks": {"ran": True, "goal": False}, "metrics": {}}

    monkeypatch.setitem(gpu_check.PART_FUNCS, "sink_vs_dense", boom)
    monkeypatch.setitem(gpu_check.PART_FUNCS, "many_streams", fine)
    monkeypatch.setitem(gpu_check.PART_FUNCS, "checkpoint_cost", unmet)
    code = gpu_check.main(["--out", str(tmp_path), "--device", "cpu", "--quick",
                           "--parts", "sink_vs_dense,many_streams,checkpoint_cost"])
    assert code == 1
    summary = GpuCheckSummary.model_validate_json((tmp_path / "gpu_check.json").read_text())
    by = {p.name: p for p in summary.parts}
    assert not summary.passed
    assert by["sink_vs_dense"].status == "failed" and "injected failure" in by["sink_vs_dense"].reason
    assert "RuntimeError" in by["sink_vs_dense"].metrics["traceback"]
    assert by["many_streams"].status == "ok" and by["many_streams"].metrics == {"x": 1}
    assert by["checkpoint_cost"].status == "failed" and by["checkpoint_cost"].reason == "checks failed: goal"
    assert by["cuda_tests"].status == "skipped" and by["cuda_tests"].reason == "not in --parts"
    assert "injected failure" in (tmp_path / "gpu_check.md").read_text()
    with pytest.raises(SystemExit, match="expected names from"):
        gpu_check.main(["--out", str(tmp_path), "--device", "cpu", "--parts", "nope"])


def test_streaming_perplexity_blocks_passes_and_flatness():
    """A stream 6x its text and ~170x its window: every token after the first is counted once, per block and per
    pass, the blocks add up to one straight feed of the same tokens, and the repeated text scores flat."""
    lm = build_tiny("llama")
    ids = torch.randint(0, VOCAB, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    run = streaming_perplexity(lm, ids, total=2000, block=500, chunk=8, sinks=4, window=12, budget_s=1e9)
    assert run["complete"] and run["tokens_fed"] == 2000 and run["period_tokens"] == 300
    assert [b["end"] for b in run["blocks"]] == [500, 1000, 1500, 2000]
    assert [b["tokens"] for b in run["blocks"]] == [499, 500, 500, 500]
    assert [p["pass"] for p in run["passes"]] == [0, 1, 2, 3, 4, 5] and run["final_base"] > 0
    from model.pool import KVPool
    from model.pool_step import PoolStepper

    pool = KVPool(lm, 1, 4, 12, max_chunk=8)
    stream = (ids * 7)[:2000]
    straight = PoolStepper(pool).feed(pool.allocate(), stream).nll[1:].double()
    blocks_total = sum(b["tokens"] * math.log(b["perplexity"]) for b in run["blocks"])
    assert blocks_total == pytest.approx(float(straight.sum()), rel=1e-5)
    first_pass = math.exp(float(straight[:299].mean()))
    assert run["passes"][0]["perplexity"] == pytest.approx(first_pass, rel=1e-5)
    checks, metrics = flatness(run)
    assert checks == {"finite": True, "flat_last_pass_within_5pct": True, "complete": True}
    assert metrics["last_over_first_pass"] == pytest.approx(1.0, abs=0.05)


def test_streaming_perplexity_budget_and_failed_flatness():
    lm = build_tiny("llama")
    ids = torch.randint(0, VOCAB, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    run = streaming_perplexity(lm, ids, total=2000, block=500, chunk=8, sinks=4, window=12, budget_s=0.0)
    assert not run["complete"] and run["tokens_fed"] == 500 and len(run["blocks"]) == 1
    checks, _ = flatness(run)
    assert checks["complete"] is False and checks["two_full_passes"] is False
    drifting = {"complete": True, "blocks": [{"tokens": 10, "perplexity": 5.0, "peak_cuda_bytes": b}
                                             for b in (900, 1000, 1000, 1100)],
                "passes": [{"pass": 0, "perplexity": 5.0}, {"pass": 1, "perplexity": 5.5}]}
    checks, metrics = flatness(drifting)
    assert checks["flat_last_pass_within_5pct"] is False and checks["memory_constant_within_1pct"] is False
    assert metrics["last_over_first_pass"] == pytest.approx(1.1)
