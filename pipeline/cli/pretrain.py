"""`sinkstream pretrain`: train a vanilla and a sink-token causal LM from scratch, then evaluate both through
sinkstream's sink cache (Xiao et al. 2023, section 3.3 and Table 3, scaled down to this CPU; issue 13)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.cli.common import non_negative_int, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="pre-train a vanilla and a sink-token LM from scratch and compare them under streaming",
        description=(
            "Train two small Llama-style causal LMs with the same data, budget and initial weights: 'vanilla', "
            "and 'sink' with a dedicated learnable sink token prepended to every training sample. Data: the "
            "Canterbury corpus texts and the Loghub logs, last 10%% of every file held out; tokenizer: a small "
            "byte-level BPE saved with the run. Checkpoints (safetensors: model, AdamW state, step) let --resume "
            "continue a run. Then both models stream held-out text through sinkstream's SinkCache with "
            "(sinks, window) = (0, W), (1, W-1), (2, W-2), (4, W-4) and dense, and the attention share on the "
            "first tokens is measured per layer. Writes results.json, table.md and PNG plots into --out."
        ),
    )
    p.add_argument("--out", type=Path, required=True, help="run folder (created; holds checkpoints and results)")
    p.add_argument("--quick", action="store_true",
                   help="tiny model, few steps, small data slice: a 1-3 minute test of the harness")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoints")
    p.add_argument("--steps", type=positive_int, default=None, help="optimiser steps per model (default: the preset's)")
    p.add_argument("--stop-after", type=positive_int, default=None,
                   help="stop training at this step (checkpointed) without evaluating; continue with --resume")
    p.add_argument("--batch-size", type=positive_int, default=None, help="samples per step (default: the preset's)")
    p.add_argument("--eval-tokens", type=positive_int, default=None, help="tokens per held-out evaluation stream")
    p.add_argument("--eval-cache", type=positive_int, default=None, help="cache size W = sinks + window for evaluation")
    p.add_argument("--variants", default="vanilla,sink", help="comma-separated subset of vanilla,sink")
    p.add_argument("--threads", type=non_negative_int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from pipeline.training.config import FULL, QUICK, VARIANTS
    from pipeline.training.loop import run_study

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    if not variants or any(v not in VARIANTS for v in variants):
        sys.stderr.write(
            f"sinkstream pretrain: error: --variants expected a subset of {','.join(VARIANTS)}, got {args.variants!r}\n"
        )
        return 2
    config = QUICK if args.quick else FULL
    update = {k: v for k, v in {"steps": args.steps, "batch_size": args.batch_size, "eval_tokens": args.eval_tokens,
                                 "eval_cache": args.eval_cache}.items() if v is not None}
    config = config.model_copy(update=update)
    if max(config.eval_sinks) >= config.eval_cache:
        sys.stderr.write(
            f"sinkstream pretrain: error: --eval-cache must exceed {max(config.eval_sinks)}, got {config.eval_cache}\n"
        )
        return 2
    try:
        results = run_study(args.out, config, resume=args.resume, stop_after=args.stop_after, variants=variants,
                            progress=not args.no_progress)
    except (FileExistsError, ValueError) as exc:
        sys.stderr.write(f"sinkstream pretrain: error: {exc}\n")
        return 2
    if results is None:
        sys.stdout.write(
            f"stopped at step {args.stop_after}; continue with: sinkstream pretrain --out {args.out} --resume\n"
        )
        return 0
    sys.stdout.write((args.out / "table.md").read_text())
    sys.stdout.write(json.dumps({"results": str(args.out / "results.json")}) + "\n")
    return 0
