"""The `sinkstream` command line. Each subcommand lives in its own module; this file only dispatches."""

from __future__ import annotations

import argparse
import sys

from pipeline import anomaly_command, bench_command, demo_command, eval_command, run_command, score_command
from pipeline.datasets import DatasetError, DatasetMissingError
from pipeline.logs import configure_logging
from pipeline.settings import sinkstream_home


def _model_prepare(args: argparse.Namespace) -> int:
    from model.loader import resolve_model_dir

    path = resolve_model_dir(args.model)
    sys.stdout.write(f"{args.model}: ready at {path}\n")
    return 0


def _stack(args: argparse.Namespace) -> int:
    from pipeline.stack import stack_command

    return stack_command(args.action, sinkstream_home())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sinkstream",
        description=(
            "Run a long-lived language model over endless text streams with a StreamingLLM "
            "(attention sink) cache: constant memory and per-token cost, exact resume from checkpoints. "
            "Evicted text is gone: the model sees the first tokens and a rolling window, nothing else."
        ),
    )
    parser.add_argument("--log-format", choices=["json", "console"], default=None, help="log format (default: console on a terminal)")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    score_command.add_parser(sub)

    model = sub.add_parser("model", help="prepare models (convert a GGUF once into the local cache)")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    prep = model_sub.add_parser("prepare", help="convert/cache a model so later loads take about a second")
    prep.add_argument("--model", default="smollm2-135m", help="packaged name or .gguf file")
    prep.set_defaults(func=_model_prepare)

    stack = sub.add_parser(
        "stack",
        help="start/stop the embedded local broker (tansu) and Redis",
        description="Start, stop or inspect a local Kafka-compatible broker and a Redis on free loopback ports. "
        "Their addresses are written under $SINKSTREAM_HOME/stack/ where `sinkstream run` finds them.",
    )
    stack.add_argument("action", choices=["up", "down", "status"])
    stack.set_defaults(func=_stack)

    for command in (run_command, eval_command, bench_command, anomaly_command, demo_command):
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    fmt = args.log_format or ("console" if sys.stderr.isatty() else "json")
    configure_logging(fmt, args.log_level)
    try:
        return int(args.func(args) or 0)
    except (DatasetError, DatasetMissingError) as exc:  # user-facing: what is missing and how to fix it
        sys.stderr.write(f"sinkstream {args.command}: error: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
