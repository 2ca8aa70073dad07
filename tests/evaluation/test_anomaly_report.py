"""Anomaly-ranking metrics on hand-made inputs with known answers, and a small end-to-end run on real BGL lines."""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import pytest

from pipeline.cli import anomaly as anomaly_command
from pipeline.evaluation import anomaly_report as ar
from pipeline.service.engine import Engine
from pipeline.settings import load_settings

# ---- metrics ------------------------------------------------------------------------------------------------

LABELS = [True, False, True, False]


def test_auc_perfect_reversed_and_tied():
    assert ar.roc_auc([4, 1, 3, 2], LABELS) == 1.0
    assert ar.roc_auc([1, 4, 2, 3], LABELS) == 0.0
    assert ar.roc_auc([7, 7, 7, 7], LABELS) == 0.5


def test_auc_counts_ties_as_half_and_is_order_free():
    # pairs (pos, neg): (0.9,0.8)=1 (0.9,0.6)=1 (0.7,0.8)=0 (0.7,0.6)=1 -> 3/4
    assert ar.roc_auc([0.9, 0.8, 0.7, 0.6], LABELS) == pytest.approx(0.75)
    # one pos tied with one neg: pairs (5,5)=0.5 (5,1)=1 (3,5)=0 (3,1)=1 -> 2.5/4
    assert ar.roc_auc([5, 5, 3, 1], LABELS) == pytest.approx(0.625)
    assert ar.roc_auc([5, 3, 1, 5], [True, True, False, False]) == pytest.approx(0.625)


def test_missing_scores_rank_last_and_tie_with_each_other():
    # pairs (pos, neg): (None,2)=0 (None,nan)=0.5 (3,2)=1 (3,nan)=1 -> 2.5/4
    assert ar.roc_auc([None, 2.0, 3.0, float("nan")], LABELS) == pytest.approx(0.625)
    assert ar.roc_auc([1.0, None, 2.0, None], LABELS) == 1.0


def test_average_precision_known_values():
    assert ar.average_precision([4, 1, 3, 2], LABELS) == 1.0
    # hits at ranks 1 and 3: (1/1 + 2/3) / 2
    assert ar.average_precision([0.9, 0.8, 0.7, 0.6], LABELS) == pytest.approx(5 / 6)
    # all tied: one threshold, precision = prevalence
    assert ar.average_precision([1, 1, 1, 1], LABELS) == pytest.approx(0.5)
    # reversed: hits at ranks 3 and 4: (1/3 + 2/4) / 2
    assert ar.average_precision([1, 4, 2, 3], LABELS) == pytest.approx(5 / 12)


def test_precision_at_k_with_ties_is_expected_value():
    assert ar.precision_at_k([4, 1, 3, 2], LABELS, 1) == 1.0
    assert ar.precision_at_k([4, 1, 3, 2], LABELS, 2) == 1.0
    assert ar.precision_at_k([4, 1, 3, 2], LABELS, 3) == pytest.approx(2 / 3)
    assert ar.precision_at_k([1, 4, 2, 3], LABELS, 2) == 0.0
    # top score clear (pos), then a 3-way tie with one pos among 3: k=2 -> (1 + 1 * 1/3) / 2
    assert ar.precision_at_k([9, 5, 5, 5], [True, True, False, False], 2) == pytest.approx(2 / 3)
    assert ar.precision_at_k([9, 5, 5, 5], [True, True, False, False], 4) == pytest.approx(0.5)


def test_metric_errors_name_what_was_expected():
    with pytest.raises(ValueError, match="both anomalous and normal"):
        ar.roc_auc([1, 2], [True, True])
    with pytest.raises(ValueError, match="as many scores as labels"):
        ar.roc_auc([1, 2, 3], LABELS)
    with pytest.raises(ValueError, match="1 <= k <= 4"):
        ar.precision_at_k([1, 2, 3, 4], LABELS, 5)


def test_roc_curve_ends_at_corners_and_matches_auc():
    scores = [0.9, 0.8, 0.8, 0.3, 0.1, 0.5]
    labels = [True, False, True, False, True, False]
    fpr, tpr = ar.roc_curve(scores, labels)
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    area = sum((fpr[i + 1] - fpr[i]) * (tpr[i + 1] + tpr[i]) / 2 for i in range(len(fpr) - 1))
    assert area == pytest.approx(ar.roc_auc(scores, labels))


def _pairwise_auc(scores, labels) -> float:
    """The definition itself: over every (anomalous, normal) pair, 1 if the anomaly scores higher, 1/2 on a tie."""
    key = [-math.inf if x is None or x != x else x for x in scores]
    pos = [k for k, y in zip(key, labels) if y]
    neg = [k for k, y in zip(key, labels) if not y]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / (len(pos) * len(neg))


