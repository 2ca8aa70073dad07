"""How well sinkstream's per-line score ranks labelled anomalies: ROC-AUC, average precision, precision at k.

A labelled log (Loghub `BGL_2k.log`: label field stripped by `pipeline.evaluation.datasets.bgl_labels`, so it
cannot leak) is streamed through a real `StreamSession`, i.e. exactly the service's scoring path: records of a
few complete lines -> chunker -> tokenizer (with or without `normalize_line`) -> sink-cache model -> `LineScorer`. Each
line's published `mean_nll`, `z`, `anomaly` flag and its most surprising token (`top[0].nll`) become rankers,
next to two baselines that need no model: line length in characters and in tokens (raw text).

Metrics are rank-based and handle ties without depending on input order:

- ROC-AUC (scikit-learn's `roc_auc_score`): the Mann-Whitney U statistic, ties count one half (all-tied scores
  give 0.5); the ROC curve (`roc_curve`) keeps every distinct threshold;
- average precision (scikit-learn's `average_precision_score`): the step-wise area under the precision-recall
  curve over *distinct* thresholds, so a tie group counts once, at the precision of the whole group;
- precision@k is the expected precision of the top k under random tie-breaking at the k-th score. It stays
  hand-written: scikit-learn has no precision-at-k for a ranking with ties (`top_k_accuracy_score` is a
  per-sample multi-class metric).

A line with no score (`None`: e.g. a first line whose only token has no prediction, or a line before the
stream has any z) is ranked below every scored line; missing scores tie with each other.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from connectors.protocols import Record
from model.tokens import encode_text
from pipeline.service.engine import Engine
from pipeline.service.session import StreamSession

LABEL_FORMATS = ("bgl",)
# Rankers built from the service's annotations, in table order; baselines come first.
BASELINES = ("length_chars", "length_tokens")
LM_RANKERS = ("mean_nll", "max_nll", "sum_nll", "z")
RANKER_TITLES = {
    "length_chars": "line length (chars)",
    "length_tokens": "line length (tokens)",
    "mean_nll": "mean NLL",
    "max_nll": "max-token NLL",
    "sum_nll": "total NLL (mean x tokens)",
    "z": "z-score (service)",
}


# ---- metrics ----------------------------------------------------------------------------------------------


def _arrays(scores: Sequence[float | None], labels: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    """Scores as float64 (None/NaN -> -inf, i.e. ranked last) and labels as bool; both classes required."""
    if len(scores) != len(labels):
        raise ValueError(f"expected as many scores as labels, got {len(scores)} scores and {len(labels)} labels")
    s = np.array([-math.inf if x is None or (isinstance(x, float) and math.isnan(x)) else float(x) for x in scores],
                 dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    positives = int(y.sum())
    if positives == 0 or positives == len(y):
        raise ValueError(
            f"expected both anomalous and normal lines, got {positives} anomalous out of {len(y)} lines"
        )
    return s, y


def _ranked(scores: Sequence[float | None], labels: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    """Scores as dense ranks (missing, i.e. -inf, is the lowest value: rank 0) and labels as bool.

    scikit-learn rejects non-finite scores; every metric here depends only on the order of the scores (ties
    included), which dense ranks keep exactly. scikit-learn belongs to the `eval` extra: the metric functions
    import it when called, so that importing the command line works in the service image without it.
    """
    s, y = _arrays(scores, labels)
    _, ranks = np.unique(s, return_inverse=True)  # 0 for the lowest distinct value, ties share a rank
    return ranks.astype(np.float64), y


def roc_auc(scores: Sequence[float | None], labels: Sequence[bool]) -> float:
    """Probability that a random anomalous line outscores a random normal one (ties count one half)."""
    from sklearn.metrics import roc_auc_score  # eval extra (see _ranked)

    s, y = _ranked(scores, labels)
    return float(roc_auc_score(y, s))


def roc_curve(scores: Sequence[float | None], labels: Sequence[bool]) -> tuple[list[float], list[float]]:
    """(false positive rates, true positive rates) at every distinct threshold, starting at (0, 0)."""
    from sklearn.metrics import roc_curve as sk_roc_curve  # eval extra (see _ranked)

    s, y = _ranked(scores, labels)
    fpr, tpr, _ = sk_roc_curve(y, s, drop_intermediate=False)
    return fpr.tolist(), tpr.tolist()


def average_precision(scores: Sequence[float | None], labels: Sequence[bool]) -> float:
    """Sum over distinct thresholds of (recall gained) x (precision at that threshold)."""
    from sklearn.metrics import average_precision_score  # eval extra (see _ranked)

    s, y = _ranked(scores, labels)
    return float(average_precision_score(y, s))


def precision_at_k(scores: Sequence[float | None], labels: Sequence[bool], k: int) -> float:
    """Expected fraction of anomalies among the k highest scores, ties at the k-th score broken at random."""
    s, y = _arrays(scores, labels)
    if not 1 <= k <= len(s):
        raise ValueError(f"expected 1 <= k <= {len(s)} (number of lines), got k={k}")
    kth = np.sort(s)[::-1][k - 1]
    above = s > kth
    tied = s == kth
    expected = y[above].sum() + (k - above.sum()) * y[tied].sum() / tied.sum()
    return float(expected / k)


def ranking_metrics(scores: Sequence[float | None], labels: Sequence[bool], ks: Sequence[int]) -> dict[str, Any]:
    """AUC, AP and precision@k (k larger than the number of lines is skipped) of one ranker."""
    n = len(labels)
    return {
        "auc": roc_auc(scores, labels),
        "ap": average_precision(scores, labels),
        "p_at": {str(k): precision_at_k(scores, labels, k) for k in ks if k <= n},
        "lines": n,
        "anomalies": int(sum(bool(x) for x in labels)),
    }


def confusion(flags: Sequence[bool], labels: Sequence[bool]) -> dict[str, Any]:
    """Counts of the service's `anomaly` flag against the labels, with precision and recall."""
    if len(flags) != len(labels):
        raise ValueError(f"expected as many flags as labels, got {len(flags)} flags and {len(labels)} labels")
    tp = sum(1 for f, y in zip(flags, labels) if f and y)
    fp = sum(1 for f, y in zip(flags, labels) if f and not y)
    fn = sum(1 for f, y in zip(flags, labels) if not f and y)
    tn = len(labels) - tp - fp - fn
    return {
        "flagged": tp + fp, "tp": tp, "fp": fp, "fn": fn, "tn": tn,
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / (tp + fn) if tp + fn else None,
    }


