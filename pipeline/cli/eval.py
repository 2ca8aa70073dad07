"""`sinkstream eval`: perplexity over length and the paper's ablations on a long real text.

Writes `<out>/eval_<experiment>.json` (summaries, per-segment perplexity, comparisons), `.md` (the table) and
`.png` (the plot) per experiment, prints the tables to stdout and progress bars to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from model.tokens import encode_text
from pipeline.cli import eval_anomaly
from pipeline.cli import recall as recall_command
from pipeline.cli.common import (
    add_model_options,
    int_list,
    load_model_for_cli,
    non_negative_int,
    non_negative_int_list,
    positive_int,
)
from pipeline.evaluation import perplexity as ev
from pipeline.evaluation.plots import Panel, save_figure
from pipeline.settings import sinkstream_home

EXPERIMENTS = ("length", "sinks", "cache")
# Default and --quick token caps per experiment (0 = the whole text).
MAX_TOKENS = {"length": 32768, "sinks": 16384, "cache": 16384}
QUICK_TOKENS = {"length": 8192, "sinks": 4096, "cache": 4096}
# Tokens the recompute baseline forwards in total when --stride is left at 0 (about 6 min on one core).
RECOMPUTE_BUDGET = 100_000


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity over length (paper Table 1 / Fig. 3) and the sinks / cache-size ablations",
        description=(
            "length: dense (within the model's positions), window 0+(S+W), StreamingLLM S+W, StreamingLLM with S "
            "newline sinks, and sliding window with re-computation over S+W tokens (every --stride-th target). "
            "sinks: S+(C-S) for S in --sink-counts (paper Table 2). cache: 4+(C-4) for C in --cache-sizes "
            "(paper Table 6). Writes eval_<experiment>.json/.md/.png under --out."
        ),
    )
    p.add_argument("experiment", nargs="?", choices=[*EXPERIMENTS, "all", "recall", "anomaly"], default="length")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", type=Path, help="UTF-8 text file (default: Canterbury plrabn12.txt, Paradise Lost)")
    src.add_argument("--ids", type=Path, help="JSON list of token ids instead of a text")
    p.add_argument(
        "--max-tokens", type=non_negative_int, default=None, help=f"cap the text (0 = all; default {MAX_TOKENS})"
    )
    p.add_argument("--sinks", type=non_negative_int, default=4, help="length: attention sinks S (default 4)")
    p.add_argument(
        "--window", type=positive_int, default=1020, help="length: recent tokens W of StreamingLLM (default 1020)"
    )
    p.add_argument(
        "--chunk",
        type=positive_int,
        default=256,
        help="tokens per forward pass of the streaming policies (default 256)",
    )
    p.add_argument(
        "--stride",
        type=non_negative_int,
        default=0,
        help="recompute every k-th target (default 0: auto from --recompute-budget)",
    )
    p.add_argument(
        "--recompute-budget",
        type=positive_int,
        default=RECOMPUTE_BUDGET,
        help=f"auto stride: tokens re-computed in total (default {RECOMPUTE_BUDGET})",
    )
    p.add_argument("--runs", default=",".join(ev.RUNS), help=f"length: comma-separated subset of {','.join(ev.RUNS)}")
    p.add_argument("--segment", type=positive_int, default=512, help="tokens per perplexity segment (default 512)")
    p.add_argument(
        "--cache", type=positive_int, default=2048, help="sinks: total cache size C (default 2048, as in Table 2)"
    )
    p.add_argument(
        "--sink-counts",
        type=non_negative_int_list,
        default=[0, 1, 2, 4, 8],
        help="sinks: sink counts (default 0,1,2,4,8)",
    )
    p.add_argument(
        "--cache-sizes", type=int_list, default=[256, 512, 1024, 2048], help="cache: sizes (default 256,512,1024,2048)"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"small preset: tokens {QUICK_TOKENS}, recompute budget 25000, sinks cache 1024",
    )
    add_model_options(p)
    p.add_argument("--out", type=Path, default=Path("out/eval"), help="output folder (default out/eval)")
    recall_command.add_options(p)
    eval_anomaly.add_options(p)
    p.set_defaults(func=run)


def read_ids(args: argparse.Namespace, tokenizer: Any) -> tuple[list[int], str]:
    """Token ids of --ids or --text (default Paradise Lost) and a short name for the source."""
    if args.ids is not None:
        ids = json.loads(args.ids.read_text())
        if not isinstance(ids, list) or not all(isinstance(x, int) for x in ids):
            raise SystemExit(f"--ids {args.ids}: expected a JSON list of integers, got {type(ids).__name__}")
        return ids, args.ids.name
    path = args.text
    if path is None:
        from pipeline.evaluation.datasets import canterbury

        path = canterbury(sinkstream_home()) / "plrabn12.txt"
    if tokenizer is None:
        raise SystemExit(f"--text {path}: the model has no tokenizer; pass --ids instead")
    text = path.read_text(encoding="utf-8", errors="replace")
    return encode_text(tokenizer, text), path.name


def _cap(ids: list[int], args: argparse.Namespace, experiment: str) -> list[int]:
    limit = args.max_tokens if args.max_tokens is not None else (QUICK_TOKENS if args.quick else MAX_TOKENS)[experiment]
    return ids[:limit] if limit else ids


def _curves(result: dict[str, Any], key_names: dict[str, str]) -> dict[str, tuple]:
    """Per-segment log-perplexity curves (x = segment end, y = mean NLL) of the named runs."""
    curves = {}
    for key, label in key_names.items():
        segs = result["segments"][key]
        curves[label] = ([s["end"] for s in segs], [s["mean_nll"] for s in segs])
    return curves


def _matched_curves(result: dict[str, Any], points: int = 12) -> tuple[dict[str, tuple], int]:
    """Recompute and the streaming runs on recompute's own (strided) targets, in `points` equal-count groups.

    Returns the curves (x = last target of a group, y = mean NLL of the group) and the group size.
    """
    nll = result["nll"]
    targets = nll[ev.RECOMPUTE]["indices"]
    per = max(1, math.ceil(len(targets) / points))
    curves = {}
    for name in (ev.RECOMPUTE, ev.SINK, ev.WINDOW):
        if name not in nll:
            continue
        by_index = dict(zip(nll[name]["indices"], nll[name]["nlls"]))
        groups = [targets[k : k + per] for k in range(0, len(targets), per)]
        label = next(r["label"] for r in result["runs"] if r["name"] == name)
        curves[label] = ([g[-1] for g in groups], [ev.mean([by_index[i] for i in g]) for g in groups])
    return curves, per


def length_panels(result: dict[str, Any]) -> list[Panel]:
    """Figure 3: per-segment log PPL of the streaming runs; recompute vs the others on recompute's targets."""
    segment = result["segment"]
    streaming = {r["name"]: r["label"] for r in result["runs"] if r["name"] != ev.RECOMPUTE}
    vlines = {f"cache {result['cache']}": result["cache"]}
    if result["model_positions"] and result["model_positions"] < result["tokens"]:
        vlines[f"model positions {result['model_positions']}"] = result["model_positions"]
    colors = {r["label"]: f"C{ev.RUNS.index(r['name'])}" for r in result["runs"]}
    panels = [Panel(f"log perplexity per {segment} tokens", "tokens", "log PPL (mean NLL, nats)",
                    _curves(result, streaming), vlines=vlines, markers=False, colors=colors)]
    if ev.RECOMPUTE in result["nll"]:
        # A strided run has few targets per segment: compare it with the others on its own targets, in groups.
        curves, per = _matched_curves(result)
        panels.append(Panel(f"on recompute's targets (every {ev.ordinal(result['stride'])}), {per} per point", "tokens",
                            "log PPL (mean NLL, nats)", curves, vlines=vlines, colors=colors))
    return panels


