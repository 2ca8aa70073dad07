"""`sinkstream eval` and `sinkstream bench` end to end on a tiny model: files, JSON fields, table shapes, PNGs."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.cli import bench as bench_command
from pipeline.cli import eval as eval_command
from pipeline.cli.main import main
from tests.helpers.models import VOCAB


@pytest.fixture
def tiny_cli(tiny_lm, monkeypatch):
    lm = tiny_lm("llama")
    monkeypatch.setattr(eval_command, "load_model_for_cli", lambda *a, **k: lm)
    monkeypatch.setattr(bench_command, "load_model_for_cli", lambda *a, **k: lm)
    return lm


def _png_ok(path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 200_000


def test_eval_cli_writes_json_table_and_plot(tiny_cli, tmp_path, capsys):
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps(torch.randint(0, VOCAB, (700,), generator=torch.Generator().manual_seed(0)).tolist()))
    out = tmp_path / "eval"
    code = main(["eval", "length", "--ids", str(ids), "--window", "28", "--chunk", "64", "--stride", "9",
                 "--segment", "128", "--runs", "dense,window,sink,recompute", "--out", str(out)])
    assert code == 0
    result = json.loads((out / "eval_length.json").read_text())
    assert [r["name"] for r in result["runs"]] == ["dense", "window", "sink", "recompute"]
    assert result["stride"] == 9 and result["machine"]["torch_threads"] >= 1
    assert (out / "eval_length.md").read_text().strip() == result["table"]
    _png_ok(out / "eval_length.png")
    printed = capsys.readouterr().out
    assert "window_over_sink" in printed and "sink_over_recompute" in printed
    for name, args in (("sinks", ["--cache", "32", "--sink-counts", "0,2,4"]), ("cache", ["--cache-sizes", "16,32"])):
        argv = ["eval", name, "--ids", str(ids), "--max-tokens", "300", "--chunk", "64", "--out", str(out), *args]
        assert main(argv) == 0
        result = json.loads((out / f"eval_{name}.json").read_text())
        assert result["tokens"] == 300 and len(result["runs"]) == len(args[-1].split(","))
        _png_ok(out / f"eval_{name}.png")


def test_eval_cli_text_needs_a_tokenizer(tiny_cli, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello")
    with pytest.raises(SystemExit, match="no tokenizer"):
        main(["eval", "--text", str(text), "--out", str(tmp_path)])


@pytest.mark.parametrize("name,args", [
    ("latency", ["--sizes", "16,32"]),
    ("overhead", ["--keys", "16"]),
    ("ingest", ["--chunks", "1,8", "--window", "28"]),
    ("batch", ["--streams", "1,2", "--window", "28"]),
])
def test_bench_cli_writes_json_and_plot(tiny_cli, tmp_path, capsys, name, args):
    out = tmp_path / "bench"
    assert main(["bench", name, "--quick", "--repeats", "1", "--out", str(out), *args]) == 0
    result = json.loads((out / f"bench_{name}.json").read_text())
    assert result["machine"]["cores"] >= 1 and result["quick"] is True and result["seconds"] >= 0
    _png_ok(out / f"bench_{name}.png")
    assert f"## bench {name}" in capsys.readouterr().out


def test_bench_memory_cli(tiny_cli, tmp_path, capsys, monkeypatch):
    """The CLI around the memory worker (the worker itself runs in test_benchmarks): in-process here."""
    from pipeline.bench import memory

    def in_process(model, checkpoints, sinks, window, threads=0, progress=None, **_):
        readings = []
        memory.stream_memory(tiny_cli, checkpoints, sinks, window, 64, readings.append)
        for reading in readings:
            progress(reading)
        return {"model": model, "readings": readings,
                "peak_ratio_last_over_first": readings[-1]["peak_rss_mb"] / readings[1]["peak_rss_mb"]}

    monkeypatch.setattr(memory, "memory", in_process)
    out = tmp_path / "bench"
    code = main(["bench", "memory", "--model", "some-model", "--window", "60", "--memory-tokens", "200",
                 "--tiny-tokens", "200,500", "--threads", "1", "--out", str(out)])
    assert code == 0
    result = json.loads((out / "bench_memory.json").read_text())
    assert [x["tokens"] for x in result["runs"]["some-model"]["readings"]] == [0, 200]
    assert [x["tokens"] for x in result["runs"]["tiny"]["readings"]] == [0, 200, 500]
    _png_ok(out / "bench_memory.png")
    assert "peak ratio last/first" in capsys.readouterr().out


def test_bench_streams_by_dtype_alternates_rounds_and_keeps_each_dtypes_best(text_lm, tmp_path, capsys, monkeypatch):
    """`bench streams --dtype float32,bfloat16 --rounds 2`: each model loaded once, the dtypes run alternately,
    each dtype's kept run is its best round at the largest stream count, every round's figures are in the JSON."""
    from model.row_stable import make_rows_stable
    from tests.helpers.models import build_text_lm

    bf16 = build_text_lm()
    bf16.model.to(torch.bfloat16)
    bf16.dtype = torch.bfloat16
    make_rows_stable(bf16.model)
    loaded = []

    def load(model, device, dtype, threads):
        loaded.append(dtype)
        return text_lm if dtype == "float32" else bf16

    monkeypatch.setattr(bench_command, "load_model_for_cli", load)
    out = tmp_path / "bench"
    argv = ["bench", "streams", "--dtype", "float32,bfloat16", "--rounds", "2", "--streams", "1,2", "--window", "28",
            "--quick", "--repeats", "1", "--out", str(out)]
    assert main(argv) == 0
    assert loaded == ["float32", "bfloat16"]
    result = json.loads((out / "bench_streams_dtypes.json").read_text())
    assert result["dtypes"] == ["float32", "bfloat16"]
    for name in ("float32", "bfloat16"):
        rounds = result["rounds"][name]
        assert len(rounds) == 2 and all(len(r) == 2 for r in rounds)
        kept = result["runs"][name]
        assert kept["rows"][-1]["service_pool"]["tokens_per_s"] == max(r[-1] for r in rounds)
        assert rounds[kept["round"] - 1] == [row["service_pool"]["tokens_per_s"] for row in kept["rows"]]
    (ratio,) = [r for r in result["ratios"]["bfloat16_over_float32"] if r["streams"] == 2]
    assert ratio["service_pool"] == (result["runs"]["bfloat16"]["rows"][-1]["service_pool"]["tokens_per_s"]
                                        / result["runs"]["float32"]["rows"][-1]["service_pool"]["tokens_per_s"])
    assert "by round" in capsys.readouterr().out
    _png_ok(out / "bench_streams_dtypes.png")
