"""Annotations: the documents the service publishes to the output topic, as pydantic models.

Every annotation is one JSON object keyed by the stream key. Its `id` is `topic/partition/offset/kind`: a
replay after a crash re-publishes the same ids with the same values, so subscribers drop duplicates by id.
Nothing time-dependent is inside an annotation; the Kafka record timestamp says when it was produced.

Kinds: `closed` (`service.session_gap`: a stream idle that long in input time was closed, with its final
verdict; its id is `topic/partition/offset/closed/stream`, the record at which it closed), `score` (per
record: its complete lines, scored), `note` (generated text about the recent context, rolled back), `error`
(what could not be scored, and why: limits, a failed model step, a quarantined stream, unreadable input, a
context reset after broken state), `reply` (`service.mode: dialogue`: the assistant's answer to the user turn
in the record; it stays in the conversation's cache). A record can carry a `score` (or a `reply`) and an
`error` (part of it scored, the rest skipped; or a conversation reset notice).

The published JSON Schema (`schemas/annotation.v1.json`) is generated from these models:
`python -m pipeline.service.annotations > pipeline/service/schemas/annotation.v1.json`; a test fails when
the committed file differs. Changes stay additive within v1.
"""

from __future__ import annotations

import json
import math
import sys
from importlib import resources
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.service.scoring import MAX_TEXT, LineScore
from pipeline.service.verdict import Verdict

SCHEMA_ID: Literal["sinkstream.annotation/v1"] = "sinkstream.annotation/v1"
SCHEMA_VERSION = "v1"
SCHEMA_FILE = "schemas/annotation.v1.json"


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Source(_Doc):
    """Where the input record sits."""

    topic: str
    partition: int = Field(ge=0)
    offset: int = Field(ge=0)


class ModelInfo(_Doc):
    name: str
    fingerprint: str


class CacheInfo(_Doc):
    sinks: int = Field(ge=0)
    window: int = Field(ge=1)


class TopToken(_Doc):
    token: str
    nll: float


class LineTemplate(_Doc):
    """The line's template in the long-term memory (`pipeline.service.templates`, Drain)."""

    id: int = Field(ge=1, description="Template id in the partition's memory (deterministic: the order in which "
                                      "templates were first seen, the reference's first)")
    text: str = Field(max_length=240, description="The template, variable parts as `<*>` (as of this line)")
    seen_stream: int = Field(ge=0, description="Lines of this stream with this template before this one")
    seen_partition: int = Field(ge=0, description="Lines of this partition with this template before this one")
    seen_reference: int | None = Field(description="Lines of the reference of normal with this template (0: not "
                                                   "in it); null without `templates.reference`")


class Line(_Doc):
    """One line completed inside the record (a line split across records belongs to the one completing it)."""

    line_no: int = Field(ge=0, description="Index of the line in its stream")
    text: str = Field(max_length=MAX_TEXT)
    tokens: int = Field(ge=0)
    mean_nll: float | None
    perplexity: float | None
    z: float | None = Field(description="(mean_nll - stream mean) / stream std over earlier lines")
    anomaly: bool = Field(description="z above the configured threshold after the warm-up lines")
    top: list[TopToken]
    template: LineTemplate | None = Field(None, description="Null when `templates.enabled` is false")
    severity: str | None = Field(None, max_length=64, description="The line's declared level, as found among "
                                 "its first tokens (a key of `score.severity`, e.g. `ERROR`); null if none")
    score: float | None = Field(None, description="Combined anomaly score: surprise given the window, template "
                                                  "novelty and declared severity (formula in docs/anomaly.md)")
    alert: bool = Field(False, description="`score` above the stream's running (1 - score.alert_rate) quantile, "
                                           "after score.alert_warmup_lines lines")


class Score(_Doc):
    tokens: int = Field(ge=0)
    mean_nll: float | None = Field(description="Mean negative log-likelihood (nats) of the record's scored tokens")
    perplexity: float | None
    max_z: float | None
    anomaly: bool
    lines: list[Line]
    alert: bool = Field(False, description="Some line of the record alerts")
    max_score: float | None = Field(None, description="Highest line `score` of the record")
    verdict: Verdict | None = Field(None, description="The stream's running verdict after this record")
    lines_omitted: int = Field(
        0, ge=0, description="Lines scored but left out of `lines` so the annotation fits the topic's size limit"
    )


class Note(_Doc):
    prompt: str
    text: str
    tokens_generated: int = Field(ge=0)


class Reply(_Doc):
    """The assistant's reply to one user turn (dialogue mode); its tokens stay in the conversation's cache."""

    text: str = Field(description="The reply's text (the end-of-turn token and the template's markup excluded)")
    tokens_generated: int = Field(ge=1, description="Tokens generated, the end-of-turn token included if reached")
    prompt_tokens: int = Field(ge=0, description="Tokens fed before generating: the template's closing of the "
                                                 "previous reply and this user turn, in the chat template")
    stopped: Literal["end_of_turn", "max_tokens"] = Field(
        description="Why generation stopped: the model ended its turn, or `dialogue.max_reply_tokens` was reached")
    turn: int = Field(ge=0, description="Index of this reply in its conversation (0 = the first)")
    text_omitted_chars: int = Field(0, ge=0, description="Characters cut from the end of `text` so that the "
                                                         "annotation fits `service.max_annotation_bytes` (the "
                                                         "cache holds the whole reply)")


