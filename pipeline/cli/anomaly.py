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

from pipeline.cli.common import add_model_options, load_model_for_cli, non_negative_int, positive_int
from pipeline.evaluation import anomaly_report as ar
from pipeline.evaluation.tables import cell, markdown_table
from pipeline.service.engine import Engine
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
    p.add_argument("--max-lines", type=non_negative_int, default=0, help="only the first N lines (default 0: all)")
    p.add_argument("--normalize", choices=sorted(NORMALIZE_CHOICES), default="both",
                   help="score.normalize for the passes (default both: off, then on)")
    p.add_argument("--lines-per-record", type=positive_int, default=20, help="log lines per input record (default 20)")
    p.add_argument(
        "--config", type=Path, default=None, help="settings YAML (model, cache, score; default as the service)"
    )
    add_model_options(p, model_default=None, model_help="override model.name of the settings", threads_default=None,
                      threads_help="torch CPU threads (default: model.threads of the settings; 1 is much faster on "
                      "a busy CPU)", device_and_dtype=False)
    p.add_argument("--from-report", type=Path, default=None,
                   help="re-render tables and PNG from a saved anomaly_<labels>.json (metrics recomputed, no model)")
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
    if args.from_report is not None:
        report = ar.rescore_report(json.loads(args.from_report.read_text()))
    else:
        report = _measure(args)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"anomaly_{report['labels_format']}.json"
    json_path.write_text(json.dumps(report, indent=1, allow_nan=False))
    png_path = save_png(report, args.out / f"anomaly_{report['labels_format']}.png")
    sys.stdout.write(markdown(report))
    sys.stdout.write(f"\nwrote {json_path} and {png_path}\n")
    return 0


def _measure(args: argparse.Namespace) -> dict[str, Any]:
    """Load the model, stream the log once per normalisation setting, and build the report."""
    log_path = args.log
    if log_path is None:
        from pipeline.evaluation.datasets import loghub_dir

        log_path = loghub_dir() / "BGL_2k.log"
    labelled = ar.load_labelled(log_path, args.labels, args.max_lines)
    lines = [text for text, _ in labelled]
    first = _settings(args, False)
    started = time.perf_counter()
    lm = load_model_for_cli(first.model.name, first.model.device, first.model.dtype, first.model.threads)
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
                  "threads": torch.get_num_threads(), "dtype": str(lm.dtype).removeprefix("torch.")},
        "cache": first.cache.model_dump(),
        "score": {"anomaly_z": sc.anomaly_z, "warmup_lines": sc.warmup_lines, "top_tokens": max(sc.top_tokens, 1)},
        "lines_per_record": args.lines_per_record,
        "total_s": 0.0,
    }
    report = ar.build_report(log_path, labelled, ar.baseline_scores(lines, lm.tokenizer), passes, meta,
                             sc.warmup_lines)
    report["total_s"] = round(time.perf_counter() - started, 1)
    return report


def markdown(report: dict[str, Any]) -> str:
    """The ranking tables (all lines, after warm-up, incident onsets), flag counts and cost, as Markdown."""
    warmup = report["score"]["warmup_lines"]
    titles = {
        "all": "all lines",
        "after_warmup": f"lines after warm-up (line_no >= {warmup})",
        "onsets": "incident onsets (first line of each run of anomalous lines vs all normal lines)",
    }
    out: list[str] = []
    for subset in ar.SUBSETS:
        rows = [r for r in report["metrics"] if r["subset"] == subset]
        if not rows:
            continue
        ks = list(rows[0]["p_at"])
        out.append(f"\n**Ranking, {titles[subset]}: {rows[0]['lines']} lines, {rows[0]['anomalies']} anomalous**\n")
        out.append(markdown_table(
            ["ranker", "normalize", "ROC-AUC", "AP", *(f"P@{k}" for k in ks)],
            [[ar.RANKER_TITLES[r["ranker"]], r["normalize"], r["auc"], r["ap"], *(r["p_at"][k] for k in ks)]
             for r in rows],
            digits=3))
    out.append(f"\n**Service flag (z > {report['score']['anomaly_z']}, after {warmup} warm-up lines)**\n")
    flag_rows = []
    for norm, p in report["passes"].items():
        f = p["flags"]
        flag_rows.append([norm, f["flagged"], f["tp"], f["fp"], f["fn"], f["tn"], f["precision"], f["recall"],
                          p["tokens"], cell(p["elapsed_s"], 0), cell(p["tokens_per_s"], 1)])
    out.append(markdown_table(
        ["normalize", "flagged", "TP", "FP", "FN", "TN", "precision", "recall", "tokens", "time (s)", "tokens/s"],
        flag_rows, digits=3))
    return "\n".join(out) + "\n"


def save_png(report: dict[str, Any], path: Path) -> Path:
    """ROC curves on all lines, one panel per normalisation setting, then mean NLL along the stream."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; imported only when drawing
    import matplotlib.pyplot as plt

    labels = report["columns"]["label"]
    auc = {(r["ranker"], r["normalize"]): r["auc"] for r in report["metrics"] if r["subset"] == "all"}
    passes = report["passes"]
    fig, axes = plt.subplots(1, len(passes) + 1, figsize=(5.2 * (len(passes) + 1), 4.0), squeeze=False)
    try:
        for ax, (norm, p) in zip(axes[0], passes.items()):
            for name in (*ar.BASELINES, *ar.LM_RANKERS):
                key = (name, "-") if name in ar.BASELINES else (name, norm)
                scores = report["columns"][name] if name in ar.BASELINES else p["columns"][name]
                fpr, tpr = ar.roc_curve(scores, labels)
                style = "--" if name in ar.BASELINES else "-"
                ax.plot(fpr, tpr, style, linewidth=1.3, label=f"{ar.RANKER_TITLES[name]} ({auc[key]:.2f})")
            ax.plot([0, 1], [0, 1], ":", color="grey", linewidth=0.9, label="chance (0.50)")
            ax.set(title=f"ROC, normalize {norm}", xlabel="false positive rate", ylabel="true positive rate")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        _draw_stream(axes[0][-1], report)
        fig.suptitle(f"{Path(report['log']).name}: {report['lines']} lines, {report['anomalies']} anomalous; "
                     f"{report['model']['name']}, sinks {report['cache']['sinks']} + window "
                     f"{report['cache']['window']}", fontsize=10)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=80)
    finally:
        plt.close(fig)
    return path


def _draw_stream(ax: Any, report: dict[str, Any]) -> None:
    """Mean NLL of every line against its position (last pass), normal lines grey, anomalies red."""
    norm, p = list(report["passes"].items())[-1]
    labels = report["columns"]["label"]
    mean = p["columns"]["mean_nll"]
    groups = {
        "normal": ([i for i, y in enumerate(labels) if not y], dict(s=3, color="0.6")),
        "anomaly, run onset": ([i for i, y in enumerate(labels) if y and (i == 0 or not labels[i - 1])],
                               dict(s=22, color="C3", marker="^")),
        "anomaly, repeat in run": ([i for i, y in enumerate(labels) if y and i > 0 and labels[i - 1]],
                                   dict(s=6, color="C1")),
    }
    for label, (idx, style) in groups.items():
        pts = [(i, mean[i]) for i in idx if mean[i] is not None]
        ax.scatter([x for x, _ in pts], [y for _, y in pts], label=f"{label} ({len(idx)})", **style)
    ax.set(title=f"mean NLL per line, normalize {norm}", xlabel="line", ylabel="mean NLL (nats/token)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
