"""`sinkstream demo`: the whole product on this machine, end to end, with a crash in the middle.

1. start the embedded stack (tansu broker + Redis on loopback ports) unless one is running;
2. create an input and an output topic;
3. produce real data as keyed streams: Loghub samples (HDFS, OpenSSH, BGL, Apache) and a long text
   (Alice in Wonderland from the Canterbury corpus), several lines per record, cut at arbitrary points;
4. run the service, SIGKILL it once mid-stream, restart it;
5. show annotations arriving live, duplicates from the replay dropped by id, anomalous lines highlighted;
6. print the most anomalous lines and how to consume the output topic with any Kafka client.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from pipeline.cli.common import non_negative_int, positive_int
from pipeline.settings import sinkstream_home

LOGS = {"hdfs": "HDFS_2k.log", "ssh": "OpenSSH_2k.log", "bgl": "BGL_2k.log", "apache": "Apache_2k.log"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="end-to-end demo on the embedded stack: produce real logs, run, crash, resume, show annotations",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--lines", type=positive_int, default=60, help="log lines per log stream (default 60)")
    p.add_argument(
        "--prose-lines", type=non_negative_int, default=120, help="lines of Alice in Wonderland (default 120; 0 = none)"
    )
    p.add_argument("--no-crash", action="store_true", help="do not kill the service mid-stream")
    p.add_argument("--keep-stack", action="store_true", help="leave the broker and Redis running afterwards")
    p.set_defaults(func=run)


def _records(lines: list[str], per_record: int = 3) -> list[bytes]:
    """Group lines into records and cut every other record mid-line (the chunker reassembles them)."""
    data = "".join(line + "\n" for line in lines).encode()
    out, i, n = [], 0, 0
    while i < len(data):
        end = data.find(b"\n", i)
        for _ in range(per_record - 1):
            nxt = data.find(b"\n", end + 1)
            end = nxt if nxt >= 0 else end
        end = len(data) if end < 0 else end + 1
        if n % 2:
            end = min(len(data), i + max(1, (end - i) * 3 // 4))
        out.append(data[i:end])
        i, n = end, n + 1
    return out


def _produce(bootstrap: str, topic: str, streams: dict[str, list[bytes]]) -> int:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    count = 0
    longest = max(len(v) for v in streams.values())
    for i in range(longest):  # interleave streams, as live sources would
        for key, records in streams.items():
            if i < len(records):
                producer.send(topic, key=key.encode(), value=records[i])
                count += 1
    producer.flush()
    producer.close()
    return count


def _service(config: Path, log: Path, idle_exit: float | None) -> subprocess.Popen:
    argv = [sys.executable, "-m", "pipeline.cli.main", "--log-format", "json", "run", "--config", str(config)]
    if idle_exit is not None:
        argv += ["--exit-when-idle", str(idle_exit)]
    with open(log, "ab") as f:
        return subprocess.Popen(  # noqa: S603 - our own command line
            argv, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )


class _Viewer:
    """Reads the output topic by assignment and prints each new annotation once."""

    def __init__(self, bootstrap: str, topic: str):
        from kafka import KafkaConsumer, TopicPartition

        self.consumer = KafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
        )
        self.consumer.assign([TopicPartition(topic, 0)])
        self.seen: dict[str, dict] = {}
        self.duplicates = 0
        self.color = sys.stdout.isatty()

    def pump(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for records in self.consumer.poll(timeout_ms=300).values():
                for r in records:
                    a = json.loads(r.value)
                    if a["id"] in self.seen:
                        self.duplicates += 1
                        continue
                    self.seen[a["id"]] = a
                    self._show(a)

    def close(self) -> None:
        """Close the consumer; before the stack stops, else its connections log errors once the broker is gone."""
        self.consumer.close()

    def _show(self, a: dict) -> None:
        for line in a.get("score", {}).get("lines", []):
            z = "   -  " if line["z"] is None else f"{line['z']:+6.2f}"
            ppl = "    -   " if line["perplexity"] is None else f"{line['perplexity']:8.2f}"
            text = line["text"][:90]
            row = f"{a['stream']:>7} #{line['line_no']:<4} ppl {ppl}  z {z}  {text}"
            if line["anomaly"]:
                row = f"\033[1;31m{row}  <-- anomalous\033[0m" if self.color else f"{row}  <-- ANOMALOUS"
            sys.stdout.write(row + "\n")
        if a["kind"] == "note":
            sys.stdout.write(f"{a['stream']:>7} NOTE: {a['note']['text']}\n")
        sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    from pipeline.devstack.stack import read_stack, stack_down, stack_up

    home = sinkstream_home()
    streams = _streams(args, home)  # read the inputs first: a missing dataset fails before anything starts
    started = read_stack(home) is None
    stack = stack_up(home) if started else read_stack(home)
    if stack is None:  # it stopped between the two reads
        stack, started = stack_up(home), True
    sys.stdout.write(f"stack: broker {stack.bootstrap_servers}, redis {stack.redis_url}\n")
    try:
        return _demo(args, stack, streams)
    finally:  # also on errors and Ctrl-C: a stack this command started must not outlive it
        if started and not args.keep_stack:
            stack_down(home)
            sys.stdout.write("stack stopped (use --keep-stack to keep it)\n")
        else:
            sys.stdout.write("stack left running: `sinkstream stack down` stops it\n")


def _streams(args: argparse.Namespace, home: Path) -> dict[str, list[bytes]]:
    """The demo's keyed input records: Loghub logs and, with --prose-lines, Alice in Wonderland."""
    from pipeline.evaluation.datasets import bgl_labels, canterbury, loghub_dir

    streams = {}
    for key, name in LOGS.items():
        path = loghub_dir() / name
        # BGL lines start with their anomaly label; the model must not see it.
        lines = (
            [text for text, _ in bgl_labels(path)] if key == "bgl" else path.read_text(errors="replace").splitlines()
        )
        streams[key] = _records(lines[: args.lines])
    if args.prose_lines:
        alice = (canterbury(home) / "alice29.txt").read_text(errors="replace").splitlines()
        streams["alice"] = _records([x for x in alice if x.strip()][: args.prose_lines], per_record=5)
    return streams


