"""Rank metrics and the simple session detectors of ait-aecid/anomaly-detection-log-datasets' `evaluate.py`.

Reimplemented with scikit-learn on the same reference/test split as sinkstream's score (Landauer, Skopik &
Wurzenberger, FSE 2024; their README's HDFS LogDeep row: Event 63.3, ECVC 96.0, Event+Length+ECVC 98.8 F1):

- **Event**: a test session holds an event type that no reference session holds (score 1, else 0);
- **Length**: its length is outside the reference sessions' [min, max];
- **ECVC**: distance of its event-count vector to the most similar reference vector, sum |r - t| / sum max(r, t)
  (1 - weighted Jaccard; evaluate.py's `check_count_vector` without normalisation or idf): 0 = a count vector
  seen in the reference;
- **2-gram** (STIDE, Forrest et al. 1996): the session, padded with a start and an end marker, holds a pair of
  consecutive events that no reference session holds; evaluate.py's score m / (n (L - n/2)) with m = 1 at the
  first unknown n-gram.

Every detector gives one score per session; `rank_metrics` reports ROC-AUC, average precision, the best F1 over
all thresholds and, for binary decisions (`flags`), their F1.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np


def rank_metrics(scores: Sequence[float | None], labels: Sequence[bool],
                 flags: Sequence[bool] | None = None) -> dict[str, Any]:
    """ROC-AUC, average precision and best F1 (over every threshold) of `scores`; `f1_at_flags` for decisions.

    A None score ranks below every other score. Both classes must be present.
    """
    from sklearn.metrics import average_precision_score, f1_score, precision_recall_curve, roc_auc_score

    y = np.asarray(labels, dtype=bool)
    if y.all() or not y.any():
        raise ValueError(f"expected both classes among the labels, got {int(y.sum())} of {len(y)} positive")
    finite = [s for s in scores if s is not None and math.isfinite(s)]
    floor = (min(finite) if finite else 0.0) - 1.0
    s = np.array([floor if v is None or not math.isfinite(v) else float(v) for v in scores], dtype=np.float64)
    precision, recall, _ = precision_recall_curve(y, s)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-300), 0.0)
    best = int(np.argmax(f1))
    out: dict[str, Any] = {
        "n": int(len(y)), "positives": int(y.sum()),
        "auc": float(roc_auc_score(y, s)), "ap": float(average_precision_score(y, s)),
        "best_f1": float(f1[best]), "best_precision": float(precision[best]), "best_recall": float(recall[best]),
    }
    if flags is not None:
        f = np.asarray(flags, dtype=bool)
        tp = int((f & y).sum())
        out.update(flagged=int(f.sum()), tp=tp, f1_at_flags=float(f1_score(y, f, zero_division=0.0)))
    return out


def count_matrix(sequences: Sequence[Sequence[Hashable]], vectorizer: Any = None) -> tuple[Any, Any]:
    """Event-count vectors as a dense float matrix (scikit-learn `DictVectorizer`; unseen events dropped when a
    fitted `vectorizer` is given, so pass the reference's and count unknown events separately)."""
    from sklearn.feature_extraction import DictVectorizer

    dicts = [{str(k): v for k, v in Counter(seq).items()} for seq in sequences]
    if vectorizer is None:
        vectorizer = DictVectorizer(sparse=False)
        return vectorizer.fit_transform(dicts), vectorizer
    return vectorizer.transform(dicts), vectorizer


def event_scores(reference: Sequence[Sequence[Hashable]], test: Sequence[Sequence[Hashable]]) -> list[float]:
    known = {e for seq in reference for e in seq}
    return [1.0 if any(e not in known for e in seq) else 0.0 for seq in test]


def length_scores(reference: Sequence[Sequence[Hashable]], test: Sequence[Sequence[Hashable]]) -> list[float]:
    lengths = [len(seq) for seq in reference]
    low, high = min(lengths), max(lengths)
    return [1.0 if not low <= len(seq) <= high else 0.0 for seq in test]


def ecvc_scores(reference: Sequence[Sequence[Hashable]], test: Sequence[Sequence[Hashable]]) -> list[float]:
    """Distance of each test count vector to the nearest reference one (module docstring), in [0, 1]."""
    ref, vec = count_matrix(reference)
    ref = np.unique(ref, axis=0)
    known = set(vec.feature_names_)
    out = []
    for seq in test:
        counts = Counter(str(e) for e in seq)
        unknown = sum(v for k, v in counts.items() if k not in known)
        row = vec.transform([{k: v for k, v in counts.items() if k in known}])[0]
        diff = np.abs(ref - row).sum(axis=1) + unknown
        limit = np.maximum(ref, row).sum(axis=1) + unknown
        out.append(float((diff / np.maximum(limit, 1e-12)).min()))
    return out


def ngram_scores(reference: Sequence[Sequence[Hashable]], test: Sequence[Sequence[Hashable]],
                 n: int = 2) -> list[float]:
    """STIDE as in evaluate.py's `detect_ngram`: m / (n (L - n/2)) with m = 1 when an unknown n-gram occurs,
    L the padded length; scaled to [0, 1] by the largest score."""
    pad: tuple[Hashable, ...] = ("<s>",)
    known: set[tuple[Hashable, ...]] = set()
    for seq in reference:
        s = pad + tuple(seq) + ("</s>",)
        known.update(s[i:i + n] for i in range(len(s) - n + 1))
    raw = []
    for seq in test:
        s = pad + tuple(seq) + ("</s>",)
        m = 1 if any(s[i:i + n] not in known for i in range(len(s) - n + 1)) else 0
        raw.append(m / (1 if n >= len(s) else n * (len(s) - n / 2)))
    top = max(raw) if raw else 0.0
    return [r / top if top else 0.0 for r in raw]


def session_detectors(reference: Sequence[Sequence[Hashable]], test: Sequence[Sequence[Hashable]],
                      labels: Sequence[bool]) -> dict[str, dict[str, Any]]:
    """Metrics of Event, ECVC, 2-gram and Event+Length+ECVC (any of them flags; ECVC ranks) on one split."""
    event = event_scores(reference, test)
    length = length_scores(reference, test)
    ecvc = ecvc_scores(reference, test)
    gram = ngram_scores(reference, test, 2)
    union = [e + ln + c for e, ln, c in zip(event, length, ecvc)]  # a flag of Event or Length ranks above ECVC
    return {
        "Event": rank_metrics(event, labels, [e > 0 for e in event]),
        "ECVC": rank_metrics(ecvc, labels, [c > 0 for c in ecvc]),
        "2-gram": rank_metrics(gram, labels, [g > 0 for g in gram]),
        "Event+Length+ECVC": rank_metrics(union, labels, [u > 0 for u in union]),
    }