def _stepwise_ap(scores, labels) -> float:
    """Average precision by its definition: precision at each distinct threshold times the recall it adds."""
    key = [-math.inf if x is None or x != x else x for x in scores]
    total, ap, prev_recall = sum(labels), 0.0, 0.0
    for t in sorted(set(key), reverse=True):
        chosen = [y for k, y in zip(key, labels) if k >= t]
        recall = sum(chosen) / total
        ap += (recall - prev_recall) * sum(chosen) / len(chosen)
        prev_recall = recall
    return ap


def test_metrics_match_their_definitions_on_random_ties_and_missing_scores():
    """scikit-learn needs finite scores: the missing ones (None, NaN) must still rank last and tie each other."""
    rng = random.Random(7)
    for _ in range(200):
        n = rng.randint(3, 40)
        labels = [i == 0 or (i != 1 and rng.random() < 0.3) for i in range(n)]
        scores = [rng.choice([None, float("nan"), float(rng.randint(-3, 3)), rng.random(), -1e300, 1e300])
                  for _ in range(n)]
        assert ar.roc_auc(scores, labels) == pytest.approx(_pairwise_auc(scores, labels), abs=1e-12)
        assert ar.average_precision(scores, labels) == pytest.approx(_stepwise_ap(scores, labels), abs=1e-12)


def test_confusion_counts():
    c = ar.confusion([True, True, False, False, False], [True, False, True, False, False])
    assert (c["flagged"], c["tp"], c["fp"], c["fn"], c["tn"]) == (2, 1, 1, 1, 2)
    assert c["precision"] == 0.5 and c["recall"] == 0.5
    assert ar.confusion([False, False], [True, False])["precision"] is None


def test_subsets_keep_run_onsets_and_drop_repeats():
    labels = [False, True, True, False, True, False, False]
    subsets = ar.subset_indices(labels, warmup_lines=2)
    assert subsets == {"all": list(range(7)), "after_warmup": [2, 3, 4, 5, 6], "onsets": [0, 1, 3, 4, 5, 6]}
    assert "after_warmup" not in ar.subset_indices(labels, warmup_lines=5)  # no anomaly left after warm-up
    assert "onsets" not in ar.subset_indices([True, False, True, False], warmup_lines=0)  # no repeat to drop


def test_load_labelled_rejects_unknown_format(tmp_path: Path):
    log = tmp_path / "x.log"
    log.write_text("- a\nFATAL b\n")
    assert ar.load_labelled(log) == [("a", False), ("b", True)]
    assert ar.load_labelled(log, max_lines=1) == [("a", False)]
    with pytest.raises(ValueError, match="label format"):
        ar.load_labelled(log, labels="hdfs")


# ---- end to end on the first BGL lines ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bgl_head() -> list[tuple[str, bool]]:
    from pipeline.evaluation.datasets import loghub_dir

    try:
        path = loghub_dir() / "BGL_2k.log"
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    rows = ar.load_labelled(path, max_lines=60)
    assert sum(y for _, y in rows) == 2  # lines 8 and 9: two anomalies, 58 normal lines
    return rows


def _engine(text_lm, normalize: bool) -> Engine:
    settings = load_settings(None, cache={"sinks": 4, "window": 200, "chunk": 64},
                             score={"normalize": normalize, "warmup_lines": 20, "top_tokens": 3},
                             note={"every_tokens": 0})
    return Engine(text_lm, settings)


def test_scores_do_not_depend_on_lines_per_record(text_lm, bgl_head):
    lines = [text for text, _ in bgl_head[:25]]
    a = ar.score_lines(_engine(text_lm, False), lines, lines_per_record=20)
    b = ar.score_lines(_engine(text_lm, False), lines, lines_per_record=7)
    assert a.tokens == b.tokens and a.flagged == b.flagged
    assert a.mean_nll == pytest.approx(b.mean_nll, abs=1e-5)


@pytest.fixture(scope="module")
def bgl_passes(text_lm, bgl_head) -> tuple[list[ar.PassResult], list[int]]:
    """Both passes (normalize off, on) over the first 60 BGL lines, 20 lines a record, and the progress calls."""
    progress: list[int] = []
    lines = [text for text, _ in bgl_head]
    passes = [ar.score_lines(_engine(text_lm, n), lines, 20, progress=progress.append) for n in (False, True)]
    return passes, progress


