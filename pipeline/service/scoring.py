"""Annotations: what the service publishes to the output topic, and the per-line scoring behind them.

Every annotation is one JSON object (schema: `pipeline/service/schemas/annotation.v1.json`, id
`sinkstream.annotation/v1`) keyed by the stream key. Its `id` is `topic/partition/offset/kind`: a replay
after a crash re-publishes the same ids with the same values, so subscribers drop duplicates by id.
Nothing time-dependent is inside an annotation; the Kafka record timestamp says when it was produced.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import torch

SCHEMA_ID = "sinkstream.annotation/v1"
# Longest line text carried in an annotation (characters); the offset locates the full record.
MAX_TEXT = 240


def schema() -> dict[str, Any]:
    """The published JSON Schema of annotations."""
    return json.loads(resources.files("pipeline.service").joinpath("schemas/annotation.v1.json").read_text())


@dataclass
class RunningStats:
    """Welford mean/variance of per-line mean NLL for one stream; part of the stream's snapshot."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def update(self, x: float) -> None:
        self.n += 1
        delta = x - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (x - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else 0.0

    def z(self, x: float) -> float | None:
        std = self.std
        return None if self.n < 2 or std == 0.0 else (x - self.mean) / std


@dataclass
class LineScore:
    """Score of one complete line: its tokens' NLLs (NaN where the stream had no prediction yet)."""

    line_no: int
    text: str
    token_ids: list[int]
    nll: torch.Tensor  # (len(token_ids),) float32
    z: float | None = None
    anomaly: bool = False
    top: list[dict[str, Any]] = field(default_factory=list)

    @property
    def scored(self) -> torch.Tensor:
        return self.nll[~torch.isnan(self.nll)]

    @property
    def mean_nll(self) -> float | None:
        s = self.scored
        return float(s.double().mean()) if s.numel() else None

    def to_json(self) -> dict[str, Any]:
        mean = self.mean_nll
        return {
            "line_no": self.line_no,
            "text": self.text[:MAX_TEXT],
            "tokens": len(self.token_ids),
            "mean_nll": mean,
            "perplexity": math.exp(mean) if mean is not None else None,
            "z": self.z,
            "anomaly": self.anomaly,
            "top": self.top,
        }


class LineScorer:
    """Turns token NLLs of a line into a LineScore, against the stream's running statistics."""

    def __init__(self, tokenizer, top_tokens: int = 3, anomaly_z: float = 3.0, warmup_lines: int = 20):
        self.tokenizer = tokenizer
        self.top_tokens = top_tokens
        self.anomaly_z = anomaly_z
        self.warmup_lines = warmup_lines

    def score(self, line: LineScore, stats: RunningStats) -> LineScore:
        """Fill z, anomaly and top tokens of `line`, then fold its mean NLL into `stats`."""
        mean = line.mean_nll
        if mean is not None:
            line.z = stats.z(mean)
            line.anomaly = bool(
                line.z is not None and stats.n >= self.warmup_lines and line.z > self.anomaly_z
            )
            stats.update(mean)
        if self.top_tokens:
            values = torch.nan_to_num(line.nll, nan=-1.0)
            k = min(self.top_tokens, int((values >= 0).sum()))
            if k:
                best = torch.topk(values, k)
                line.top = [
                    {"token": self.tokenizer.decode([line.token_ids[i]]), "nll": float(values[i])}
                    for i in best.indices.tolist()
                ]
        return line


def score_annotation(
    record_id: dict[str, Any], stream: str, lines: list[LineScore], tokens_seen: int, meta: dict[str, Any]
) -> dict[str, Any]:
    """The `score` annotation of one input record (lines completed inside it; possibly none)."""
    scored = [line.scored for line in lines if line.scored.numel()]
    all_nll = torch.cat(scored) if scored else torch.empty(0)
    mean = float(all_nll.double().mean()) if all_nll.numel() else None
    zs = [line.z for line in lines if line.z is not None]
    return {
        "schema": SCHEMA_ID,
        "id": _id(record_id, "score"),
        "kind": "score",
        "stream": stream,
        "source": record_id,
        **meta,
        "tokens_seen": tokens_seen,
        "score": {
            "tokens": sum(len(line.token_ids) for line in lines),
            "mean_nll": mean,
            "perplexity": math.exp(mean) if mean is not None else None,
            "max_z": max(zs) if zs else None,
            "anomaly": any(line.anomaly for line in lines),
            "lines": [line.to_json() for line in lines],
        },
    }


def note_annotation(
    record_id: dict[str, Any], stream: str, prompt: str, text: str, generated: int, tokens_seen: int, meta: dict[str, Any]
) -> dict[str, Any]:
    """The `note` annotation: generated text about the stream's recent context (context rolled back after)."""
    return {
        "schema": SCHEMA_ID,
        "id": _id(record_id, "note"),
        "kind": "note",
        "stream": stream,
        "source": record_id,
        **meta,
        "tokens_seen": tokens_seen,
        "note": {"prompt": prompt, "text": text, "tokens_generated": generated},
    }


def _id(record_id: dict[str, Any], kind: str) -> str:
    return f"{record_id['topic']}/{record_id['partition']}/{record_id['offset']}/{kind}"


def encode(annotation: dict[str, Any]) -> bytes:
    """Canonical bytes of an annotation: sorted keys, no whitespace, so replays are byte-identical."""
    return json.dumps(annotation, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
