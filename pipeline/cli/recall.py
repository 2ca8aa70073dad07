"""`sinkstream eval recall`: what the sink cache remembers (pipeline/evaluation/recall.py), as JSON + MD + PNG.

Registered as an experiment of `sinkstream eval`; uses its --sinks, --window, --chunk, --model, --out options
and adds its own below. Writes `<out>/eval_recall.json` (every question and the summaries), `.md` (the
table by distance) and `.png` (accuracy and log p against distance in tokens).
"""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from pipeline.cli.common import int_list, load_model_for_cli, non_negative_int, positive_int
from pipeline.errors import UserError
from pipeline.evaluation import recall as rc
from pipeline.evaluation.plots import Panel, save_figure
from pipeline.evaluation.tables import markdown_table


def add_options(p: argparse.ArgumentParser) -> None:
    """The recall task's own options on the `eval` parser."""
    g = p.add_argument_group("recall")
    g.add_argument("--queries", type=positive_int, default=10, help="recall: question points (default 10)")
    g.add_argument("--every", type=positive_int, default=4, help="recall: lines between question points (default 4)")
    g.add_argument("--distances", type=int_list, default=None,
                   help="recall: line distances asked at every point (default: 0.05 W .. 2.5 W in tokens)")
    g.add_argument("--distractors", type=non_negative_int, default=4,
                   help="recall: other lines' numbers ranked against the true one (default 4, chance 1/5)")
    g.add_argument("--recall-prompt", choices=["chat", "cue"], default="chat",
                   help="recall: question in the chat template (default) or the line's own prefix")
    g.add_argument("--policies", default=",".join(rc.POLICIES), help=f"recall: subset of {','.join(rc.POLICIES)}")
    g.add_argument("--seed", type=int, default=0, help="recall: seed of the numbers and distractors (default 0)")


def table(report: rc.RecallReport) -> str:
    """Markdown: accuracy / choice accuracy / mean log p per line distance, one column group per policy."""
    rows = []
    for d in report.distances:
        cells = []
        tokens = None
        for p in report.policies:
            row = next((r for r in p.by_distance if r.d_lines == d), None)
            if row is None:
                cells.append("-")
                continue
            tokens = tokens or row.mean_d_tokens
            cells.append(f"{row.accuracy:.2f} / {row.choice_accuracy:.2f} / {row.mean_logprob:.1f}")
        rows.append([d, "-" if tokens is None else f"{tokens:.0f}", *cells])
    by_distance = markdown_table(
        ["d (lines)", "d (tokens)", *(f"{p.label}: exact / choice / log p" for p in report.policies)], rows)
    w = report.window
    names = {"inside": f"inside [0, {int(rc.EDGE_FRACTION * w)})", "edge": f"edge [{int(rc.EDGE_FRACTION * w)}, {w})",
             "evicted": f"evicted [{w}, ...)"}
    region_rows = []
    for region in rc.REGIONS:
        cells = []
        for p in report.policies:
            b = p.by_region[region]
            cells.append(
                "-" if not b.n else f"{b.accuracy:.2f} / {b.choice_accuracy:.2f} / {b.mean_logprob:.1f} (n={b.n})"
            )
        region_rows.append([names[region], *cells])
    by_region = markdown_table(["region (tokens)", *(p.label for p in report.policies)], region_rows)
    return by_distance + "\n\n" + by_region


def panels(report: rc.RecallReport) -> list[Panel]:
    """Choice accuracy, greedy exact match and mean log p(true number) against distance in tokens."""
    w, s = report.window, report.sinks
    vlines = {f"window edge W={w}": w, f"window-only edge {s + w}": s + w} if s else {f"window edge W={w}": w}
    colors = {p.label: f"C{k}" for k, p in enumerate(report.policies)}

    def series(field: str) -> dict[str, tuple]:
        return {p.label: ([r.mean_d_tokens for r in p.by_distance], [getattr(r, field) for r in p.by_distance])
                for p in report.policies}

    xlabel = "distance to the number (tokens)"
    return [
        Panel(
            f"true number ranked first of {report.distractors + 1}",
            xlabel,
            "choice accuracy",
            series("choice_accuracy"),
            vlines=vlines,
            hlines={f"chance {report.chance_choice:.2f}": report.chance_choice},
            colors=colors,
        ),
        Panel(
            "greedy answer = true number",
            xlabel,
            "exact-match accuracy",
            series("accuracy"),
            vlines=vlines,
            colors=colors,
        ),
        Panel(
            "log p(true number)",
            xlabel,
            "mean log p (nats)",
            series("mean_logprob"),
            vlines=vlines,
            hlines={"5 random digits -11.5": -11.5},
            colors=colors,
        ),
    ]


def title_of(report: rc.RecallReport) -> str:
    return (f"sinkstream eval recall: {report.model}, S={report.sinks} W={report.window}, {report.lines} lines "
            f"({report.stream_tokens} tokens), prompt {report.prompt}, {report.every}-line steps")


def run(args: argparse.Namespace) -> int:
    policies = [p for p in args.policies.split(",") if p]
    unknown = [p for p in policies if p not in rc.POLICIES]
    if unknown or not policies:
        raise UserError(
            f"--policies: expected a comma-separated subset of {','.join(rc.POLICIES)}, got {args.policies!r}"
        )
    lm = load_model_for_cli(args.model, device=args.device, dtype=args.dtype, threads=args.threads)
    lines, distances, warmup = rc.plan(lm, args.window, args.queries, args.every, args.distances, args.seed)
    total = len(policies) * sum(sum(d <= warmup + q * args.every for d in distances) for q in range(args.queries))
    with tqdm(total=total, desc="recall questions", unit="q", file=sys.stderr) as bar:
        report = rc.recall_experiment(
            lm, args.model, sinks=args.sinks, window=args.window, chunk=args.chunk, queries=args.queries,
            every=args.every, distances=args.distances, prompt=args.recall_prompt, distractors=args.distractors,
            policies=policies, seed=args.seed, progress=bar.update,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / "eval_recall"
    stem.with_suffix(".json").write_text(report.model_dump_json(indent=1))
    md = table(report)
    stem.with_suffix(".md").write_text(md + "\n")
    title = title_of(report)
    save_figure(stem.with_suffix(".png"), panels(report), title)
    sys.stdout.write(f"\n## {title}\n\nexact / choice (1 of {report.distractors + 1}) / mean log p\n\n{md}\n")
    sys.stdout.write(f"wrote {stem}.json, .md, .png\n")
    return 0