# ---- streaming through the service path -------------------------------------------------------------------


def load_labelled(path: str | Path, labels: str = "bgl", max_lines: int = 0) -> list[tuple[str, bool]]:
    """(line text without its label, is_anomaly) for the first `max_lines` lines (0 = all) of a labelled log."""
    if labels != "bgl":
        raise ValueError(f"expected a label format in {LABEL_FORMATS}, got {labels!r}")
    from pipeline.evaluation.datasets import bgl_labels

    rows = bgl_labels(path)
    return rows[:max_lines] if max_lines > 0 else rows


@dataclass
class PassResult:
    """Per-line columns published by one pass over the log, plus its cost."""

    normalize: bool
    tokens: list[int] = field(default_factory=list)
    mean_nll: list[float | None] = field(default_factory=list)
    max_nll: list[float | None] = field(default_factory=list)
    sum_nll: list[float | None] = field(default_factory=list)
    z: list[float | None] = field(default_factory=list)
    flagged: list[bool] = field(default_factory=list)
    elapsed_s: float = 0.0
    tokens_seen: int = 0

    def ranker(self, name: str) -> list[float | None]:
        if name not in LM_RANKERS:
            raise ValueError(f"expected one of {LM_RANKERS}, got {name!r}")
        return list(getattr(self, name))