class Problem(_Doc):
    reason: Literal[
        "record_too_large", "record_too_many_tokens", "model_step_failed", "quarantined", "bad_input",
        "context_reset",
    ]
    message: str
    skipped_bytes: int = Field(0, ge=0)
    skipped_lines: int = Field(0, ge=0)
    skipped_tokens: int = Field(0, ge=0)


class Error(_Doc):
    problems: list[Problem]


class _Base(_Doc):
    schema_: Literal["sinkstream.annotation/v1"] = Field(SCHEMA_ID, alias="schema")
    id: str = Field(pattern=r"^.+/[0-9]+/[0-9]+/(score|note|error|reply)$",
                    description="topic/partition/offset/kind of the input record")
    stream: str = Field(description="Stream key: the input record key (UTF-8, else 'hex:...'), or 'partition-N' "
                                    "for records without a key")
    source: Source
    model: ModelInfo
    cache: CacheInfo
    tokens_seen: int = Field(ge=0, description="Tokens of this stream fed to the model after this record")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ScoreAnnotation(_Base):
    kind: Literal["score"] = "score"
    score: Score


class NoteAnnotation(_Base):
    kind: Literal["note"] = "note"
    note: Note


class ErrorAnnotation(_Base):
    kind: Literal["error"] = "error"
    error: Error


class ReplyAnnotation(_Base):
    kind: Literal["reply"] = "reply"
    reply: Reply


class Closed(_Doc):
    """Why and when a stream's session was closed (`service.session_gap`)."""

    verdict: Verdict
    idle: int = Field(ge=0, description="How long the stream had been idle, in `unit`, when it was closed")
    unit: Literal["records", "ms"] = Field(description="`records`: partition offsets; `ms`: record timestamps")


class ClosedAnnotation(_Base):
    """A stream idle for `service.session_gap` (input time) was closed at the record in `source`: its final
    verdict; its state is deleted, and a later record of the key starts afresh with a `context_reset` error."""

    id: str = Field(pattern=r"^.+/[0-9]+/[0-9]+/closed/.+$",
                    description="topic/partition/offset/closed/stream: the record at which the stream was closed")
    kind: Literal["closed"] = "closed"
    closed: Closed


Annotation = Annotated[
    ScoreAnnotation | NoteAnnotation | ErrorAnnotation | ReplyAnnotation | ClosedAnnotation,
    Field(discriminator="kind"),
]


class _Envelope(BaseModel):
    annotation: Annotation


def generated_schema() -> dict[str, Any]:
    """The JSON Schema of an annotation, generated from the models above."""
    from pydantic import TypeAdapter

    schema = TypeAdapter(Annotation).json_schema(by_alias=True)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "sinkstream annotation, version 1",
        "description": (
            "One JSON object per Kafka record on the output topic; the record key is the stream key. Drop "
            "duplicates by `id` (a replay after a crash re-publishes identical annotations). Additive changes "
            "keep v1; anything else bumps the version in `schema` and in this file's name. Generated from "
            "pipeline/service/annotations.py."
        ),
        **schema,
    }


def schema() -> dict[str, Any]:
    """The published (committed) JSON Schema of annotations."""
    return json.loads(resources.files("pipeline.service").joinpath(SCHEMA_FILE).read_text())


def validate(
    document: dict[str, Any],
) -> ScoreAnnotation | NoteAnnotation | ErrorAnnotation | ReplyAnnotation | ClosedAnnotation:
    """Parse a published annotation back into its model (raises pydantic's ValidationError)."""
    return _Envelope.model_validate({"annotation": document}).annotation


# ---- building annotations --------------------------------------------------------------------------------
# Every builder makes the document as its model and dumps it (`_dump`), so what is published is exactly what the
# schema above says: a field cannot be published without being in the schema, nor the other way round.
def _id(record_id: dict[str, Any], kind: str) -> str:
    return f"{record_id['topic']}/{record_id['partition']}/{record_id['offset']}/{kind}"


def _head(record_id: dict[str, Any], kind: str, stream: str, tokens_seen: int, meta: dict[str, Any]) -> dict[str, Any]:
    return {"schema": SCHEMA_ID, "id": _id(record_id, kind), "stream": stream, "source": record_id,
            **meta, "tokens_seen": tokens_seen}


def _dump(doc: _Base) -> dict[str, Any]:
    return doc.model_dump(mode="json", by_alias=True)


