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