def _demo(args: argparse.Namespace, stack, streams: dict[str, list[bytes]]) -> int:
    """Produce the records, run the service (SIGKILL and restart unless --no-crash), show the annotations."""
    from connectors.kafka.admin import create_topics

    suffix = time.strftime("%Y%m%d-%H%M%S")
    topic_in, topic_out = f"demo.input.{suffix}", f"demo.annotations.{suffix}"
    create_topics(stack.bootstrap_servers, {topic_in: 3, topic_out: 1})
    n = _produce(stack.bootstrap_servers, topic_in, streams)
    sys.stdout.write(f"produced {n} records on {topic_in} as {len(streams)} keyed streams: {', '.join(streams)}\n")
    work = Path(tempfile.mkdtemp(prefix="sinkstream-demo-"))
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump({
        "log_format": "json",
        "kafka": {"input_topic": topic_in, "output_topic": topic_out, "group_id": f"demo-{suffix}",
                  "session_timeout_ms": 6000, "max_poll_records": 8},
        "checkpoint": {"every_records": 10, "every_seconds": 10},
    }))
    log = work / "service.log"
    viewer = _Viewer(stack.bootstrap_servers, topic_out)
    sys.stdout.write(f"service log: {log}\n\n")
    procs = [_service(config, log, None if not args.no_crash else 5.0)]
    try:
        if not args.no_crash:
            while len(viewer.seen) < n // 3 and procs[-1].poll() is None:
                viewer.pump(1.0)
            procs[-1].send_signal(signal.SIGKILL)
            procs[-1].wait()
            sys.stdout.write(
                f"\n*** killed the service with SIGKILL after {len(viewer.seen)} annotations; restarting ***\n\n"
            )
            procs.append(_service(config, log, 5.0))
        return _follow(procs[-1], viewer, n, stack.bootstrap_servers, topic_out)
    finally:  # an error or Ctrl-C while watching: stop the service too
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        viewer.close()


def _follow(proc, viewer, n: int, bootstrap: str, topic_out: str) -> int:
    """Show annotations until the service exits, then the summary."""
    while proc.poll() is None:
        viewer.pump(1.0)
    viewer.pump(2.0)
    lines = [
        (line["z"], a["stream"], line)
        for a in viewer.seen.values()
        for line in a.get("score", {}).get("lines", [])
        if line["z"] is not None
    ]
    sys.stdout.write(
        f"\n{len(viewer.seen)} annotations for {n} records ({viewer.duplicates} replayed duplicates dropped by id); "
        f"service exit code {proc.returncode}\n\n"
        "Most anomalous lines (z-score of mean NLL against the stream's history):\n"
    )
    for z, stream, line in sorted(lines, key=lambda x: -x[0])[:5]:
        sys.stdout.write(f"  z {z:+6.2f}  {stream:>7} #{line['line_no']:<4} {line['text'][:100]}\n")
    sys.stdout.write(
        f"\nConsume the output topic with any Kafka client, e.g. Python:\n"
        f"  from kafka import KafkaConsumer\n"
        f"  for m in KafkaConsumer('{topic_out}', bootstrap_servers='{bootstrap}', "
        f"auto_offset_reset='earliest'):\n      print(m.key, m.value)\n"
        f"Annotations follow the JSON Schema in pipeline/service/schemas/annotation.v1.json; drop duplicates by `id`.\n"
    )
    return 0 if proc.returncode == 0 and len(viewer.seen) >= n else 1
