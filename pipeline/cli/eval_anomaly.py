"""`sinkstream eval anomaly`: sessions (HDFS), lines (BGL_2k) and documents (Canterbury) through the service.

Writes `<out>/eval_anomaly.json` (every metric, sizes, timings), `.md` (the tables) and `.png` (per-key ROC
curves on HDFS, per-line on BGL); the tables also go to stdout. See pipeline/evaluation/anomaly_eval.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.cli.common import load_model_for_cli, positive_int
from pipeline.errors import UserError
from pipeline.evaluation.tables import markdown_table
from pipeline.settings import Settings, load_settings, sinkstream_home

PARTS = ("hdfs", "bgl", "docs")


def add_options(p: argparse.ArgumentParser) -> None:
    """The anomaly evaluation's own options on the `eval` parser."""
    g = p.add_argument_group("anomaly")
    g.add_argument("--parts", default=",".join(PARTS), help=f"anomaly: comma-separated subset of {','.join(PARTS)}")
    g.add_argument("--data-dir", type=Path, default=None,
                   help="anomaly: local copy of ait-aecid/anomaly-detection-log-datasets (default: download the "
                        "three HDFS files into $SINKSTREAM_HOME/data/ait-hdfs)")
    g.add_argument("--sessions", default="1000,200",
                   help="anomaly: HDFS test size NORMAL,ABNORMAL (default 1000,200; a fixed seeded sample)")
    g.add_argument("--reference-sessions", type=positive_int, default=1000,
                   help="anomaly: HDFS reference = the first N normal sessions (default 1000)")
    g.add_argument("--detectors-only", action="store_true",
                   help="anomaly: HDFS detectors of evaluate.py only (no model, no service run)")
    g.add_argument("--concurrent", type=positive_int, default=30,
                   help="anomaly: HDFS blocks logging at the same time (default 30)")
    g.add_argument("--bgl-log", type=Path, default=None, help="anomaly: BGL_2k.log (default: the Loghub folder)")
    g.add_argument("--adapt-steps", type=int, default=100,
                   help="anomaly: LoRA steps on the BGL reference for the adapted pass (0 = no adapted pass)")
    g.add_argument("--bgl-adapter", type=Path, default=None,
                   help="anomaly: an adapter already trained on the BGL reference (sinkstream adapt) instead")
    g.add_argument("--bgl-test-lines", type=positive_int, default=1000,
                   help="anomaly: BGL test = the last N lines (default 1000: the second half); the reference is "
                        "always the first half")
    g.add_argument("--bgl-passes", default="generic,unsupervised,adapted",
                   help="anomaly: BGL passes, a subset of generic (semi-supervised reference), unsupervised "
                        "(reference keeps its alerts), adapted (LoRA on the reference); default all three. The "
                        "template memory without the LM (semi-supervised) always runs too: it needs no model")
    g.add_argument("--docs", type=positive_int, default=24, help="anomaly: documents in the document stream")
    g.add_argument("--doc-lines", type=positive_int, default=30, help="anomaly: lines per document (default 30)")
    g.add_argument("--config", type=Path, default=None, help="anomaly: settings YAML (model, cache, score)")
    g.add_argument("--from-report", type=Path, default=None,
                   help="anomaly: re-render the tables and the PNG of a saved eval_anomaly.json (no model)")


