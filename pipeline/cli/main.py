"""The `sinkstream` command line: the parser, the dispatch and the one error boundary.

Each command lives in its own module of `pipeline.cli` (`add_parser(sub)` + `run(args)`); shared options are in
`pipeline.cli.common`. The error boundary: a user mistake (`UserError`, a settings `ValidationError`, a
missing file, a missing data set) prints one line, `sinkstream: error: <what was expected, what arrived>`, to
stderr and exits 2, like argparse does for a bad flag. Every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from pydantic import ValidationError

from pipeline.cli import adapt, anomaly, bench, chat, demo, eval, model, pretrain, run, score, stack, tail
from pipeline.errors import UserError
from pipeline.evaluation.datasets import DatasetError, DatasetMissingError
from pipeline.logs import configure_logging
from pipeline.settings import describe_validation_error

COMMANDS = (score, model, stack, run, tail, eval, bench, anomaly, adapt, demo, pretrain, chat)


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (`sinkstream score: error: argument --window: ...`), exit 2;
    the usage stays available through --help. Subcommand parsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="sinkstream",
        description=(
            "Run a long-lived language model over endless text streams with a StreamingLLM "
            "(attention sink) cache: constant memory and per-token cost, exact resume from checkpoints. "
            "Evicted text is gone: the model sees the first tokens and a rolling window, nothing else."
        ),
    )
    parser.add_argument(
        "--log-format", choices=["json", "console"], default=None, help="log format (default: console on a terminal)"
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        type=str.upper, help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def user_error_message(exc: BaseException) -> str | None:
    """The one-line message for a user mistake, or None when `exc` is a bug (keep its traceback)."""
    if isinstance(exc, UserError | DatasetError | DatasetMissingError):
        return str(exc)
    if isinstance(exc, ValidationError):
        return describe_validation_error(exc)
    if isinstance(exc, FileNotFoundError):
        return str(exc) if not exc.filename else f"expected a file at {exc.filename}, found none"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    fmt = args.log_format or ("console" if sys.stderr.isatty() else "json")
    configure_logging(fmt, args.log_level)
    try:
        return int(args.func(args) or 0)
    except Exception as exc:
        message = user_error_message(exc)
        if message is None:
            raise
        sys.stderr.write(f"sinkstream: error: {' '.join(message.split())}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
