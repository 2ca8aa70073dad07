"""`sinkstream eval anomaly`: the service's annotations against labelled sessions, lines and documents.

Everything the service says comes from the service itself: the labelled data become input records (one key per
HDFS block, one key for BGL, one for the documents), a real `Service` consumes them from an in-memory topic with
in-memory checkpoints (`connectors.memory`: the same loop, batcher, pooled KV cache, scoring, template memory,
alert threshold and verdicts as with Kafka and Redis), and the published annotations are read back. Labels never
enter the records: they stay on this side and are joined to the annotations by key and line number.

Per-key (session) scores are taken from what a subscriber sees: the key's last `score` annotation, whose running
`verdict` carries the key's `key_score` and `profile_distance` (how far the key's template counts are from the
nearest normal session of the reference: ECVC in streaming form, `templates.reference_session`;
`pipeline.service.verdict`).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import structlog

from connectors.memory import MemorySink, MemorySource, MemoryStore, MemoryTopic
from model.loader import LoadedModel
from pipeline.evaluation.detectors import rank_metrics, session_detectors
from pipeline.evaluation.hdfs import HdfsSplit, Renderer, interleave
from pipeline.settings import Settings, load_settings

log = structlog.get_logger(__name__)

IN, OUT = "eval.in", "eval.out"
HDFS_SESSION = r"blk_-?\d+"  # `templates.reference_session` for HDFS: every line names its block


def eval_settings(base: Settings | None, reference: Path | None, session: str | None = None) -> Settings:
    """The user's settings (model, cache, score, templates, service sizes) for an evaluation run, with in-memory
    topic names, notes off, checkpoints rare, `reference` as `templates.reference` (None: no reference) and
    `session` as `templates.reference_session`."""
    settings = base if base is not None else load_settings(None)
    return settings.model_copy(update={
        "kafka": settings.kafka.model_copy(update={"input_topic": IN, "output_topic": OUT}),
        "note": settings.note.model_copy(update={"every_tokens": 0}),
        "checkpoint": settings.checkpoint.model_copy(update={"every_records": 100_000}),
        "templates": settings.templates.model_copy(update={"reference": reference, "reference_session": session}),
    })


def run_service(lm: LoadedModel, settings: Settings, records: Sequence[tuple[str, str]],
                progress: Callable[[int], None] | None = None) -> tuple[list[dict[str, Any]], float]:
    """Feed (key, value) records through a real `Service` on in-memory connectors; its annotations, seconds."""
    from pipeline.service.engine import Engine
    from pipeline.service.service import Service

    topic = MemoryTopic(IN, partitions=1)
    for key, value in records:
        topic.append(0, key.encode(), value.encode())
    sink = MemorySink()
    service = Service(settings, Engine(lm, settings), MemorySource.factory(topic), sink, MemoryStore())
    started = time.perf_counter()
    service.run(idle_exit_s=0.5, install_signals=False)
    elapsed = time.perf_counter() - started
    published = sink.values(OUT)
    if progress is not None:
        progress(len(records))
    return published, elapsed


def scored_lines(published: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Every scored line by stream, in line order, with the record's verdict attached as `_verdict`."""
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for a in published:
        if a["kind"] != "score":
            continue
        for line in a["score"]["lines"]:
            out[a["stream"]].append({**line, "_verdict": a["score"].get("verdict")})
    for lines in out.values():
        lines.sort(key=lambda x: x["line_no"])
    return out


# ---- HDFS: sessions ------------------------------------------------------------------------------------------


def hdfs_eval(lm: LoadedModel | None, base: Settings | None, split: HdfsSplit, renderer: Renderer,
              concurrent: int = 30, seed: int = 0, workdir: Path | None = None) -> dict[str, Any]:
    """Detectors of evaluate.py on the event ids, and (with `lm`) the service's per-key scores, on one split."""
    labels = [s.abnormal for s in split.test]
    report: dict[str, Any] = {
        "reference_sessions": len(split.reference), "test_sessions": len(split.test),
        "test_abnormal": sum(labels), "test_lines": sum(len(s.events) for s in split.test),
        "detectors": session_detectors([s.events for s in split.reference], [s.events for s in split.test], labels),
    }
    ref_pairs = interleave(split.reference, renderer, concurrent, seed)
    test_pairs = interleave(split.test, renderer, concurrent, seed + 1)
    tmp = Path(tempfile.mkdtemp(prefix="sinkstream-hdfs-", dir=workdir))
    reference_file = tmp / "hdfs_reference.log"
    reference_file.write_text("".join(line + "\n" for _, line in ref_pairs))
    settings = eval_settings(base, reference_file, session=HDFS_SESSION)
    report["templates_only"] = templates_only(settings, [line for _, line in ref_pairs], test_pairs, split)
    if lm is None:
        return report
    published, elapsed = run_service(lm, settings, [(block, line + "\n") for block, line in test_pairs])
    lines = scored_lines(published)
    verdicts = []
    for s in split.test:
        got = lines.get(s.block, [])
        if len(got) != len(s.events):
            raise RuntimeError(f"key {s.block}: expected {len(s.events)} scored lines, got {len(got)}")
        verdicts.append(got[-1]["_verdict"] or {})
    alerted = [any(x.get("alert") for x in lines[s.block]) for s in split.test]
    report.update(service=verdict_rankers(verdicts, labels, alerted))
    tokens = sum(a["score"]["tokens"] for a in published if a["kind"] == "score")
    n_alerts = sum(1 for x in lines.values() for line in x if line.get("alert"))
    report.update(service_s=round(elapsed, 1), tokens=tokens,
                  tokens_per_s=round(tokens / elapsed, 1) if elapsed else None,
                  line_alerts=n_alerts, alert_rate=settings.score.alert_rate, keys_seen=len(lines))
    return report


