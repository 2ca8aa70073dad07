"""Per-line scoring: token NLLs of a line -> mean NLL, perplexity, z-score against the stream's running
statistics, anomaly flag and the most surprising tokens. The documents built from it live in
`pipeline.service.annotations`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

# Longest line text carried in an annotation (characters); the offset locates the full record.
MAX_TEXT = 240


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
    # Set by `pipeline.service.verdict.StreamJudge` (issue 18): the line's template in the long-term memory,
    # its combined score and whether it alerts.
    template: dict[str, Any] | None = None
    severity: str | None = None
    score: float | None = None
    alert: bool = False

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
            "template": self.template,
            "severity": self.severity,
            "score": self.score,
            "alert": self.alert,
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
