"""`sinkstream stack up|down|status`: the embedded broker and Redis for local runs (see `pipeline.devstack`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.devstack.processes import StackError
from pipeline.devstack.stack import stack_dir, stack_down, stack_status, stack_up
from pipeline.settings import sinkstream_home


def add_parser(sub: argparse._SubParsersAction) -> None:
    stack = sub.add_parser(
        "stack",
        help="start/stop the embedded local broker (tansu) and Redis",
        description="Start, stop or inspect a local Kafka-compatible broker and a Redis on free loopback ports. "
        "Their addresses are written under $SINKSTREAM_HOME/stack/ where `sinkstream run` finds them.",
    )
    stack.add_argument("action", choices=["up", "down", "status"])
    stack.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return stack_command(args.action, sinkstream_home())


def stack_command(action: str, home: Path) -> int:
    """`sinkstream stack up|down|status`: run the action, write a human summary to stdout, return an exit code."""
    out = sys.stdout.write
    try:
        if action == "up":
            info = stack_up(home)
            out(f"stack up\n  kafka  {info.bootstrap_servers}  (pid {info.pids['tansu']})\n"
                f"  redis  {info.redis_url}  (pid {info.pids['redis']})\n  state  {stack_dir(home)}\n")
            return 0
        if action == "down":
            stopped = [k for k, v in stack_down(home).items() if v]
            out(f"stack down: {', '.join(f'{k} stopped' for k in stopped) or 'nothing was running'}\n")
            return 0
        if action == "status":
            st = stack_status(home)
            if not st["processes"]:
                out("stack: not running\n")
                return 1
            out(f"stack: {'running' if st['running'] else 'UNHEALTHY (run `sinkstream stack up` to restart it)'}\n")
            for name, p in st["processes"].items():
                out(f"  {name:<6} pid {p['pid']:<8} {'ok' if p['reachable'] else p['error']}\n")
            out(f"  kafka  {st['bootstrap_servers']}\n  redis  {st['redis_url']}\n")
            return 0 if st["running"] else 1
    except StackError as exc:
        sys.stderr.write(f"stack {action} failed: {exc}\n")
        return 1
    sys.stderr.write(f"stack: expected one of up, down, status; got {action!r}\n")
    return 2
