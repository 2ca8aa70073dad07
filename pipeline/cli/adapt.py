"""`sinkstream adapt`: fine-tune a LoRA adapter on text declared normal; `model.adapter: OUT` then loads it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from pipeline.cli.common import add_model_options, load_model_for_cli, positive_float, positive_int
from pipeline.errors import UserError
from pipeline.training.adapt import AdaptConfig, train_adapter


def add_parser(sub: argparse._SubParsersAction) -> None:
    defaults = AdaptConfig()
    p = sub.add_parser(
        "adapt",
        help="fine-tune a LoRA adapter on text this system calls normal (then set model.adapter)",
        description=(
            "Fine-tune a LoRA adapter (peft) on a file of text you declare normal, e.g. a day of this system's "
            "logs, so the model's surprise is measured against this system's normal instead of web English. The "
            "text is tokenized as one stream and cut into blocks; the last --holdout share is held out and its "
            "loss (mean NLL per token, nats) reported before and after. Writes the adapter folder --out "
            "(adapter_config.json, adapter_model.safetensors, adapt.json with the losses and the adapter's "
            "fingerprint). Use it with `model.adapter: OUT` in config.yaml (or SINKSTREAM_MODEL__ADAPTER): it is "
            "merged into the weights at start, and snapshots taken without it are refused."
        ),
    )
    p.add_argument("--text", type=Path, required=True, help="normal text, one log line (or text line) per line")
    p.add_argument("--max-lines", type=positive_int, default=None, help="only the first N lines of --text")
    p.add_argument("--out", type=Path, required=True, help="adapter folder to write (created)")
    p.add_argument("--steps", type=positive_int, default=defaults.steps,
                   help=f"optimiser steps (default {defaults.steps})")
    p.add_argument("--batch", type=positive_int, default=defaults.batch,
                   help=f"blocks per step (default {defaults.batch})")
    p.add_argument("--block", type=positive_int, default=defaults.block,
                   help=f"tokens per block (default {defaults.block})")
    p.add_argument("--lr", type=positive_float, default=defaults.lr,
                   help=f"AdamW learning rate (default {defaults.lr})")
    p.add_argument("--rank", type=positive_int, default=defaults.rank, help=f"LoRA rank r (default {defaults.rank})")
    p.add_argument("--alpha", type=positive_int, default=defaults.alpha,
                   help=f"LoRA alpha; the update is scaled by alpha/r (default {defaults.alpha})")
    p.add_argument("--targets", default="",
                   help="comma-separated module names to adapt (default: peft's choice, q_proj,v_proj on Llama)")
    p.add_argument("--holdout", type=positive_float, default=defaults.holdout,
                   help=f"share of the blocks held out for the before/after loss (default {defaults.holdout})")
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of LoRA init and block order (default 0)")
    add_model_options(p, threads_default=1, threads_help="torch CPU threads (default 1: fastest on a busy CPU)")
    p.set_defaults(dtype="float32")  # train in float32 (bf16 AdamW steps lose the small LoRA updates)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.holdout >= 1:
        raise UserError(f"--holdout: expected a share between 0 and 1, got {args.holdout}")
    if not args.text.is_file():
        raise UserError(f"--text: expected a file of normal text, got {str(args.text)!r}")
    with args.text.open(encoding="utf-8", errors="replace") as f:
        lines = [line for _, line in zip(range(args.max_lines or sys.maxsize), f)]
    cfg = AdaptConfig(steps=args.steps, batch=args.batch, block=args.block, lr=args.lr, rank=args.rank,
                      alpha=args.alpha, targets=[t for t in args.targets.split(",") if t.strip()],
                      holdout=args.holdout, seed=args.seed)
    lm = load_model_for_cli(args.model, device=args.device, dtype=args.dtype, threads=args.threads)
    with tqdm(total=cfg.steps, desc="adapt", unit="step", file=sys.stderr, disable=args.no_progress) as bar:

        def progress(step: int, loss: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

        try:
            report = train_adapter(lm, lines, cfg, args.out, progress=progress)
        except ValueError as exc:  # too little text, unknown target module names
            raise UserError(f"adapt: {exc}") from exc
    sys.stdout.write(
        f"held-out loss {report['held_out_loss_before']:.4f} -> {report['held_out_loss_after']:.4f} nats/token "
        f"(perplexity {report['held_out_ppl_before']:.2f} -> {report['held_out_ppl_after']:.2f}; "
        f"{report['train_blocks']} blocks trained, {report['held_out_blocks']} held out, {cfg.steps} steps, "
        f"{report['train_s']:.0f} s)\n"
        f"adapter {args.out} fingerprint {report['adapter_fingerprint']}\n"
        f"use it: model.adapter: {args.out}   (config.yaml, or SINKSTREAM_MODEL__ADAPTER={args.out})\n"
    )
    return 0