def _segments_panel(result: dict[str, Any]) -> Panel:
    """An ablation's per-segment log PPL, one line per cache config."""
    configs = [r["config"] for r in result["runs"]]
    return Panel(
        f"log perplexity per {result['segment']} tokens",
        "tokens",
        "log PPL",
        _curves(result, {c: c for c in configs}),
        markers=False,
    )


def sinks_panels(result: dict[str, Any], label: str) -> list[Panel]:
    """Table 2 as a plot: per-segment log PPL per sink count, and perplexity vs sink count."""
    configs = [r["config"] for r in result["runs"]]
    ppl = [r["perplexity"] for r in result["runs"]]
    return [
        _segments_panel(result),
        Panel(
            f"cache {result['cache']}: perplexity vs sinks",
            "sinks+recent",
            "perplexity",
            {label: (list(range(len(ppl))), ppl)},
            xticks=configs,
        ),
    ]


def cache_panels(result: dict[str, Any], label: str) -> list[Panel]:
    """Table 6 as a plot: per-segment log PPL per cache size, and perplexity vs cache size."""
    ppl = [r["perplexity"] for r in result["runs"]]
    return [
        _segments_panel(result),
        Panel(
            "perplexity vs cache size", "cache size (tokens)", "perplexity", {label: (result["sizes"], ppl)}, logx=True
        ),
    ]