def score_annotation(
    record_id: dict[str, Any], stream: str, lines: list[LineScore], tokens_seen: int, meta: dict[str, Any],
    verdict: Verdict | None = None,
) -> dict[str, Any]:
    """The `score` annotation of one input record (lines completed inside it; possibly none)."""
    import torch

    scored = [line.scored for line in lines if line.scored.numel()]
    all_nll = torch.cat(scored) if scored else torch.empty(0)
    mean = float(all_nll.double().mean()) if all_nll.numel() else None
    zs = [line.z for line in lines if line.z is not None]
    scores = [line.score for line in lines if line.score is not None]
    score = Score(
        tokens=sum(len(line.token_ids) for line in lines),
        mean_nll=mean,
        perplexity=math.exp(mean) if mean is not None else None,
        max_z=max(zs) if zs else None,
        anomaly=any(line.anomaly for line in lines),
        alert=any(line.alert for line in lines),
        max_score=max(scores) if scores else None,
        verdict=verdict,  # as of this record: dumped right away
        lines=[Line(**line.to_json()) for line in lines],
    )
    return _dump(ScoreAnnotation(**_head(record_id, "score", stream, tokens_seen, meta), score=score))


def note_annotation(
    record_id: dict[str, Any],
    stream: str,
    prompt: str,
    text: str,
    generated: int,
    tokens_seen: int,
    meta: dict[str, Any],
) -> dict[str, Any]:
    """The `note` annotation: generated text about the stream's recent context (context rolled back after)."""
    return _dump(NoteAnnotation(**_head(record_id, "note", stream, tokens_seen, meta),
                                note=Note(prompt=prompt, text=text, tokens_generated=generated)))


def reply_annotation(
    record_id: dict[str, Any], stream: str, text: str, tokens_generated: int, prompt_tokens: int, stopped: str,
    turn: int, tokens_seen: int, meta: dict[str, Any],
) -> dict[str, Any]:
    """The `reply` annotation (dialogue mode): the reply to the record's user turn, kept in the conversation."""
    reply = Reply(text=text, tokens_generated=tokens_generated, prompt_tokens=prompt_tokens,
                  stopped=stopped, turn=turn)  # validated: one of the two reasons
    return _dump(ReplyAnnotation(**_head(record_id, "reply", stream, tokens_seen, meta), reply=reply))


def error_annotation(
    record_id: dict[str, Any], stream: str, problems: list[Problem], tokens_seen: int, meta: dict[str, Any]
) -> dict[str, Any]:
    """The `error` annotation: what of the record was not scored, and why (never skipped silently)."""
    return _dump(ErrorAnnotation(**_head(record_id, "error", stream, tokens_seen, meta),
                                 error=Error(problems=problems)))


def closed_annotation(record_id: dict[str, Any], stream: str, verdict: Verdict, idle: int, unit: str,
                      tokens_seen: int, meta: dict[str, Any]) -> dict[str, Any]:
    """The `closed` annotation of `stream`, closed at the record `record_id` (of another stream, or its own)."""
    head = _head(record_id, "closed", stream, tokens_seen, meta)
    head["id"] = f"{_id(record_id, 'closed')}/{stream}"
    closed = Closed(verdict=verdict, idle=idle, unit=unit)  # validated: records or ms
    return _dump(ClosedAnnotation(**head, closed=closed))


def encode(annotation: dict[str, Any]) -> bytes:
    """Canonical bytes of an annotation: sorted keys, no whitespace, so replays are byte-identical."""
    return json.dumps(annotation, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def encode_bounded(annotation: dict[str, Any], max_bytes: int) -> bytes:
    """`encode`, with a `score` annotation's `lines` or a `reply` annotation's `text` cut to fit `max_bytes`.

    A score keeps its first lines and counts the rest in `lines_omitted` (the record-level figures still cover
    every line); a reply keeps the start of its text and counts the cut characters in `text_omitted_chars`. So
    an annotation is never too large for the topic and never dropped. Deterministic: a replay cuts the same
    way. Notes and errors are small by construction (their texts and messages are bounded).
    """
    data = encode(annotation)
    if len(data) <= max_bytes or annotation["kind"] not in ("score", "reply"):
        return data
    cut = _cut_lines if annotation["kind"] == "score" else _cut_text
    total = len(annotation["score"]["lines"]) if annotation["kind"] == "score" else len(annotation["reply"]["text"])
    lo, hi = 0, total  # the most leading lines (characters) that fit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(encode(cut(annotation, mid))) <= max_bytes:
            lo = mid
        else:
            hi = mid - 1
    return encode(cut(annotation, lo))


def _cut_lines(annotation: dict[str, Any], keep: int) -> dict[str, Any]:
    lines = annotation["score"]["lines"]
    return {**annotation, "score": {**annotation["score"], "lines": lines[:keep], "lines_omitted": len(lines) - keep}}


def _cut_text(annotation: dict[str, Any], keep: int) -> dict[str, Any]:
    text = annotation["reply"]["text"]
    return {**annotation, "reply": {**annotation["reply"], "text": text[:keep], "text_omitted_chars": len(text) - keep}}


if __name__ == "__main__":
    sys.stdout.write(json.dumps(generated_schema(), indent=2, sort_keys=True) + "\n")