def score_lines(
    engine: Engine,
    lines: Sequence[str],
    lines_per_record: int = 20,
    progress: Callable[[int], None] | None = None,
    stream: str = "anomaly-report",
) -> PassResult:
    """Stream `lines` (no newlines inside) through a fresh `StreamSession`; collect each line's published score.

    Lines are sent `lines_per_record` to a record (results do not depend on it: forward passes are cut by
    content). Raises RuntimeError if the annotations do not come back one per line, in order, with the text
    that was sent.
    """
    if lines_per_record < 1:
        raise ValueError(f"expected lines_per_record >= 1, got {lines_per_record}")
    session = StreamSession(engine, stream)
    result = PassResult(normalize=engine.settings.score.normalize)
    start = time.perf_counter()
    for offset, first in enumerate(range(0, len(lines), lines_per_record)):
        batch = lines[first : first + lines_per_record]
        value = "".join(line + "\n" for line in batch).encode("utf-8")
        record = Record(stream, 0, offset, stream.encode(), value, {}, -1)
        published = [a for a in session.process(record) if a["kind"] == "score"]
        got = published[0]["score"]["lines"] if published else []
        if len(got) != len(batch):
            raise RuntimeError(f"record {offset}: expected {len(batch)} scored lines, got {len(got)}")
        for i, (sent, line) in enumerate(zip(batch, got)):
            if line["line_no"] != first + i or line["text"] != sent[: len(line["text"])]:
                raise RuntimeError(
                    f"record {offset}: expected line {first + i} {sent[:60]!r}, "
                    f"got line {line['line_no']} {line['text'][:60]!r}"
                )
            _collect(result, line)
        if progress is not None:
            progress(len(batch))
    result.elapsed_s = time.perf_counter() - start
    result.tokens_seen = session.tokens_seen
    return result


def _collect(result: PassResult, line: dict[str, Any]) -> None:
    """Append one published line score (annotation schema v1) to the pass's columns."""
    mean = line["mean_nll"]
    top = line["top"]
    result.tokens.append(int(line["tokens"]))
    result.mean_nll.append(mean)
    result.max_nll.append(float(top[0]["nll"]) if top else None)
    # Every token of a line has a prediction except the stream's very first token.
    scored = line["tokens"] - (1 if line["line_no"] == 0 else 0)
    result.sum_nll.append(mean * scored if mean is not None else None)
    result.z.append(line["z"])
    result.flagged.append(bool(line["anomaly"]))


# ---- the report -------------------------------------------------------------------------------------------


def default_ks(n_anomalies: int) -> list[int]:
    """k = 50, 100 and the number of anomalies (precision there equals recall there: R-precision)."""
    return sorted({50, 100, n_anomalies} - {0})


def baseline_scores(lines: Sequence[str], tokenizer: Any) -> dict[str, list[float | None]]:
    """Model-free rankers on the raw lines: length in characters and in tokens (line plus its newline)."""
    return {
        "length_chars": [float(len(line)) for line in lines],
        "length_tokens": [float(len(encode_text(tokenizer, line + "\n"))) for line in lines],
    }


SUBSETS = ("all", "after_warmup", "onsets")


def subset_indices(labels: Sequence[bool], warmup_lines: int) -> dict[str, list[int]]:
    """Line indices of each evaluation subset that holds both classes.

    `all`: every line. `after_warmup`: line_no >= warmup_lines (the lines the service may flag).
    `onsets`: every normal line plus only the *first* line of each run of consecutive anomalous lines
    (an incident's onset); the repeats inside a run are dropped.
    """
    n = len(labels)
    candidates = {
        "all": list(range(n)),
        "after_warmup": list(range(min(warmup_lines, n), n)),
        "onsets": [i for i in range(n) if not labels[i] or i == 0 or not labels[i - 1]],
    }
    out: dict[str, list[int]] = {}
    for name, idx in candidates.items():
        positives = sum(1 for i in idx if labels[i])
        if 0 < positives < len(idx) and (name == "all" or len(idx) < n):
            out[name] = idx
    return out


