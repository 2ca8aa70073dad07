"""`sinkstream tail`: follow the output topic in a terminal, one row per scored line, alerts highlighted.

The service publishes at least once: after a crash or a rebalance a record may be annotated again, with the same
annotation `id` (and, thanks to exact resume, the same bytes). `tail` shows each id once (a bounded memory of
recent ids). `--alerts-only` keeps the lines with `alert: true` (and error annotations); `--key` keeps one stream.
An alert row ends with the key's running verdict, so an operator sees at once whether this key is alerting for the
first time or has been at it for a while.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

from pipeline.cli.common import non_negative_float, positive_int

RED, YELLOW, DIM, BOLD, RESET = "\033[31m", "\033[33m", "\033[2m", "\033[1m", "\033[0m"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tail",
        help="follow the annotations topic in a terminal (alerts highlighted, duplicates dropped)",
        description=(
            "Read the service's output topic (kafka.output_topic of the settings, or --topic) from its end, or "
            "from its beginning with --from-beginning, and print one row per scored line: stream, line number, "
            "combined score, template id and how often it was seen, and the text. Lines with alert: true are "
            "highlighted and followed by the stream's verdict; annotations seen twice (same id: at-least-once "
            "delivery after a restart) are shown once. Stops with Ctrl-C, or after --idle-exit seconds without "
            "new annotations."
        ),
    )
    p.add_argument("--config", type=Path, default=None, help="settings YAML (kafka section; default as the service)")
    p.add_argument("--topic", default=None, help="topic to follow (default: kafka.output_topic)")
    p.add_argument("--alerts-only", action="store_true", help="only lines with alert: true, and errors")
    p.add_argument("--key", default=None, help="only this stream (the input record key)")
    p.add_argument("--from-beginning", action="store_true", help="start at the topic's first annotation")
    p.add_argument("--idle-exit", type=non_negative_float, default=0.0,
                   help="stop after this many seconds without a new annotation (default 0: never)")
    p.add_argument("--max-ids", type=positive_int, default=100_000,
                   help="annotation ids remembered to drop duplicates (default 100000)")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                   help="ANSI colours (default auto: when stdout is a terminal)")
    p.set_defaults(func=run)


def _profile(verdict: dict[str, Any]) -> str:
    """", profile distance D" where the reference has normal sessions (`templates.reference_session`)."""
    d = verdict.get("profile_distance")
    return "" if d is None else f", profile distance {d:.2f}"


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


class Tail:
    """Turns annotations into terminal rows: filters, drops duplicate ids, highlights alerts."""

    def __init__(self, out: TextIO, alerts_only: bool = False, key: str | None = None, color: bool = False,
                 max_ids: int = 100_000):
        self.out, self.alerts_only, self.key, self.color, self.max_ids = out, alerts_only, key, color, max_ids
        self.seen: OrderedDict[str, None] = OrderedDict()
        self.duplicates = 0
        self.shown = 0

    def _paint(self, text: str, *codes: str) -> str:
        return f"{''.join(codes)}{text}{RESET}" if self.color else text

    def feed(self, annotation: dict[str, Any]) -> int:
        """Show one annotation (unless filtered or already seen); returns the rows written."""
        ident = str(annotation.get("id"))
        if ident in self.seen:
            self.duplicates += 1
            self.seen.move_to_end(ident)
            return 0
        self.seen[ident] = None
        if len(self.seen) > self.max_ids:
            self.seen.popitem(last=False)
        stream = str(annotation.get("stream"))
        if self.key is not None and stream != self.key:
            return 0
        rows = []
        kind = annotation.get("kind")
        if kind == "score":
            score = annotation["score"]
            verdict = score.get("verdict")
            for line in score.get("lines", []):
                if self.alerts_only and not line.get("alert"):
                    continue
                rows.append(self._line_row(stream, line, verdict))
        elif kind == "error":
            problems = annotation.get("error", {}).get("problems", [])
            text = "; ".join(f"{p.get('reason')}: {p.get('message')}" for p in problems)
            rows.append(self._paint(f"{stream} ERROR {text}", YELLOW))
        elif kind == "closed":  # a session closed after service.session_gap: its final verdict
            closed = annotation.get("closed", {})
            v = closed.get("verdict") or {}
            text = (f"{stream} closed after {closed.get('idle')} {closed.get('unit')} idle: {v.get('alerts')} alerts "
                    f"in {v.get('lines')} lines, max score {_fmt(v.get('max_score'), '.2f')}, "
                    f"{v.get('not_in_reference')} lines not in the reference, "
                    f"key score {_fmt(v.get('key_score'), '.2f')}{_profile(v)}")
            if not self.alerts_only or v.get("alerts"):
                rows.append(self._paint(text, RED) if v.get("alerts") else self._paint(text, DIM))
        elif kind == "note" and not self.alerts_only:
            rows.append(self._paint(f"{stream} note: {annotation.get('note', {}).get('text', '')}", DIM))
        for row in rows:
            self.out.write(row + "\n")
        self.out.flush()
        self.shown += len(rows)
        return len(rows)

    def _line_row(self, stream: str, line: dict[str, Any], verdict: dict[str, Any] | None) -> str:
        t = line.get("template")
        tmpl = ""
        if t is not None:  # template id, times seen in the partition before, "new" when not in the reference
            tmpl = f" t{t['id']}x{t['seen_partition']}" + (" new" if t.get("seen_reference") == 0 else "")
        score, z = _fmt(line.get("score"), "6.2f"), _fmt(line.get("z"), "+5.1f")
        head = f"{stream} #{line.get('line_no')} score {score} z {z}"
        text = str(line.get("text", ""))[:160]
        if not line.get("alert"):
            return f"{self._paint(head + tmpl, DIM)}  {text}"
        row = self._paint(f"ALERT {head}{tmpl}  {text}", BOLD, RED)
        if verdict:
            row += "\n" + self._paint(
                f"      verdict {stream}: {verdict.get('alerts')} alerts in {verdict.get('lines')} lines, max score "
                f"{_fmt(verdict.get('max_score'), '.2f')} (line {verdict.get('max_score_line')}), "
                f"{verdict.get('not_in_reference')} lines not in the reference, "
                f"{verdict.get('new_in_partition')} new to the partition, key score "
                f"{_fmt(verdict.get('key_score'), '.2f')}{_profile(verdict)}", RED)
        return row

    def follow(self, values: Iterable[bytes]) -> None:
        for value in values:
            try:
                annotation = json.loads(value)
            except (json.JSONDecodeError, UnicodeDecodeError):
                self.out.write(f"(not an annotation: {value[:80]!r})\n")
                continue
            if isinstance(annotation, dict):
                self.feed(annotation)


def kafka_values(client: Any, topic: str, from_beginning: bool, idle_exit: float) -> Iterable[bytes]:
    """Record values of every partition of `topic` (assigned, no consumer group), until idle for `idle_exit` s."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(enable_auto_commit=False, **client.options())
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        if not partitions:
            from pipeline.errors import UserError

            raise UserError(f"expected topic {topic!r} on {client.bootstrap_servers}, found no such topic")
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        (consumer.seek_to_beginning if from_beginning else consumer.seek_to_end)(*tps)
        last = time.monotonic()
        while True:
            batch = consumer.poll(timeout_ms=500)
            for records in batch.values():
                for r in records:
                    yield r.value or b""
            if batch:
                last = time.monotonic()
            elif idle_exit and time.monotonic() - last >= idle_exit:
                return
    finally:
        consumer.close()


def run(args: argparse.Namespace) -> int:
    from pipeline.service.wiring import kafka_client, resolve_addresses
    from pipeline.settings import load_settings

    settings = load_settings(args.config)
    bootstrap = settings.kafka.bootstrap_servers or resolve_addresses(settings)[0]
    client = kafka_client(settings.kafka, bootstrap)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    tail = Tail(sys.stdout, alerts_only=args.alerts_only, key=args.key, color=color, max_ids=args.max_ids)
    try:
        tail.follow(kafka_values(client, args.topic or settings.kafka.output_topic, args.from_beginning,
                                 args.idle_exit))
    except KeyboardInterrupt:
        pass
    sys.stderr.write(f"{tail.shown} rows, {tail.duplicates} duplicate annotations dropped\n")
    return 0
