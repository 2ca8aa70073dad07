"""`sinkstream model prepare`: convert a model once into the local cache so later loads take about a second."""

from __future__ import annotations

import argparse
import sys

from pipeline.cli.common import add_model_option
from pipeline.settings import sinkstream_home


def add_parser(sub: argparse._SubParsersAction) -> None:
    model = sub.add_parser(
        "model", help="prepare models (convert a GGUF once into the local cache)",
        description="Manage the local model cache: `model prepare` converts a packaged name or .gguf file once "
                    "into a Hugging Face folder under the sinkstream home, so that later loads take about a second.")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    prep = model_sub.add_parser("prepare", help="convert/cache a model so later loads take about a second")
    add_model_option(prep, default="smollm2-135m", help="packaged name or .gguf file")
    prep.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from model.loader import resolve_model_dir

    path = resolve_model_dir(args.model, cache_dir=sinkstream_home() / "models")
    sys.stdout.write(f"{args.model}: ready at {path}\n")
    return 0