def candidates_of(
    baselines: dict[str, list[float | None]], passes: Sequence[PassResult]
) -> list[tuple[str, str, list[float | None]]]:
    """(ranker, normalize "-"/"off"/"on", per-line scores) for the baselines and every LM ranker of every pass."""
    out: list[tuple[str, str, list[float | None]]] = [(name, "-", list(s)) for name, s in baselines.items()]
    for p in passes:
        out += [(name, "on" if p.normalize else "off", p.ranker(name)) for name in LM_RANKERS]
    return out


def evaluate(
    labels: Sequence[bool],
    candidates: Sequence[tuple[str, str, list[float | None]]],
    warmup_lines: int,
) -> list[dict[str, Any]]:
    """One row per (subset, ranker, normalize); precision@k uses k = 50, 100 and the subset's anomaly count."""
    rows: list[dict[str, Any]] = []
    for subset, idx in subset_indices(labels, warmup_lines).items():
        sub_labels = [labels[i] for i in idx]
        ks = [k for k in default_ks(sum(sub_labels)) if k <= len(idx)]
        for name, norm, scores in candidates:
            metrics = ranking_metrics([scores[i] for i in idx], sub_labels, ks)
            rows.append({"ranker": name, "normalize": norm, "subset": subset, **metrics})
    return rows


def passes_from_report(report: dict[str, Any]) -> list[PassResult]:
    """Rebuild the passes of a saved report (its per-line columns) so metrics can be recomputed."""
    passes = []
    for norm, saved in report["passes"].items():
        cols = saved["columns"]
        p = PassResult(normalize=norm == "on", elapsed_s=saved["elapsed_s"], tokens_seen=saved["tokens"])
        for name in (*LM_RANKERS, "tokens", "flagged"):
            setattr(p, name, list(cols[name]))
        passes.append(p)
    return passes


def rescore_report(report: dict[str, Any]) -> dict[str, Any]:
    """Recompute `metrics` and `flags` of a saved report from its per-line columns (no model needed)."""
    labels = [bool(x) for x in report["columns"]["label"]]
    baselines = {name: report["columns"][name] for name in BASELINES}
    passes = passes_from_report(report)
    report["metrics"] = evaluate(labels, candidates_of(baselines, passes), report["score"]["warmup_lines"])
    for norm, p in zip(report["passes"], passes):
        report["passes"][norm]["flags"] = confusion(p.flagged, labels)
    return report


def build_report(
    log_path: Path,
    labelled: Sequence[tuple[str, bool]],
    baselines: dict[str, list[float | None]],
    passes: Sequence[PassResult],
    meta: dict[str, Any],
    warmup_lines: int,
) -> dict[str, Any]:
    """The JSON report: settings, per-ranker metrics, flag confusion per pass, and every per-line column."""
    labels = [is_anomaly for _, is_anomaly in labelled]
    n_pos = sum(labels)
    ks = [k for k in default_ks(n_pos) if k <= len(labels)]
    return {
        "log": str(log_path),
        "lines": len(labels),
        "anomalies": n_pos,
        "ks": ks,
        **meta,
        "metrics": evaluate(labels, candidates_of(baselines, passes), warmup_lines),
        "passes": {
            ("on" if p.normalize else "off"): {
                "elapsed_s": round(p.elapsed_s, 2),
                "tokens": p.tokens_seen,
                "tokens_per_s": round(p.tokens_seen / p.elapsed_s, 1) if p.elapsed_s > 0 else None,
                "flags": confusion(p.flagged, labels),
                "columns": {name: p.ranker(name) for name in LM_RANKERS}
                | {"tokens": p.tokens, "flagged": p.flagged},
            }
            for p in passes
        },
        "columns": {"label": labels, **baselines},
    }
