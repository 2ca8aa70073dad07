"""`sinkstream chat`: an endless terminal conversation with the instruct model on a sink cache.

Each turn appends the chat template's text for the user's message to one cache and streams the reply as it
is generated; the reply stays in the cache. The cache is never reset: once the window is full, the oldest
turns are evicted and forgotten (the model keeps the first `--sinks` tokens and the last `--window`).

Commands inside the conversation: `/stats`, `/save FILE`, `/quit` (also Ctrl-D), `/help`.
`--script FILE` replays one user turn per line (lines starting with `/` are commands) and prints each reply;
`--report FILE` writes per-turn figures (tokens, cache fill, evictions, RSS) as JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TextIO

from pydantic import BaseModel

from model.snapshot import SnapshotError
from model.stepper import SinkModel
from pipeline.cli.common import (
    add_model_options,
    load_model_for_cli,
    non_negative_float,
    non_negative_int,
    positive_int,
)
from pipeline.dialogue import Conversation, GenerationSettings, TemplateError
from pipeline.errors import UserError

PROMPT = "you> "
REPLY = "bot> "
HELP = "commands: /stats  /save FILE  /quit  /help   (Ctrl-C interrupts a reply and undoes that turn)"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "chat",
        help="talk to the instruct model on an endless sink cache (never reset; old turns are forgotten)",
        description=(
            "Interactive conversation on one StreamingLLM cache: each turn is appended with the model's chat "
            "template, the reply streams as it is generated and stays in the cache. Evicted turns are gone: the "
            "model sees the first --sinks tokens and the last --window tokens. Commands: /stats, /save FILE, /quit."
        ),
    )
    add_model_options(p)
    p.add_argument("--sinks", type=non_negative_int, default=4, help="attention sinks (default 4)")
    p.add_argument(
        "--window", type=positive_int, default=1020, help="recent tokens attended, itself included (default 1020)"
    )
    p.add_argument(
        "--chunk", type=positive_int, default=256, help="tokens per forward pass for user turns (default 256)"
    )
    p.add_argument("--max-reply-tokens", type=positive_int, default=None, help="most tokens per reply (default 64)")
    p.add_argument("--temperature", type=non_negative_float, default=None, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] (default 1.0)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling; replies are deterministic given it")
    p.add_argument("--system", default=None, help="system prompt of the first turn (default: the template's own)")
    p.add_argument(
        "--script", type=Path, help="replay user turns from FILE (one per line) instead of reading the terminal"
    )
    p.add_argument(
        "--resume",
        type=Path,
        help="continue a conversation saved with /save FILE, bit-exactly (its sinks, window "
        "and generation settings are kept; generation flags given here override them)",
    )
    p.add_argument("--report", type=Path, help="write per-turn figures (tokens, cache, evictions, RSS) as JSON to FILE")
    p.set_defaults(func=run)


class TurnRecord(BaseModel):
    turn: int
    prompt_tokens: int
    reply_tokens: int
    stopped: str
    seconds: float
    tokens_seen: int
    buffered: int
    evicted: int
    rss_kb: int | None
    peak_rss_kb: int | None


class ChatReport(BaseModel):
    """`--report` document: the settings and one record per turn."""

    model: str
    sinks: int
    window: int | None
    settings: GenerationSettings
    turns: list[TurnRecord]


def memory_kb() -> tuple[int | None, int | None]:
    """(VmRSS, VmHWM) of this process in kB from /proc/self/status; (None, None) where there is no /proc."""
    values: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    values[key] = int(rest.split()[0])
    except OSError:
        return None, None
    return values.get("VmRSS"), values.get("VmHWM")


def _settings(args: argparse.Namespace, base: GenerationSettings | None) -> GenerationSettings:
    """Stored settings (on --resume) or defaults, with every flag given on the command line on top."""
    given = {
        "max_reply_tokens": args.max_reply_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "system_prompt": args.system,
    }
    update = {k: v for k, v in given.items() if v is not None}
    return base.model_copy(update=update) if base is not None else GenerationSettings(**update)


def format_stats(conv: Conversation) -> str:
    s = conv.stats()
    cache = f"{s.buffered}/{s.capacity} ({100 * s.fill:.0f}%)" if s.capacity else f"{s.buffered} (dense)"
    return f"turns {s.turns} · tokens seen {s.tokens_seen} · cache {cache} · evicted {s.evicted} · pending {s.pending}"


class ChatSession:
    """The command loop shared by the interactive and the scripted mode."""

    def __init__(self, conv: Conversation, out: TextIO, report: ChatReport | None):
        self.conv, self.out, self.report = conv, out, report

    def handle(self, line: str) -> bool:
        """Handle one input line; False when the conversation should end."""
        text = line.strip()
        if not text:
            return True
        if text.startswith("/"):
            return self.command(text)
        self.out.write(REPLY)
        self.out.flush()
        start = time.perf_counter()
        try:
            reply = self.conv.turn(line.rstrip("\n"), on_text=self._write)
        except KeyboardInterrupt:
            self.out.write("\n[interrupted: this turn was undone]\n")
            self.out.flush()
            return True
        self.out.write("\n")
        self.out.flush()
        if self.report is not None:
            s = self.conv.stats()
            rss, peak = memory_kb()
            self.report.turns.append(
                TurnRecord(
                    turn=s.turns, prompt_tokens=reply.prompt_tokens, reply_tokens=len(reply.token_ids),
                    stopped=reply.stopped, seconds=round(time.perf_counter() - start, 4), tokens_seen=s.tokens_seen,
                    buffered=s.buffered, evicted=s.evicted, rss_kb=rss, peak_rss_kb=peak,
                )
            )
        return True

    def _write(self, piece: str) -> None:
        self.out.write(piece)
        self.out.flush()

    def command(self, text: str) -> bool:
        name, _, arg = text.partition(" ")
        if name in ("/quit", "/exit"):
            return False
        if name == "/stats":
            self.out.write(format_stats(self.conv) + "\n")
        elif name == "/save":
            if not arg.strip():
                self.out.write("usage: /save FILE\n")
            else:
                path = Path(arg.strip()).expanduser()
                blob = self.conv.snapshot()
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_bytes(blob)
                os.replace(tmp, path)
                self.out.write(f"saved {len(blob)} bytes to {path} (resume with --resume {path})\n")
        elif name == "/help":
            self.out.write(HELP + "\n")
        else:
            self.out.write(f"unknown command {name!r}; {HELP}\n")
        self.out.flush()
        return True


def run(args: argparse.Namespace) -> int:
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise UserError(f"--top-p: expected a number in (0, 1], got {args.top_p}")
    if args.script is not None and not args.script.is_file():
        raise UserError(f"--script: expected a text file with one user turn per line, found none at {args.script}")
    lm = load_model_for_cli(args.model, device=args.device, dtype=args.dtype, threads=args.threads)
    model = SinkModel(lm)
    try:
        if args.resume is not None:
            conv = Conversation.restore(model, args.resume.read_bytes())
            conv.state = conv.state.model_copy(update={"settings": _settings(args, conv.settings)})
        else:
            cache = model.new_cache(sinks=args.sinks, window=args.window, max_chunk=args.chunk)
            conv = Conversation(model, cache, _settings(args, None))
    except (SnapshotError, TemplateError, OSError) as exc:
        raise UserError(f"chat: {exc}") from exc
    report = None
    if args.report is not None:
        report = ChatReport(
            model=args.model, sinks=conv.cache.sinks, window=conv.cache.window, settings=conv.settings, turns=[]
        )
    session = ChatSession(conv, sys.stdout, report)
    try:
        if args.script is not None:
            for line in args.script.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    sys.stdout.write(PROMPT + line + "\n")
                if not session.handle(line):
                    break
        else:
            if args.resume is not None:
                sys.stdout.write(f"resumed: {format_stats(conv)}\n")
            sys.stdout.write(
                f"sinkstream chat ({args.model}, sinks {conv.cache.sinks}, window {conv.cache.window}). {HELP}\n"
            )
            while True:
                try:
                    line = input(PROMPT)
                except (EOFError, KeyboardInterrupt):
                    sys.stdout.write("\n")
                    break
                if not session.handle(line):
                    break
    finally:
        if report is not None:
            args.report.write_text(report.model_dump_json(indent=1))
    return 0