def test_report_end_to_end_shapes_and_consistency(text_lm, bgl_head, bgl_passes):
    lines = [text for text, _ in bgl_head]
    labels = [y for _, y in bgl_head]
    passes, progress = bgl_passes
    assert progress == [20, 20, 20] * 2
    off, on = passes
    for p in passes:
        assert len(p.mean_nll) == len(p.z) == len(p.max_nll) == len(p.flagged) == len(lines)
        assert p.tokens_seen == sum(p.tokens)
        for i, (mean, top, total, n) in enumerate(zip(p.mean_nll, p.max_nll, p.sum_nll, p.tokens)):
            assert mean is not None and top is not None and top >= mean - 1e-6
            assert total == pytest.approx(mean * (n - 1 if i == 0 else n))  # the first token has no prediction
        assert not any(p.flagged[:20])  # nothing flagged during warm-up
    baselines = ar.baseline_scores(lines, text_lm.tokenizer)
    assert baselines["length_tokens"] == [float(n) for n in off.tokens]  # raw text is what the off pass scored
    assert sum(on.tokens) < sum(off.tokens)  # BGL lines are full of numbers that normalisation collapses

    report = ar.build_report(Path("BGL_2k.log"), bgl_head, baselines, passes, {"score": {"warmup_lines": 20}},
                             warmup_lines=20)
    assert report["lines"] == 60 and report["anomalies"] == 2 and report["ks"] == [2, 50]
    all_rows = [r for r in report["metrics"] if r["subset"] == "all"]
    assert {(r["ranker"], r["normalize"]) for r in all_rows} == (
        {(b, "-") for b in ar.BASELINES} | {(n, s) for n in ar.LM_RANKERS for s in ("off", "on")})
    for r in report["metrics"]:
        assert 0.0 <= r["auc"] <= 1.0 and 0.0 < r["ap"] <= 1.0
        assert all(0.0 <= v <= 1.0 for v in r["p_at"].values())
    # the anomalies sit at lines 8-9, inside warm-up, so there is no `after_warmup` subset with both classes;
    # `onsets` keeps line 8 (a run's first line) and drops line 9 (its repeat)
    assert {r["subset"] for r in report["metrics"]} == {"all", "onsets"}
    onset_rows = [r for r in report["metrics"] if r["subset"] == "onsets"]
    assert all(r["lines"] == 59 and r["anomalies"] == 1 and list(r["p_at"]) == ["1", "50"] for r in onset_rows)
    for norm, p in zip(("off", "on"), passes):
        flags = report["passes"][norm]["flags"]
        assert flags["tp"] + flags["fp"] + flags["fn"] + flags["tn"] == 60
        assert flags["tp"] + flags["fn"] == sum(labels)
        assert report["passes"][norm]["columns"]["z"] == p.z
    saved = json.loads(json.dumps(report, allow_nan=False))  # the report is plain JSON ...
    saved["metrics"], saved["passes"]["on"]["flags"] = [], {}
    rescored = ar.rescore_report(saved)  # ... from which the metrics can be recomputed without the model
    assert rescored["metrics"] == report["metrics"]
    assert rescored["passes"]["on"]["flags"] == report["passes"]["on"]["flags"]


def test_markdown_and_png(tmp_path: Path, text_lm, bgl_head, bgl_passes):
    lines = [text for text, _ in bgl_head]
    passes = bgl_passes[0][:1]
    meta = {"labels_format": "bgl", "model": {"name": "tiny"}, "cache": {"sinks": 4, "window": 200},
            "score": {"anomaly_z": 3.0, "warmup_lines": 20}}
    report = ar.build_report(Path("BGL_2k.log"), bgl_head, ar.baseline_scores(lines, text_lm.tokenizer),
                             passes, meta, warmup_lines=20)
    table = anomaly_command.markdown(report)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("|")]
    by_ranker: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        by_ranker.setdefault((r[0], r[1]), r)  # first table wins
    all_rows = {(r["ranker"], r["normalize"]): r for r in report["metrics"] if r["subset"] == "all"}
    # the first table is "all lines": its cells are the report's metrics, 3 decimals
    chars = all_rows["length_chars", "-"]
    assert by_ranker[("line length (chars)", "-")][2:4] == [f"{chars['auc']:.3f}", f"{chars['ap']:.3f}"]
    assert by_ranker[("mean NLL", "off")][2] == f"{all_rows['mean_nll', 'off']['auc']:.3f}"
    assert ["ranker", "normalize", "ROC-AUC", "AP", "P@1", "P@50"] in rows  # the onsets table's header
    flags = report["passes"]["off"]["flags"]
    flag_row = next(r for r in rows if r[0] == "off" and len(r) == 11)
    assert flag_row[1:6] == [str(flags[k]) for k in ("flagged", "tp", "fp", "fn", "tn")]
    assert "**Ranking, incident onsets" in table and math.isfinite(report["passes"]["off"]["elapsed_s"])
    png = anomaly_command.save_png(report, tmp_path / "roc.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # `--from-report` re-renders a saved report without loading a model
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps(report))
    parser = argparse.ArgumentParser()
    anomaly_command.add_parser(parser.add_subparsers())
    args = parser.parse_args(["anomaly", "--from-report", str(saved), "--out", str(tmp_path / "re")])
    assert args.func(args) == 0
    assert (tmp_path / "re" / "anomaly_bgl.png").is_file()
    assert json.loads((tmp_path / "re" / "anomaly_bgl.json").read_text())["metrics"] == report["metrics"]


def test_command_parses_its_options():
    parser = argparse.ArgumentParser()
    anomaly_command.add_parser(parser.add_subparsers())
    args = parser.parse_args(["anomaly", "--max-lines", "60", "--labels", "bgl", "--out", "x", "--normalize", "on"])
    assert args.func is anomaly_command.run and args.max_lines == 60 and args.out == Path("x")
    assert parser.parse_args(["anomaly"]).out == Path("out/anomaly")
