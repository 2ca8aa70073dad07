"""Every subcommand explains itself with --help, and bad arguments fail with a clear message."""

from __future__ import annotations

import argparse

import pytest

from pipeline.cli.main import build_parser, main

COMMANDS = ["score", "run", "eval", "bench", "anomaly", "demo", "stack", "model"]


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_help_explains_every_command_and_option(command, capsys):
    """Every command has a description and every option a help text, and --help shows them."""
    sub = _subparsers()[command]
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse re-wraps text to the terminal width
    assert out.startswith(f"usage: sinkstream {command}")
    assert sub.description and " ".join(sub.description.split())[:60] in out
    for action in sub._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue  # positionals list their choices in the usage line
        assert action.help, f"sinkstream {command} {action.option_strings[-1]}: expected a help text, found none"
        assert all(option in out for option in action.option_strings)
        assert " ".join(action.help.split())[:40].replace("%%", "%") in out


def test_every_command_is_registered():
    assert set(COMMANDS) <= set(_subparsers())


def test_top_level_help_lists_every_command():
    text = build_parser().format_help()
    assert all(command in text for command in COMMANDS)
    assert "Evicted text is gone" in text


def test_score_rejects_an_unknown_policy(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["score", "--ids", "x.json", "--policy", "lru", "--out", "-"])
    assert exc.value.code == 2
    assert "invalid choice: 'lru'" in capsys.readouterr().err


def test_score_rejects_ids_that_are_not_a_list_of_integers(tmp_path, capsys):
    bad = tmp_path / "ids.json"
    bad.write_text('{"ids": [1, 2]}')
    assert main(["score", "--ids", str(bad), "--policy", "sink", "--out", str(tmp_path / "o.jsonl")]) == 2
    assert capsys.readouterr().err == f"sinkstream: error: --ids {bad}: expected a JSON list of integers, got dict\n"


def test_unknown_model_is_one_line_with_what_was_expected(tmp_path, capsys):
    ids = tmp_path / "ids.json"
    ids.write_text("[1, 2, 3]")
    assert main(["score", "--ids", str(ids), "--policy", "sink", "--model", "gpt-5", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sinkstream: error: --model: expected one of ['smollm2-135m'], a directory containing "
                          "config.json, or a .gguf file; got 'gpt-5'") and err.count("\n") == 1


def test_demo_without_the_loghub_samples_fails_cleanly_before_starting_anything(tmp_path, monkeypatch, capsys):
    from pipeline.devstack import stack

    monkeypatch.setenv("SINKSTREAM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SINKSTREAM_LOGHUB", str(tmp_path / "no-such-folder"))
    monkeypatch.setattr(stack, "stack_up", lambda *a, **k: pytest.fail("the stack must not start without input data"))
    assert main(["demo"]) == 2
    err = capsys.readouterr().err
    assert f"sinkstream: error: expected the Loghub samples in {tmp_path / 'no-such-folder'}" in err
    assert "Traceback" not in err


def test_demo_stops_the_stack_it_started_when_it_fails(tmp_path, monkeypatch, capsys):
    from pipeline.cli import demo as demo_command
    from pipeline.devstack import stack

    calls = []
    monkeypatch.setenv("SINKSTREAM_HOME", str(tmp_path))
    monkeypatch.setattr(demo_command, "_streams", lambda args, home: {"s": [b"line\n"]})
    monkeypatch.setattr(stack, "read_stack", lambda home: None)
    info = stack.StackInfo(bootstrap_servers="127.0.0.1:1", redis_url="redis://127.0.0.1:2/0", pids={})
    monkeypatch.setattr(stack, "stack_up", lambda home: calls.append("up") or info)
    monkeypatch.setattr(stack, "stack_down", lambda home: calls.append("down"))
    monkeypatch.setattr(demo_command, "_demo", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        main(["demo"])
    assert calls == ["up", "down"]
    assert "stack stopped" in capsys.readouterr().out


def test_demo_closes_its_consumer_before_the_stack_stops(tmp_path, monkeypatch):
    """The viewer's Kafka consumer is closed when the demo ends, also on an error, so that stopping the stack
    afterwards does not make its connections log errors."""
    import argparse

    from connectors.kafka import admin
    from pipeline.cli import demo as demo_command
    from pipeline.devstack import stack

    events: list[str] = []

    class Viewer:
        def __init__(self, bootstrap: str, topic: str):
            self.seen: dict = {}

        def close(self) -> None:
            events.append("viewer closed")

    class Exited:
        returncode = 0

        def poll(self) -> int:
            return 0

    monkeypatch.setattr(demo_command, "_Viewer", Viewer)
    monkeypatch.setattr(admin, "create_topics", lambda *a, **k: None)
    monkeypatch.setattr(demo_command, "_produce", lambda *a: 1)
    monkeypatch.setattr(demo_command, "_service", lambda *a: Exited())
    monkeypatch.setattr(demo_command, "_follow", lambda *a: events.append("followed") or 0)
    monkeypatch.setattr(demo_command.tempfile, "mkdtemp", lambda prefix: str(tmp_path))
    info = stack.StackInfo(bootstrap_servers="127.0.0.1:1", redis_url="redis://127.0.0.1:2/0", pids={})
    assert demo_command._demo(argparse.Namespace(no_crash=True), info, {"s": [b"line\n"]}) == 0
    assert events == ["followed", "viewer closed"]

    events.clear()
    monkeypatch.setattr(demo_command, "_follow", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        demo_command._demo(argparse.Namespace(no_crash=True), info, {"s": [b"line\n"]})
    assert events == ["viewer closed"]
