"""What several commands share: the model options (`--model --device --dtype --threads`), written once, and
argparse `type=` validators, so a bad number is one line from argparse (exit 2) instead of a traceback later.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from model.loader import DEFAULT_MODEL, LoadedModel, load_model, resolve_model_dir
from pipeline.errors import UserError
from pipeline.settings import sinkstream_home

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "float16", "bfloat16")


def _bounded(kind: type, low: float, inclusive: bool, what: str) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low or (not inclusive and value == low):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = _bounded(int, 1, True, "an integer >= 1")
non_negative_int = _bounded(int, 0, True, "an integer >= 0")
positive_float = _bounded(float, 0.0, False, "a number > 0")
non_negative_float = _bounded(float, 0.0, True, "a number >= 0")


def _int_list(text: str, low: int) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < low for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= {low}, got {text!r}")
    return values


def int_list(text: str) -> list[int]:
    """argparse type for "256,512,1024": comma-separated integers >= 1 (sizes, counts)."""
    return _int_list(text, 1)


def non_negative_int_list(text: str) -> list[int]:
    """argparse type for "0,1,2,4": comma-separated integers >= 0 (sink counts)."""
    return _int_list(text, 0)


def add_model_option(p: argparse.ArgumentParser, default: str | None = DEFAULT_MODEL, help: str | None = None) -> None:
    """`--model`: a packaged name, a Hugging Face directory or a .gguf file."""
    p.add_argument("--model", default=default,
                   help=help or f"packaged name, HF directory or .gguf (default {default})")


def add_model_options(
    p: argparse.ArgumentParser,
    *,
    model_default: str | None = DEFAULT_MODEL,
    model_help: str | None = None,
    threads_default: int | None = 0,
    threads_help: str = "torch CPU threads (default 0: torch's choice)",
    device_and_dtype: bool = True,
) -> None:
    """`--model`, `--threads` and (unless `device_and_dtype=False`) `--device`, `--dtype`."""
    add_model_option(p, model_default, model_help)
    p.add_argument("--threads", type=non_negative_int, default=threads_default, help=threads_help)
    if device_and_dtype:
        p.add_argument("--device", default="auto", choices=DEVICES,
                       help="where the model runs (default auto: cuda when available, else cpu)")
        p.add_argument("--dtype", default="auto", choices=DTYPES,
                       help="weights and activations (default auto: bfloat16 or float16 on CUDA; on a CPU bfloat16 "
                            "where it has amx_bf16, else float32)")


def load_model_for_cli(
    name: str, device: str = "auto", dtype: str = "auto", threads: int = 0, adapter: str | None = None
) -> LoadedModel:
    """Load `name` (with the LoRA `adapter` folder merged in, if given) with the converted-model cache under
    `$SINKSTREAM_HOME/models`; an unknown name, a missing file, a missing model wheel or an adapter that does not
    fit is a `UserError` (one line, exit 2), not a traceback."""
    cache_dir = sinkstream_home() / "models"
    try:
        path = resolve_model_dir(name, cache_dir=cache_dir)
        return load_model(str(path), device=device, dtype=dtype, threads=threads, cache_dir=cache_dir,
                          adapter=adapter)
    except (ValueError, FileNotFoundError) as exc:  # AdapterError is a ValueError
        raise UserError(str(exc)) from exc
