"""`AlertThreshold`: the running (1 - rate) quantile of a stream's (or a partition's) combined scores.

The quantile is estimated by a t-digest from Apache DataSketches (`datasketches.tdigest_double`). Its KLL, REQ
and classic quantiles sketches were ruled out: they compact with random coin flips, so two services fed the same
lines disagree, and exact resume could not hold. The t-digest is deterministic, but merging its buffer (which
serializing and querying do) changes what it holds, so it is fed in batches of `THRESHOLD_BATCH` scores,
compressed, queried and serialized only at batch ends; the scores of the current batch are kept beside it. A
snapshot taken anywhere thus restores a threshold that behaves exactly as one that never stopped. Where the two
thresholds are used: `pipeline.service.verdict`.
"""

from __future__ import annotations

import base64
import math
from typing import Any

from datasketches import tdigest_double
from pydantic import BaseModel, ConfigDict, Field

THRESHOLD_BATCH = 32  # scores folded into the t-digest at a time (its threshold moves at batch ends only)
DIGEST_K = 200  # t-digest compression: more centroids, better tails


class ThresholdState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: int = Field(ge=0, description="Scores seen")
    pending: list[float] = Field(description="Scores of the current batch, not yet in the digest")
    digest: str | None = Field(description="The t-digest at the last batch end (DataSketches bytes, base64)")
    threshold: float | None = Field(description="Its (1 - alert_rate) quantile then")


class AlertThreshold:
    """The running (1 - rate) quantile of a stream's scores (module docstring); deterministic."""

    def __init__(self) -> None:
        self.n = 0
        self.pending: list[float] = []
        self.digest: tdigest_double | None = None
        self.blob: bytes | None = None  # serialized at the last batch end
        self.threshold: float | None = None

    def exceeds(self, score: float) -> bool:
        return self.threshold is not None and score > self.threshold

    def add(self, score: float, rate: float) -> None:
        self.n += 1
        self.pending.append(score)
        if len(self.pending) < THRESHOLD_BATCH:
            return
        if self.digest is None:
            self.digest = tdigest_double(DIGEST_K)
        for value in self.pending:
            self.digest.update(value)
        self.pending = []
        self.digest.compress()
        self.threshold = float(self.digest.get_quantile(1.0 - rate))
        self.blob = self.digest.serialize()

    def state(self) -> ThresholdState:
        return ThresholdState(n=self.n, pending=list(self.pending), threshold=self.threshold,
                              digest=None if self.blob is None else base64.b64encode(self.blob).decode())

    def to_json(self) -> dict[str, Any]:
        return self.state().model_dump(mode="json")

    @classmethod
    def from_json(cls, data: ThresholdState | dict[str, Any]) -> AlertThreshold:
        st = data if isinstance(data, ThresholdState) else ThresholdState.model_validate(data)
        if len(st.pending) >= THRESHOLD_BATCH or not all(math.isfinite(v) for v in st.pending):
            raise ValueError(f"threshold: expected fewer than {THRESHOLD_BATCH} finite pending scores")
        out = cls()
        out.n, out.pending, out.threshold = st.n, list(st.pending), st.threshold
        if st.digest is not None:
            out.blob = base64.b64decode(st.digest, validate=True)
            out.digest = tdigest_double.deserialize(out.blob)
        return out
