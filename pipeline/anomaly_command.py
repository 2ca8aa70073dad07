"""`sinkstream anomaly`: how well the service's per-line scores rank the labelled anomalies of a log.

Streams a labelled log (default: Loghub `BGL_2k.log`) through a real `StreamSession` once with `score.normalize`
off and once on, and writes `<out>/anomaly_<labels>.json` (metrics, flag counts and every per-line score) and
`<out>/anomaly_<labels>.png` (ROC curves). The Markdown tables go to stdout, progress bars to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from model.loader import load_model
from pipeline import anomaly_report as ar
from pipeline.plots import Panel, save_figure
from pipeline.session import Engine
from pipeline.settings import Settings, load_settings

NORMALIZE_CHOICES = {"off": (False,), "on": (True,), "both": (False, True)}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "anomaly",
        help="ROC-AUC, average precision and precision@k of the anomaly score on a labelled log",
        description=(
            "Stream a labelled log through the service's scoring path (StreamSession) and rank its lines by "
            "mean NLL, max-token NLL, total NLL and the service's z-score, against line-length baselines, with "
            "normalisation off and on. Writes anomaly_<labels>.json and .png under --out; tables to stdout."
        ),
    )
    p.add_argument("--log", type=Path, default=None, help="labelled log (default: BGL_2k.log in the Loghub folder)")
    p.add_argument("--labels", choices=ar.LABEL_FORMATS, default="bgl", help="label format of --log (default bgl)")
    p.add_argument("--max-lines", type=int, default=0, help="only the first N lines (default 0: all)")
    p.add_argument("--normalize", choices=sorted(NORMALIZE_CHOICES), default="both",
                   help="score.normalize for the passes (default both: off, then on)")
    p.add_argument("--lines-per-record", type=int, default=20, help="log lines per input record (default 20)")
    p.add_argument("--config", type=Path, default=None, help="settings YAML (model, cache, score; default as the service)")
    p.add_argument("--model", default=None, help="override model.name of the settings")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: model.threads of the settings; 1 is much faster on a busy CPU)")
    p.add_argument("--out", type=Path, default=Path("out/anomaly"), help="output folder (default out/anomaly)")
    p.set_defaults(func=run)


def _settings(args: argparse.Namespace, normalize: bool) -> Settings:
    """The service's settings with notes off, at least one top token, and the requested normalisation."""
    over: dict[str, Any] = {"note": {"every_tokens": 0}, "score": {"normalize": normalize}}
    if args.model:
        over["model"] = {"name": args.model}
    if args.threads is not None:
        over.setdefault("model", {})["threads"] = args.threads
    settings = load_settings(args.config, **over)
    if settings.score.top_tokens < 1:  # max-token NLL is read from `top`
        score = settings.score.model_copy(update={"top_tokens": 1})
        settings = settings.model_copy(update={"score": score})
    return settings