def _sessions(text: str) -> tuple[int, int]:
    try:
        normal, abnormal = (int(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"--sessions: expected NORMAL,ABNORMAL (two integers), got {text!r}") from None
    if normal < 1 or abnormal < 1:
        raise UserError(f"--sessions: expected two integers >= 1, got {text!r}")
    return normal, abnormal


def run(args: argparse.Namespace) -> int:
    if args.from_report is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        return _write(json.loads(args.from_report.read_text()), args.out / "eval_anomaly")
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    if not parts or any(x not in PARTS for x in parts):
        raise UserError(f"--parts: expected a comma-separated subset of {','.join(PARTS)}, got {args.parts!r}")
    normal, abnormal = _sessions(args.sessions)
    base = load_settings(args.config, model={"name": args.model, "threads": args.threads, "device": args.device,
                                             "dtype": args.dtype})
    started = time.perf_counter()
    need_lm = any(x != "hdfs" for x in parts) or not args.detectors_only
    lm = load_model_for_cli(args.model, device=args.device, dtype=args.dtype, threads=args.threads) if need_lm else None
    from pipeline.bench.common import machine

    report: dict[str, Any] = {"model": args.model, "machine": machine(lm) if lm is not None else machine()}
    if "hdfs" in parts:
        report["hdfs"] = _hdfs(args, None if args.detectors_only else lm, base, normal, abnormal)
    if "bgl" in parts:
        assert lm is not None
        report["bgl"] = _bgl(args, lm, base)
    if "docs" in parts:
        assert lm is not None
        report["docs"] = _docs(args, lm, base)
    report["total_s"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    return _write(report, args.out / "eval_anomaly")


def _write(report: dict[str, Any], stem: Path) -> int:
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    stem.with_suffix(".md").write_text(text)
    save_png(report, stem.with_suffix(".png"))
    sys.stdout.write(text + f"\nwrote {stem}.json, .md, .png\n")
    return 0


def _bars(report: dict[str, Any]) -> list[tuple[str, list[tuple[str, float, float]]]]:
    """(panel title, [(ranker, ROC-AUC, best F1)]) per part of the report."""
    panels = []
    if "hdfs" in report:
        h = report["hdfs"]
        rows = [(k, m["auc"], m["best_f1"]) for k, m in h["detectors"].items()]
        rows += [(f"templates: {k}", m["auc"], m["best_f1"]) for k, m in h.get("templates_only", {}).items()]
        rows += [(f"service: {k}", m["auc"], m["best_f1"]) for k, m in h.get("service", {}).items()]
        panels.append((f"HDFS sessions ({h['test_sessions']} keys, {h['test_abnormal']} abnormal)", rows))
    if "bgl" in report:
        b = report["bgl"]
        rows = [(r["ranker"] if r["pass"] == "-" else f"{r['ranker']} [{r['pass']}]", r["auc"], r["best_f1"])
                for r in b["rows"] if r["subset"] == "all"]
        panels.append((f"BGL_2k test half ({b['test_lines']} lines, {b['test_alerts']} alerts)", rows))
    if "docs" in report:
        d = report["docs"]
        rows = [(k, m["auc"], m["best_f1"]) for k, m in d["metrics"].items()]
        panels.append((f"document boundaries ({d['documents']} documents)", rows))
    return panels


def save_png(report: dict[str, Any], path: Path) -> Path:
    """Horizontal bars of ROC-AUC and best F1 per ranker, one panel per part."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _bars(report)
    if not panels:
        return path
    heights = [max(1.6, 0.32 * len(rows) + 0.9) for _, rows in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10.5, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    try:
        for ax, (title, rows) in zip(axes[:, 0], panels):
            y = list(range(len(rows)))
            ax.barh([v - 0.2 for v in y], [r[1] for r in rows], height=0.4, label="ROC-AUC")
            ax.barh([v + 0.2 for v in y], [r[2] for r in rows], height=0.4, label="best F1")
            ax.set_yticks(y, [r[0][:70] for r in rows], fontsize=7)
            ax.invert_yaxis()
            ax.set_xlim(0, 1)
            ax.axvline(0.5, color="grey", linewidth=0.8, linestyle=":")
            ax.set_title(title, fontsize=9)
            ax.grid(True, axis="x", alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=80)
    finally:
        plt.close(fig)
    return path


def _hdfs(args: argparse.Namespace, lm: Any, base: Settings, normal: int, abnormal: int) -> dict[str, Any]:
    from pipeline.evaluation import anomaly_eval as ae
    from pipeline.evaluation import hdfs

    files = hdfs.fetch_hdfs(sinkstream_home(), args.data_dir)
    renderer = hdfs.Renderer(hdfs.read_templates(files["templates"]), seed=0)
    split = hdfs.split(hdfs.read_sessions(files["train"]), hdfs.read_sessions(files["abnormal"]), renderer,
                       reference=args.reference_sessions, normal=normal, anomalous=abnormal, seed=0)
    return ae.hdfs_eval(lm, base, split, renderer, concurrent=args.concurrent)


def _bgl(args: argparse.Namespace, lm: Any, base: Settings) -> dict[str, Any]:
    from pipeline.evaluation import anomaly_eval as ae
    from pipeline.evaluation.datasets import bgl_labels, loghub_dir

    path = args.bgl_log or loghub_dir() / "BGL_2k.log"
    labelled = bgl_labels(path)
    half = len(labelled) // 2
    reference_all = [t for t, _ in labelled[:half]]
    reference_semi = [t for t, y in labelled[:half] if not y]
    first = max(half, len(labelled) - args.bgl_test_lines)
    test = [t for t, _ in labelled[first:]]
    labels = [y for _, y in labelled[first:]]
    # the template memory alone first: no model, so it also shows what the LM adds
    passes: dict[str, list[dict[str, Any]]] = {
        "template memory, no LM, semi-supervised reference": ae.bgl_templates_only(base, reference_semi, test)}
    timing: dict[str, Any] = {}
    chosen = {x.strip() for x in args.bgl_passes.split(",") if x.strip()}
    if not chosen or chosen - {"generic", "unsupervised", "adapted"}:
        raise UserError(f"--bgl-passes: expected a subset of generic,unsupervised,adapted, got {args.bgl_passes!r}")
    if "generic" in chosen:
        got, s, tok = ae.bgl_pass(lm, base, reference_semi, test)
        passes["generic LM, semi-supervised reference"] = got
        timing["generic semi"] = {"s": round(s, 1), "tokens": tok}
    if "unsupervised" in chosen:
        got, s, tok = ae.bgl_pass(lm, base, reference_all, test)
        passes["generic LM, unsupervised reference"] = got
        timing["generic unsup"] = {"s": round(s, 1), "tokens": tok}
    adapt: dict[str, Any] | None = None
    if "adapted" in chosen and (args.adapt_steps > 0 or args.bgl_adapter is not None):
        from model.loader import merge_adapter
        from pipeline.training.adapt import AdaptConfig, train_adapter

        out = args.bgl_adapter or args.out / "bgl_adapter"
        fresh = load_model_for_cli(args.model, device=args.device, dtype=args.dtype, threads=args.threads)
        if args.bgl_adapter is None:
            adapt = train_adapter(fresh, reference_semi, AdaptConfig(steps=args.adapt_steps), out)
        else:
            adapt = json.loads((out / "adapt.json").read_text()) if (out / "adapt.json").is_file() else None
        adapted = merge_adapter(fresh, out)
        got, s, tok = ae.bgl_pass(adapted, base, reference_semi, test)
        passes["adapted LM, semi-supervised reference"] = got
        timing["adapted semi"] = {"s": round(s, 1), "tokens": tok}
    rows = ae.bgl_metrics(test, labels, passes)
    return {"log": str(path), "reference_lines": {"semi": len(reference_semi), "unsup": len(reference_all)},
            "test_lines": len(test), "test_alerts": sum(labels), "rows": rows, "timing": timing, "adapt": adapt}


def _docs(args: argparse.Namespace, lm: Any, base: Settings) -> dict[str, Any]:
    from pipeline.evaluation import anomaly_eval as ae
    from pipeline.evaluation.datasets import CANTERBURY_FILES, canterbury

    folder = canterbury(sinkstream_home())
    texts = {name: (folder / name).read_text(encoding="utf-8", errors="replace") for name in CANTERBURY_FILES}
    docs = ae.documents(texts, args.docs, args.doc_lines)
    settings = ae.eval_settings(base, None)
    records = [("docs", "".join(line + "\n" for line, _ in docs[i:i + 10])) for i in range(0, len(docs), 10)]
    published, elapsed = ae.run_service(lm, settings, records)
    lines = ae.scored_lines(published)["docs"]
    return {"documents": args.docs, "lines": len(docs), "seconds": round(elapsed, 1),
            "metrics": ae.boundary_metrics(lines, [d for _, d in docs])}


def _row(name: str, m: dict[str, Any]) -> list[Any]:
    return [name, m["auc"], m["ap"], m["best_f1"], m.get("f1_at_flags"), m.get("flagged")]


def markdown(report: dict[str, Any]) -> str:
    out: list[str] = []
    head = ["ranker", "ROC-AUC", "AP", "best F1", "F1 at flags", "flagged"]
    if "hdfs" in report:
        h = report["hdfs"]
        out.append(f"\n**HDFS sessions**: reference {h['reference_sessions']} normal sessions, test "
                   f"{h['test_sessions']} ({h['test_abnormal']} abnormal), {h['test_lines']} lines\n")
        rows = [_row(f"{k} (event ids)", m) for k, m in h["detectors"].items()]
        rows += [_row(f"template memory, no LM: {k}", m) for k, m in h.get("templates_only", {}).items()]
        rows += [_row(f"sinkstream service: {k}", m) for k, m in h.get("service", {}).items()]
        out.append(markdown_table(head, rows, digits=3))
        if "service" in h:
            out.append(f"\nservice: {h['tokens']} tokens in {h['service_s']} s ({h['tokens_per_s']} tokens/s), "
                       f"{h['line_alerts']} line alerts\n")
    if "bgl" in report:
        b = report["bgl"]
        for subset in ("all", "onsets"):
            rows = [[r["pass"], r["ranker"], r["auc"], r["ap"], r["best_f1"], r.get("f1_at_flags"), r.get("flagged")]
                    for r in b["rows"] if r["subset"] == subset]
            first = next(r for r in b["rows"] if r["subset"] == subset)
            out.append(f"\n**BGL_2k test half, {subset}: {first['n']} lines, {first['positives']} alerts**\n")
            out.append(markdown_table(["pass", *head[:-1], "flagged"], rows, digits=3))
        if b.get("adapt"):
            a = b["adapt"]
            out.append(f"\nadapter: held-out loss {a['held_out_loss_before']} -> {a['held_out_loss_after']} "
                       f"nats/token, {a['config']['steps']} steps, {a['train_s']} s, "
                       f"fingerprint {a['adapter_fingerprint']}\n")
    if "docs" in report:
        d = report["docs"]
        out.append(f"\n**Document boundaries**: {d['documents']} documents, {d['lines']} lines (first 3 lines after "
                   "each boundary vs the rest)\n")
        out.append(markdown_table(head[:4], [[k, m["auc"], m["ap"], m["best_f1"]] for k, m in d["metrics"].items()],
                                  digits=3))
    return "\n".join(out) + "\n"
