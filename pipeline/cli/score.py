"""`sinkstream score`: per-token NLLs of a text or token-id file under a cache policy, as JSON lines."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from model.policies import POLICIES, score_ids, summarize
from model.tokens import encode_text
from pipeline.cli.common import add_model_options, load_model_for_cli, non_negative_int, positive_int
from pipeline.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score",
        help="per-token NLL of a text under a cache policy (JSON lines)",
        description=(
            "Stream a text (or token ids) through the model and write one JSON object per predicted token: "
            '{"i": i, "target": ids[i+1], "nll": -log p(ids[i+1] | ids[..i])} in nats. '
            "A progress bar and a one-line summary (tokens, mean NLL, perplexity, ms/token) go to stderr."
        ),
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", type=Path, help="UTF-8 text file, tokenized with the model's tokenizer")
    src.add_argument("--ids", type=Path, help="JSON list of token ids (skips tokenization)")
    add_model_options(p)
    p.add_argument(
        "--policy",
        choices=POLICIES,
        required=True,
        help="sink: StreamingLLM; window: no sinks; dense: no eviction; recompute: sliding window "
        "with re-computation over sinks+window tokens (slow baseline)",
    )
    p.add_argument("--sinks", type=non_negative_int, default=4, help="attention sinks (default 4)")
    p.add_argument(
        "--window", type=positive_int, default=1020, help="most recent tokens attended, itself included (default 1020)"
    )
    p.add_argument(
        "--chunk", type=positive_int, default=1, help="tokens per forward pass; recompute: windows per pass (default 1)"
    )
    p.add_argument(
        "--stride", type=positive_int, default=1, help="score every k-th target only (for recompute; default 1)"
    )
    p.add_argument("--max-tokens", type=non_negative_int, default=0, help="stop after this many tokens (0 = all)")
    p.add_argument("--out", type=Path, required=True, help="output JSON-lines file ('-' for stdout)")
    p.set_defaults(func=run)


def read_ids(args: argparse.Namespace, tokenizer) -> list[int]:
    if args.ids is not None:
        ids = json.loads(args.ids.read_text())
        if not isinstance(ids, list) or not all(isinstance(x, int) for x in ids):
            raise UserError(f"--ids {args.ids}: expected a JSON list of integers, got {type(ids).__name__}")
    else:
        ids = encode_text(tokenizer, args.text.read_text(encoding="utf-8"))
    return ids[: args.max_tokens] if args.max_tokens else ids


def run(args: argparse.Namespace) -> int:
    given = read_ids(args, None) if args.ids is not None else None  # a bad ids file fails before the model loads
    lm = load_model_for_cli(args.model, device=args.device, dtype=args.dtype, threads=args.threads)
    ids = given if given is not None else read_ids(args, lm.tokenizer)
    out = sys.stdout if str(args.out) == "-" else open(args.out, "w")
    nlls: list[float] = []
    start = time.perf_counter()
    try:
        with tqdm(total=max(len(ids) - 1, 0), desc=f"score {args.policy}", unit="tok", file=sys.stderr) as bar:
            for i, target, nll in score_ids(
                lm, ids, args.policy, args.sinks, args.window, args.chunk, args.stride, progress=bar.update
            ):
                out.write(json.dumps({"i": i, "target": target, "nll": nll}) + "\n")
                nlls.append(nll)
    finally:
        if out is not sys.stdout:
            out.close()
    s = summarize(nlls, time.perf_counter() - start, max(len(ids) - 1, 0))
    sys.stderr.write(
        f"{args.policy}: {s['tokens']} tokens scored, mean NLL {s['mean_nll']:.4f}, "
        f"perplexity {s['perplexity']:.3f}, {s['ms_per_token']:.2f} ms/token\n"
    )
    return 0
