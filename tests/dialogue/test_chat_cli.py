"""`sinkstream chat` as a user runs it: scripted turns, /save + --resume, --report, and a real terminal."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pexpect
import pytest

from model.loader import load_model
from model.stepper import SinkModel
from pipeline.dialogue import Conversation, GenerationSettings

CHAT = [sys.executable, "-m", "pipeline.cli.main", "--log-format", "json", "chat"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def chat(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run([*CHAT, *args], capture_output=True, text=True, timeout=timeout, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def replies(stdout: str) -> list[str]:
    return [line[len("bot> "):] for line in stdout.splitlines() if line.startswith("bot> ")]


def test_script_save_and_resume_continue_bit_exactly(tiny_chat_dir, tmp_path):
    """A, B, C straight vs A, /save, then --resume with B, C: the printed replies are the same."""
    common = ["--model", str(tiny_chat_dir), "--threads", "1", "--window", "48", "--max-reply-tokens", "6",
              "--temperature", "0.8", "--seed", "5"]
    turns = ["Hello there.", "What is a river?", "And a lake?", "Bye."]
    straight = tmp_path / "straight.txt"
    straight.write_text("\n".join(turns) + "\n/stats\n")
    snap = tmp_path / "conv.snap"
    first = tmp_path / "first.txt"
    first.write_text(f"{turns[0]}\n/save {snap}\n/quit\nnever sent\n")
    rest = tmp_path / "rest.txt"
    rest.write_text("\n".join(turns[1:]) + "\n/stats\n")
    report = tmp_path / "report.json"

    a = chat([*common, "--script", str(straight), "--report", str(report)])
    b1 = chat([*common, "--script", str(first)])
    b2 = chat(["--model", str(tiny_chat_dir), "--threads", "1", "--resume", str(snap), "--script", str(rest)])

    assert len(replies(a.stdout)) == 4 and all(replies(a.stdout))
    assert replies(b1.stdout) == replies(a.stdout)[:1] and "never sent" not in b1.stdout
    assert replies(b2.stdout) == replies(a.stdout)[1:]  # settings (sampling, seed, window) came from the snapshot
    stats = [line for line in a.stdout.splitlines() if line.startswith("turns ")]
    assert stats == [line for line in b2.stdout.splitlines() if line.startswith("turns ")]
    assert re.search(r"turns 4 · tokens seen \d+ · cache \d+/52 \(\d+%\) · evicted [1-9]\d*", stats[0])
    doc = json.loads(report.read_text())
    assert [t["turn"] for t in doc["turns"]] == [1, 2, 3, 4] and doc["window"] == 48
    assert all(t["reply_tokens"] == 6 and t["rss_kb"] > 0 for t in doc["turns"])
    assert doc["settings"]["seed"] == 5


def test_bad_resume_file_is_one_line_error(tiny_chat_dir, tmp_path):
    bogus = tmp_path / "bogus.snap"
    bogus.write_bytes(b"not a snapshot")
    proc = subprocess.run([*CHAT, "--model", str(tiny_chat_dir), "--resume", str(bogus)], capture_output=True,
                          text=True, timeout=120, env=ENV)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "snapshot" in proc.stderr


def test_interactive_terminal(tiny_chat_dir, tmp_path):
    """Drive the chat in a pseudo-terminal like a person: prompt, a streamed reply, /stats, /save, /quit."""
    snap = tmp_path / "live.snap"
    child = pexpect.spawn(
        CHAT[0], [*CHAT[1:], "--model", str(tiny_chat_dir), "--threads", "1", "--max-reply-tokens", "5"],
        env=ENV, encoding="utf-8", timeout=120, dimensions=(40, 200),
    )
    try:
        child.expect_exact("you> ")
        child.sendline("Hello, how are you?")
        child.expect(r"bot> (.*?)\r\n")
        reply = child.match.group(1)
        assert reply.strip()
        child.expect_exact("you> ")
        child.sendline("/stats")
        child.expect(r"turns 1 · tokens seen (\d+) · cache")
        assert int(child.match.group(1)) > 0
        child.expect_exact("you> ")
        child.sendline(f"/save {snap}")
        child.expect_exact("saved ")
        child.expect_exact("you> ")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    assert snap.stat().st_size > 0


@pytest.mark.slow
def test_real_model_answers_and_stops_on_end_of_turn():
    lm = load_model("smollm2-135m", device="cpu", dtype="float32")
    model = SinkModel(lm)
    conv = Conversation(model, model.new_cache(sinks=4, window=1020), GenerationSettings(max_reply_tokens=32))
    reply = conv.turn("What is the capital of France?")
    assert reply.stopped == "end_of_turn" and reply.token_ids[-1] == lm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert "Paris" in reply.text
    follow = conv.turn("And what is the capital of Germany?")
    assert "Berlin" in follow.text
    # each reply's last token is pending until the next turn (the second prompt includes the first one's)
    assert (
        conv.cache.seen == reply.prompt_tokens + len(reply.token_ids) + follow.prompt_tokens + len(follow.token_ids) - 2
    )