def verdict_rankers(verdicts: Sequence[dict[str, Any]], labels: Sequence[bool],
                    alerted: Sequence[bool] | None = None) -> dict[str, dict[str, Any]]:
    """Per-key rankers from each key's last verdict (a subscriber's view); flags: a line alerted (`alerted`), a
    template outside the reference, a mix of templates no normal session has."""
    def col(name: str) -> list[float | None]:
        return [None if v.get(name) is None else float(v[name]) for v in verdicts]

    not_ref = col("not_in_reference")
    distance = col("profile_distance")
    return {
        "verdict key_score (profile + not-in-reference + max score)": rank_metrics(
            col("key_score"), labels, [(d or 0) > 0 or (n or 0) > 0 for d, n in zip(distance, not_ref)]),
        "verdict profile_distance": rank_metrics(distance, labels, [(d or 0) > 0 for d in distance]),
        "verdict not_in_reference": rank_metrics(not_ref, labels, [(n or 0) > 0 for n in not_ref]),
        "verdict max_score": rank_metrics(col("max_score"), labels, alerted),
    }


def judge_without_model(settings: Settings, reference_lines: Sequence[str], keyed_lines: Sequence[tuple[str, str]]
                        ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(key, line) pairs, in order, through the service's own `StreamJudge` per key and a partition memory seeded
    from `reference_lines` exactly as the service seeds it, each line a record (settled after it). No model: z is
    None, so a line's score is its novelty and severity terms. Returns the judges by key and the lines' JSON."""
    import torch

    from pipeline.service.scoring import LineScore
    from pipeline.service.templates import build_reference
    from pipeline.service.verdict import StreamJudge

    memory = build_reference(list(reference_lines), settings.templates)
    judges: dict[str, StreamJudge] = {}
    lines = []
    for key, text in keyed_lines:
        judge = judges.setdefault(key, StreamJudge(settings.score, settings.templates))
        line = LineScore(judge.verdict.lines, text, [], torch.empty(0))
        judge.judge(line, memory)
        judge.settle(memory)
        lines.append(line.to_json())
    return judges, lines


def templates_only(settings: Settings, reference_lines: Sequence[str], test_pairs: Sequence[tuple[str, str]],
                   split: HdfsSplit) -> dict[str, dict[str, Any]]:
    """The per-key verdicts without the LM, at full size and cheaply: the test lines, in the service's order,
    through `judge_without_model` (line scores are novelty and severity only)."""
    judges, _ = judge_without_model(settings, reference_lines, test_pairs)
    verdicts = [judges[s.block].verdict.model_dump() for s in split.test]
    return verdict_rankers(verdicts, [s.abnormal for s in split.test])


# ---- BGL: lines ---------------------------------------------------------------------------------------------


BASELINES = ("keyword FATAL", "declared severity (default levels)", "line length (chars)")  # no model, once


def line_rankers(texts: Sequence[str], lines: Sequence[dict[str, Any]]) -> dict[str, list[float | None]]:
    """Per-line rankers from the annotations (and the two baselines that need no model)."""
    def seen_ref(x: dict[str, Any]) -> float | None:
        t = x.get("template")
        if t is None or t.get("seen_reference") is None:
            return None
        return 1.0 if t["seen_reference"] == 0 else 0.0

    from pipeline.service.verdict import line_severity
    from pipeline.settings import DEFAULT_SEVERITY

    return {
        "keyword FATAL": [1.0 if " FATAL " in f" {t} " else 0.0 for t in texts],
        "declared severity (default levels)": [DEFAULT_SEVERITY.get(line_severity(t, DEFAULT_SEVERITY) or "", 0.0)
                                               for t in texts],
        "line length (chars)": [float(len(t)) for t in texts],
        "new template (not in reference)": [seen_ref(x) for x in lines],
        "LM surprisal (mean NLL)": [x.get("mean_nll") for x in lines],
        "combined score": [x.get("score") for x in lines],
    }


def bgl_pass(lm: LoadedModel, base: Settings | None, reference_lines: Sequence[str], test: Sequence[str],
             lines_per_record: int = 20, workdir: Path | None = None) -> tuple[list[dict[str, Any]], float, int]:
    """Stream the test lines as one key through the service, with `reference_lines` as the reference of normal."""
    tmp = Path(tempfile.mkdtemp(prefix="sinkstream-bgl-", dir=workdir))
    ref = tmp / "reference.log"
    ref.write_text("".join(line + "\n" for line in reference_lines))
    settings = eval_settings(base, ref)
    records = [("bgl", "".join(line + "\n" for line in test[i:i + lines_per_record]))
               for i in range(0, len(test), lines_per_record)]
    published, elapsed = run_service(lm, settings, records)
    got = scored_lines(published)["bgl"]
    if len(got) != len(test):
        raise RuntimeError(f"expected {len(test)} scored lines, got {len(got)}")
    tokens = sum(a["score"]["tokens"] for a in published if a["kind"] == "score")
    return got, elapsed, tokens


def bgl_templates_only(base: Settings | None, reference_lines: Sequence[str], test: Sequence[str]
                       ) -> list[dict[str, Any]]:
    """The test lines' annotations without the LM: one stream through `judge_without_model`, with
    `reference_lines` as the reference (each score is the novelty and severity terms)."""
    return judge_without_model(eval_settings(base, None), reference_lines, [("bgl", text) for text in test])[1]


def onset_indices(labels: Sequence[bool]) -> list[int]:
    """All normal lines and the first line of each run of anomalous lines."""
    return [i for i, y in enumerate(labels) if not y or i == 0 or not labels[i - 1]]


def bgl_metrics(texts: Sequence[str], labels: Sequence[bool], passes: dict[str, list[dict[str, Any]]]
                ) -> list[dict[str, Any]]:
    """Rows (pass, ranker, subset, metrics): the baselines once, the annotation rankers per pass."""
    rows = []
    onsets = onset_indices(labels)
    for name, lines in passes.items():
        rankers = line_rankers(texts, lines)
        alerts = [bool(x.get("alert")) for x in lines]
        for ranker, scores in rankers.items():
            if ranker in BASELINES and name != next(iter(passes)):
                continue
            if all(s is None for s in scores):
                continue
            flags = alerts if ranker == "combined score" else None
            for subset, idx in (("all", list(range(len(labels)))), ("onsets", onsets)):
                m = rank_metrics([scores[i] for i in idx], [labels[i] for i in idx],
                                 None if flags is None else [flags[i] for i in idx])
                rows.append({"pass": "-" if ranker in BASELINES else name,
                             "ranker": ranker, "subset": subset, **m})
    return rows


# ---- documents -----------------------------------------------------------------------------------------------


def documents(texts: dict[str, str], docs: int = 24, lines_per_doc: int = 30) -> list[tuple[str, int]]:
    """(line, document number) for `docs` documents of `lines_per_doc` non-empty lines, cycling through the texts
    and taking consecutive stretches of each, so that every boundary is a change of text."""
    names = sorted(texts)
    pools = {n: [ln.strip() for ln in texts[n].splitlines() if ln.strip()] for n in names}
    pos = dict.fromkeys(names, 0)
    out = []
    for d in range(docs):
        name = names[d % len(names)]
        chunk = pools[name][pos[name]: pos[name] + lines_per_doc]
        pos[name] += lines_per_doc * 3  # skip ahead: stretches of one text do not continue each other
        out += [(line, d) for line in chunk]
    return out


def boundary_metrics(lines: Sequence[dict[str, Any]], doc: Sequence[int], first: int = 3) -> dict[str, Any]:
    """ROC-AUC etc. of the score and of mean NLL for the first `first` lines after each boundary (document 0's
    start is not a boundary: the stream starts there) against all other lines."""
    labels, keep = [], []
    for i, d in enumerate(doc):
        if d == 0:
            continue
        start = doc.index(d)
        labels.append(i - start < first)
        keep.append(i)
    out = {}
    for name, col in (("combined score", "score"), ("LM surprisal (mean NLL)", "mean_nll"), ("z", "z")):
        scores = [lines[i].get(col) for i in keep]
        if all(s is None for s in scores):
            continue
        out[name] = rank_metrics(scores, labels)
    return out


def finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x