def run(args: argparse.Namespace) -> int:
    if args.max_lines < 0 or args.lines_per_record < 1 or (args.threads is not None and args.threads < 0):
        sys.stderr.write(f"error: expected --max-lines >= 0, --lines-per-record >= 1 and --threads >= 0, "
                         f"got {args.max_lines}, {args.lines_per_record} and {args.threads}\n")
        return 2
    log_path = args.log
    if log_path is None:
        from pipeline.datasets import loghub_dir

        log_path = loghub_dir() / "BGL_2k.log"
    labelled = ar.load_labelled(log_path, args.labels, args.max_lines)
    lines = [text for text, _ in labelled]
    first = _settings(args, False)
    started = time.perf_counter()
    lm = load_model(first.model.name, first.model.device, first.model.dtype, first.model.threads)
    passes: list[ar.PassResult] = []
    for normalize in NORMALIZE_CHOICES[args.normalize]:
        engine = Engine(lm, _settings(args, normalize))
        desc = f"anomaly normalize={'on' if normalize else 'off'}"
        with tqdm(total=len(lines), desc=desc, unit="line", file=sys.stderr) as bar:
            passes.append(ar.score_lines(engine, lines, args.lines_per_record, progress=bar.update))
    sc = first.score
    meta = {
        "labels_format": args.labels,
        "model": {"name": first.model.name, "fingerprint": lm.fingerprint, "device": str(lm.device),
                  "threads": torch.get_num_threads(),
                  "dtype": str(lm.dtype).removeprefix("torch.")},
        "cache": first.cache.model_dump(),
        "score": {"anomaly_z": sc.anomaly_z, "warmup_lines": sc.warmup_lines, "top_tokens": max(sc.top_tokens, 1)},
        "lines_per_record": args.lines_per_record,
        "total_s": 0.0,
    }
    report = ar.build_report(log_path, labelled, ar.baseline_scores(lines, lm.tokenizer), passes, meta,
                             sc.warmup_lines)
    report["total_s"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"anomaly_{args.labels}.json"
    json_path.write_text(json.dumps(report, indent=1))
    png_path = save_roc_png(report, args.out / f"anomaly_{args.labels}.png")
    sys.stdout.write(markdown(report))
    sys.stdout.write(f"\nwrote {json_path} and {png_path}\n")
    return 0


def _fmt(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    """The ranking table (all lines, then after warm-up), flag counts and cost, as Markdown."""
    ks = report["ks"]
    out: list[str] = []
    for subset, title in (("all", "all lines"), ("after_warmup", f"lines after warm-up (line_no >= "
                                                                 f"{report['score']['warmup_lines']})")):
        rows = [r for r in report["metrics"] if r["subset"] == subset]
        if not rows:
            continue
        out.append(f"\n**Ranking, {title}: {rows[0]['lines']} lines, {rows[0]['anomalies']} anomalous**\n")
        out.append("| ranker | normalize | ROC-AUC | AP | " + " | ".join(f"P@{k}" for k in ks) + " |")
        out.append("|---|---|---|---|" + "---|" * len(ks))
        for r in rows:
            p_at = " | ".join(_fmt(r["p_at"].get(str(k))) for k in ks)
            out.append(f"| {ar.RANKER_TITLES[r['ranker']]} | {r['normalize']} | {_fmt(r['auc'])} | "
                       f"{_fmt(r['ap'])} | {p_at} |")
    out.append(f"\n**Service flag (z > {report['score']['anomaly_z']}, after {report['score']['warmup_lines']} "
               f"warm-up lines)**\n")
    out.append("| normalize | flagged | TP | FP | FN | TN | precision | recall | tokens | time (s) | tokens/s |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for norm, p in report["passes"].items():
        f = p["flags"]
        out.append(f"| {norm} | {f['flagged']} | {f['tp']} | {f['fp']} | {f['fn']} | {f['tn']} | "
                   f"{_fmt(f['precision'])} | {_fmt(f['recall'])} | {p['tokens']} | {p['elapsed_s']:.0f} | "
                   f"{p['tokens_per_s']} |")
    return "\n".join(out) + "\n"


def save_roc_png(report: dict[str, Any], path: Path) -> Path:
    """ROC curves of every ranker on all lines: one panel per normalisation setting (baselines in each)."""
    labels = report["columns"]["label"]
    auc = {(r["ranker"], r["normalize"]): r["auc"] for r in report["metrics"] if r["subset"] == "all"}
    panels = []
    for norm, p in report["passes"].items():
        series: dict[str, tuple[list[float], list[float]]] = {}
        for name in (*ar.BASELINES, *ar.LM_RANKERS):
            key = (name, "-") if name in ar.BASELINES else (name, norm)
            scores = report["columns"][name] if name in ar.BASELINES else p["columns"][name]
            series[f"{ar.RANKER_TITLES[name]} ({auc[key]:.2f})"] = ar.roc_curve(scores, labels)
        series["chance (0.50)"] = ([0.0, 1.0], [0.0, 1.0])
        panels.append(Panel(f"normalize {norm}", "false positive rate", "true positive rate", series,
                            markers=False))
    title = (f"{Path(report['log']).name}: {report['lines']} lines, {report['anomalies']} anomalous; "
             f"{report['model']['name']}, sinks {report['cache']['sinks']} + window {report['cache']['window']}")
    return save_figure(path, panels, title)
