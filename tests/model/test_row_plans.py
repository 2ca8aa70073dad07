"""bf16 row plans kept on disk (`model.row_stable.calibrate(plans=...)`): a plan measured once is read back by
the next start after a spot check instead of being searched again; a file that is not a plan, or a plan that
fails its check, is measured again and replaced; a folder that cannot be written is skipped with a warning."""

from __future__ import annotations

import json

import pytest
import torch
from structlog.testing import capture_logs

from model import row_stable as rs
from model.loader import cpu_bf16_flags, load_model, plans_home

SHAPE = {"in_features": 64, "out_features": 96, "bias": False, "max_rows": 256}


@pytest.fixture(autouse=True)
def _no_memo(monkeypatch):
    monkeypatch.setattr(rs, "_PLANS", {})  # every calibrate below starts from the disk, not this process's memo


def _file(folder):
    files = list(folder.rglob("*.json"))
    assert len(files) == 1, files
    return files[0]


def test_a_measured_plan_is_stored_and_read_back_without_a_search(tmp_path, monkeypatch):
    plan = rs.calibrate(**SHAPE, plans=tmp_path)
    stored = _file(tmp_path)
    assert stored.parent.name == rs.machine_fingerprint()  # plans of another machine or torch build are not read
    assert f"-t{torch.get_num_threads()}-" in stored.name
    assert json.loads(stored.read_text())["big"] == plan.big
    rs._PLANS.clear()

    def no_search(*args, **kwargs):
        pytest.fail("searched although a stored plan exists")

    monkeypatch.setattr(rs, "_search", no_search)
    with capture_logs() as logs:
        assert rs.calibrate(**SHAPE, plans=tmp_path) == plan
    assert [e["source"] for e in logs if e["event"] == "row blocks calibrated"] == ["stored"]


def test_a_file_that_is_not_a_plan_is_measured_again_and_replaced(tmp_path):
    plan = rs.calibrate(**SHAPE, plans=tmp_path)
    stored = _file(tmp_path)
    good = json.loads(stored.read_text())
    for bad in ("{not json", json.dumps({**good, "big": 100}), json.dumps({**good, "threads": 99}),
                json.dumps({**good, "sizes": [good["big"] + 1]}), json.dumps({"big": good["big"]}),
                json.dumps({k: v for k, v in good.items() if k not in ("cols", "col_sizes")}),  # before the split
                json.dumps({**good, "cols": 32, "col_sizes": [64]})):  # a split on a layer whose big is small
        stored.write_text(bad)
        rs._PLANS.clear()
        with capture_logs() as logs:
            again = rs.calibrate(**SHAPE, plans=tmp_path)
        assert (again.big, again.sizes) == (plan.big, plan.sizes), bad
        assert [e["source"] for e in logs if e["event"] == "row blocks calibrated"] == ["measured"], bad
        assert json.loads(stored.read_text())["sizes"] == list(plan.sizes), bad


def test_a_stored_plan_that_fails_its_check_is_measured_again(tmp_path, monkeypatch):
    plan = rs.calibrate(**SHAPE, plans=tmp_path)
    if plan.big is None:
        pytest.skip("no row count above 32 is canonical for this shape on this CPU: nothing to check")
    real = rs.RowStableLinear._call

    def big_calls_round_differently(self, rows):  # as if this machine's kernel rounded `big`-row calls another way
        out = real(self, rows)
        return out + 1 if rows.shape[0] == plan.big else out

    monkeypatch.setattr(rs.RowStableLinear, "_call", big_calls_round_differently)
    rs._PLANS.clear()
    with capture_logs() as logs:
        again = rs.calibrate(**SHAPE, plans=tmp_path)
    assert again.big != plan.big
    assert any(e["event"].startswith("row blocks: the stored plan failed its check") for e in logs)
    assert json.loads(_file(tmp_path).read_text())["big"] == again.big


@pytest.mark.skipif(not cpu_bf16_flags(), reason="this CPU has no bf16 units: no prepacked bf16 weights to split")
def test_a_split_plan_is_stored_read_back_and_checked(tmp_path, monkeypatch):
    """A wide layer (576x1536, `big` >= SPLIT_MIN_BIG) keeps its column split (`cols`, `col_sizes`) on disk; the
    next start reads it after a spot check that includes a split call, and a split that fails it is measured
    again."""
    wide = {"in_features": 576, "out_features": 1536, "bias": False, "max_rows": 1536}
    plan = rs.calibrate(**wide, plans=tmp_path)
    if not plan.col_sizes:
        pytest.skip(f"no split call was verified and faster than the layer's own calls here: {plan}")
    doc = json.loads(_file(tmp_path).read_text())
    assert (doc["cols"], doc["col_sizes"]) == (plan.cols, list(plan.col_sizes))
    rs._PLANS.clear()
    with capture_logs() as logs:
        assert rs.calibrate(**wide, plans=tmp_path) == plan
    assert [e["source"] for e in logs if e["event"] == "row blocks calibrated"] == ["stored"]
    real = rs.RowStableLinear._call_part
    largest = plan.col_sizes[-1]

    def largest_split_rounds_differently(self, rows, part):  # as if this machine rounded those calls another way
        out = real(self, rows, part)
        return out + 1 if rows.shape[0] == largest else out

    monkeypatch.setattr(rs.RowStableLinear, "_call_part", largest_split_rounds_differently)
    rs._PLANS.clear()
    with capture_logs() as logs:
        again = rs.calibrate(**wide, plans=tmp_path)
    assert any(e["event"].startswith("row blocks: the stored plan failed its check") for e in logs)
    assert largest not in again.col_sizes
    assert json.loads(_file(tmp_path).read_text())["col_sizes"] == list(again.col_sizes)


def test_a_folder_that_cannot_be_written_is_skipped(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")  # a file where the folder would go: mkdir fails, even as root
    with capture_logs() as logs:
        plan = rs.calibrate(**SHAPE, plans=blocker / "row_plans")
    assert plan.threads == torch.get_num_threads()
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["row blocks not stored"]


@pytest.mark.slow
@pytest.mark.skipif(not cpu_bf16_flags(), reason="this CPU has no bf16 units: a bf16 load would be emulated and slow")
def test_load_model_keeps_its_plans_where_model_row_plans_says(tmp_path):
    """`model.row_plans` (`load_model(row_plans=...)`): a bf16 CPU load measures into that folder, the next load
    reads every shape from it; without it the plans go beside the models' folder."""
    assert plans_home(tmp_path / "home" / "models") == tmp_path / "home" / "row_plans"
    folder = tmp_path / "plans"
    with capture_logs() as first:
        load_model("smollm2-135m", device="cpu", dtype="bfloat16", row_plans=folder)
    rs._PLANS.clear()
    with capture_logs() as second:
        load_model("smollm2-135m", device="cpu", dtype="bfloat16", row_plans=folder)
    sources = [[e["source"] for e in logs if e["event"] == "row blocks calibrated"] for logs in (first, second)]
    assert sources == [["measured"] * 5, ["stored"] * 5]  # SmolLM2: four layer shapes and the head
    assert len(list(folder.rglob("*.json"))) == 5