def _length(lm, ids, args, label: str) -> tuple[dict, list[Panel]]:
    runs = [r for r in args.runs.split(",") if r]
    budget = 25_000 if args.quick and args.recompute_budget == RECOMPUTE_BUDGET else args.recompute_budget
    result = ev.length_experiment(lm, ids, args.sinks, args.window, args.chunk, args.stride, args.segment, runs, budget)
    return result, length_panels(result)


def _sinks(lm, ids, args, label: str) -> tuple[dict, list[Panel]]:
    cache = 1024 if args.quick and args.cache == 2048 else args.cache
    result = ev.sinks_ablation(lm, ids, cache, args.sink_counts, args.chunk, args.segment, label)
    return result, sinks_panels(result, label)


def _cache(lm, ids, args, label: str) -> tuple[dict, list[Panel]]:
    result = ev.cache_ablation(lm, ids, args.cache_sizes, args.sinks, args.chunk, args.segment, label)
    return result, cache_panels(result, label)


def run(args: argparse.Namespace) -> int:
    if args.experiment == "recall":
        return recall_command.run(args)
    if args.experiment == "anomaly":
        return eval_anomaly.run(args)
    lm = load_model_for_cli(args.model, device=args.device, dtype=args.dtype, threads=args.threads)
    all_ids, source = read_ids(args, lm.tokenizer)
    experiments = EXPERIMENTS if args.experiment == "all" else (args.experiment,)
    args.out.mkdir(parents=True, exist_ok=True)
    from pipeline.bench.common import machine

    for name in experiments:
        ids = _cap(all_ids, args, name)
        label = f"{Path(args.model).name} on {source}"
        result, panels = {"length": _length, "sinks": _sinks, "cache": _cache}[name](lm, ids, args, label)
        result.update(model=args.model, text=source, text_tokens=len(all_ids), quick=args.quick, machine=machine(lm))
        stem = args.out / f"eval_{name}"
        nll = result.pop("nll", None)
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
        if nll is not None:  # per-token NLLs for later analysis, kept out of the summary file
            (args.out / f"eval_{name}_nll.json").write_text(json.dumps(nll))
        stem.with_suffix(".md").write_text(result["table"] + "\n")
        save_figure(stem.with_suffix(".png"), panels, f"sinkstream eval {name}: {label}, {len(ids)} tokens")
        sys.stdout.write(f"\n## eval {name}: {label}, {len(ids)} tokens\n\n{result['table']}\n")
        for key, value in result.get("comparisons", {}).items():
            sys.stdout.write(f"{key}: {value:.4f}\n")
        for r in result["runs"]:
            sys.stdout.write(f"{r['label']}: {r['targets']} targets, ppl {r['perplexity']:.3f}, "
                             f"{r['ms_per_token']:.2f} ms/token\n")
        sys.stdout.write(f"wrote {stem}.json, .md, .png\n")
    return 0
