"""The published JSON Schema is generated from the annotation models; the committed file must match it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema

from pipeline.service import annotations

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "pipeline" / "service" / annotations.SCHEMA_FILE


def test_committed_schema_is_exactly_the_generated_one():
    generated = json.dumps(annotations.generated_schema(), indent=2, sort_keys=True) + "\n"
    assert COMMITTED.read_text() == generated, (
        "pipeline/service/schemas/annotation.v1.json differs from the models; regenerate it with "
        "`python -m pipeline.service.annotations > pipeline/service/schemas/annotation.v1.json`"
    )


def test_the_module_entry_point_writes_the_committed_file():
    out = subprocess.run([sys.executable, "-m", "pipeline.service.annotations"], capture_output=True, text=True,
                         check=True, cwd=REPO, timeout=120).stdout
    assert out == COMMITTED.read_text()


def test_schema_is_a_valid_draft_2020_12_schema_with_one_branch_per_kind():
    schema = annotations.schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    kinds = {branch["$ref"].rsplit("/", 1)[-1] for branch in schema["oneOf"]}
    assert kinds == {"ScoreAnnotation", "NoteAnnotation", "ErrorAnnotation", "ReplyAnnotation", "ClosedAnnotation"}
    assert schema["discriminator"]["propertyName"] == "kind"


def test_a_reply_too_large_for_the_topic_keeps_the_start_of_its_text_and_counts_the_rest():
    record = {"topic": "t", "partition": 0, "offset": 7}
    text = "é" * 3000 + "end"  # JSON writes each é as \u00e9: 6 bytes a character
    meta = {"model": {"name": "m", "fingerprint": "f"}, "cache": {"sinks": 4, "window": 252}}
    reply = annotations.reply_annotation(record, "conv", text, 64, 12, "max_tokens", 3, 500, meta)
    assert annotations.encode_bounded(reply, 100_000) == annotations.encode(reply)  # fits: unchanged
    data = annotations.encode_bounded(reply, 4096)
    assert len(data) <= 4096
    doc = json.loads(data)
    annotations.validate(doc)
    kept = doc["reply"]["text"]
    assert text.startswith(kept) and len(kept) + doc["reply"]["text_omitted_chars"] == len(text)
    one_more = {**doc, "reply": {**doc["reply"], "text": text[: len(kept) + 1]}}
    assert len(annotations.encode(one_more)) > 4096  # the most characters that fit


def test_every_kind_the_service_publishes_is_exactly_its_models_dump(text_lm):
    """What goes to the topic and the models the schema is generated from cannot drift apart: every kind the
    service publishes (score with template and verdict, note, error, closed; reply from its builder) parses
    into its model, and the model's dump is the published document, key for key."""
    from connectors.memory import MemorySink, MemorySource, MemoryStore, MemoryTopic
    from pipeline.service.engine import Engine
    from pipeline.service.service import Service
    from pipeline.settings import load_settings

    settings = load_settings(None, cache={"sinks": 4, "window": 32, "chunk": 16},
                             kafka={"output_topic": "out"}, note={"every_tokens": 24, "max_new_tokens": 3},
                             service={"session_gap": 3, "max_record_bytes": 200})
    topic = MemoryTopic("in")
    for i in range(8):
        topic.append(0, b"a" if i < 4 else b"b", f"GET /item/{i} 200 in {i} ms\n".encode())
    topic.append(0, b"b", b"x" * 300 + b"\n")  # over max_record_bytes: an error beside its score
    sink = MemorySink()
    Service(settings, Engine(text_lm, settings), MemorySource.factory(topic), sink, MemoryStore()).run(
        idle_exit_s=0.2, install_signals=False)
    meta = {"model": {"name": "m", "fingerprint": "f"}, "cache": {"sinks": 4, "window": 32}}
    published = [*sink.values("out"), annotations.reply_annotation(
        {"topic": "t", "partition": 0, "offset": 1}, "conv", "hello", 3, 9, "end_of_turn", 0, 12, meta)]
    assert {a["kind"] for a in published} == {"score", "note", "error", "closed", "reply"}
    assert any(a["kind"] == "score" and a["score"]["lines"] and a["score"]["lines"][0]["template"]
               and a["score"]["verdict"] for a in published)
    for doc in published:
        assert annotations.validate(doc).model_dump(mode="json", by_alias=True) == doc
