"""The combined per-line anomaly `score`, the alert threshold at a target rate, and a stream's running verdict.

**The score** of a line (issue 18; the experiments behind the weights are in docs/anomaly.md)::

    score = w_surprise       * max(z, 0)                   surprise given the window (the LM, against the
                                                            stream's running mean NLL statistics)
          + w_new_stream     * [template unseen in this stream]
          + w_new_partition  * [template unseen in this partition]
          + w_new_reference  * [template not in the reference of normal]       (only with `templates.reference`)
          + w_rarity         * -log2((seen + 1) / (lines + 1))   rarity in the long-term memory, in bits:
                                   seen = lines of the partition and of the reference with this template
                                   before this line, lines = all lines of the partition and the reference
          + severity[level]                                 the line's declared level (`line_severity`): by
                                                            default 0 up to INFO, WARN 1, ERROR 4, FATAL 8

with the weights `score.weight_*` and `score.severity`. z is None on a stream's first two lines (counted 0).
Without templates (`templates.enabled: false`) only the surprise and severity terms are left. The novelty terms
fix what the LM alone gets wrong on real alerts: a burst of one alert becomes unsurprising to the LM once it is in
the window, but its template stays "not in the reference" and rare in the long-term memory; and generic surprise
(a rare word in a routine line) is one term among several. The severity term is what the application itself says
about the line: a fatal level outweighs the three novelty flags together, and among lines of one level the other
terms decide (on BGL, whose labels are largely a severity taxonomy, novelty orders the FATAL lines:
docs/anomaly.md).

**The alert.** `alert: true` when the line's score exceeds the stream's running (1 - `score.alert_rate`)
quantile of its earlier scores, after `score.alert_warmup_lines` lines. The quantile learns from the lines
after `score.warmup_lines` (z's own warm-up): before it, z rests on a handful of lines and every template is
new, and those first scores would hold the threshold above the stream's settled ones (on a long normal
stream, learning from line 0 gave half the target rate; from line 20, 0.87-1.02 of it). A stream that has not
scored `alert_warmup_lines` lines yet (every line of a short key: an HDFS block, a request id, a VM instance)
alerts against its **partition's** threshold instead: the (1 - `alert_rate`) quantile of the scores of every
line of the partition, all streams together, once the partition has scored `alert_warmup_lines` lines. It lives
in the partition's template memory (`TemplateMemory.threshold`, checkpointed beside the manifest), so it exists
only with templates on (`templates.enabled`, the default). Both thresholds are `AlertThreshold`s
(`pipeline.service.threshold`: a deterministic t-digest, exact across a resume).

**The verdict** (`Verdict`): the stream's running aggregate, carried by every `score` annotation so that a
subscriber can rank keys without re-reading history. Its `key_score` ranks keys (sessions: an HDFS block, a
request id)::

    key_score = profile_distance                       distance of the key's template counts so far to the
                                                       nearest normal session of the reference (0 without
                                                       `templates.reference_session`; `TemplateMemory`)
              + 1 if any line's template is not in the reference
              + 0.1 * s / (1 + s), s = max(max_score, 0)   the highest line score, squashed into [0, 0.1): it
                                                       orders keys the first two terms leave tied

On HDFS sessions (docs/anomaly.md) the first two terms are the event-count-vector and new-event detectors of
the literature, computed online per key; the line scores only break ties.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pipeline.service.scoring import LineScore
from pipeline.service.templates import StreamTemplates, TemplateMemory
from pipeline.service.threshold import AlertThreshold
from pipeline.settings import ScoreSettings, TemplateSettings

SEVERITY_SCAN_TOKENS = 16  # a level is looked for among a line's first tokens (after them it is message text)
_PUNCTUATION = "[](){}<>:,;|\"'"


def line_severity(text: str, levels: dict[str, float]) -> str | None:
    """The line's declared level: the first of its first `SEVERITY_SCAN_TOKENS` whitespace-separated tokens that
    is a key of `levels`, as is or without surrounding punctuation (case-sensitive); None if none is."""
    if not levels:
        return None
    for token in text.split(maxsplit=SEVERITY_SCAN_TOKENS)[:SEVERITY_SCAN_TOKENS]:
        if token in levels:
            return token
        bare = token.strip(_PUNCTUATION)
        if bare in levels:
            return bare
    return None


def combined_score(
    settings: ScoreSettings, z: float | None, *, new_stream: bool | None = None, new_partition: bool | None = None,
    new_reference: bool | None = None, seen: int = 0, lines: int = 0, severity: str | None = None,
) -> float:
    """The documented formula (module docstring); None novelty flags (no templates, no reference) count 0."""
    score = settings.weight_surprise * max(z or 0.0, 0.0)
    if severity is not None:
        score += settings.severity.get(severity, 0.0)
    if new_stream:
        score += settings.weight_new_stream
    if new_partition:
        score += settings.weight_new_partition
    if new_reference:
        score += settings.weight_new_reference
    if new_partition is not None:
        score += settings.weight_rarity * -math.log2((seen + 1) / (lines + 1))
    return score


class Verdict(BaseModel):
    """A stream's running verdict: what it sent and how anomalous it was, after its latest record.

    One model for both places it is published: every `score` annotation carries it (so a subscriber can rank
    keys without re-reading history), and a `closed` annotation (`service.session_gap`) carries the final one.
    The session keeps it (in its snapshot); see `StreamJudge`.
    """

    model_config = ConfigDict(extra="forbid")

    records: int = Field(0, ge=0, description="Records of the stream in this session")
    lines: int = Field(0, ge=0, description="Lines scored")
    tokens: int = Field(0, ge=0, description="Tokens scored")
    anomalous_lines: int = Field(0, ge=0, description="Lines flagged as anomalous (`anomaly`: z above score.anomaly_z)")
    max_z: float | None = Field(None, description="Highest line z-score of the session")
    max_line_nll: float | None = Field(None, description="Highest mean NLL (nats) of one line of the session")
    first_offset: int = Field(0, ge=0, description="Offset of the session's first record in its partition")
    last_offset: int = Field(0, ge=0, description="Offset of the session's last record in its partition")
    alerts: int = Field(0, ge=0, description="Lines with `alert: true` so far")
    max_score: float | None = Field(None, description="Highest line `score` so far")
    max_score_line: int | None = Field(None, ge=0, description="`line_no` of that line (the first if tied)")
    last_alert_line: int | None = Field(None, ge=0, description="`line_no` of the last line that alerted")
    new_in_stream: int = Field(0, ge=0, description="Lines whose template was new to the stream")
    new_in_partition: int = Field(0, ge=0, description="Lines whose template was new to the partition")
    not_in_reference: int = Field(0, ge=0, description="Lines whose template is not in the reference of normal "
                                                       "(0 without `templates.reference`)")
    profile_distance: float | None = Field(
        None, ge=0.0, le=1.0, description="Distance of the stream's template counts so far to the nearest normal "
        "session of the reference: 1 - weighted Jaccard, 0 = exactly a normal session's mix of templates (null "
        "without `templates.reference_session`); at a session's last line, the whole session's")
    key_score: float | None = Field(
        None, ge=0.0, description="The key's anomaly ranking: profile_distance (0 if null) + 1 if any template "
        "was not in the reference + 0.1 * s / (1 + s) with s = max(max_score, 0) (null before a scored line)")

    def record(self, offset: int) -> None:
        """One more record of the stream (scored or not)."""
        if not self.records:
            self.first_offset = offset
        self.records += 1
        self.last_offset = offset

    def line(self, line: LineScore, new_stream: bool, new_partition: bool, new_reference: bool) -> None:
        """One more scored line (after `StreamJudge.judge` filled its score and alert)."""
        self.lines += 1
        self.tokens += len(line.token_ids)
        self.anomalous_lines += line.anomaly
        mean = line.mean_nll
        if line.z is not None and (self.max_z is None or line.z > self.max_z):
            self.max_z = line.z
        if mean is not None and (self.max_line_nll is None or mean > self.max_line_nll):
            self.max_line_nll = mean
        if line.alert:
            self.alerts += 1
            self.last_alert_line = line.line_no
        if line.score is not None and (self.max_score is None or line.score > self.max_score):
            self.max_score, self.max_score_line = line.score, line.line_no
        self.new_in_stream += new_stream
        self.new_in_partition += new_partition
        self.not_in_reference += new_reference

    def settle(self, profile_distance: float | None) -> None:
        """After a record's lines (`StreamJudge.settle`): the per-key terms, from the stream's state after them."""
        self.profile_distance = profile_distance
        self.key_score = key_score(profile_distance, self.not_in_reference, self.max_score)


def key_score(profile_distance: float | None, not_in_reference: int, max_score: float | None) -> float:
    """The documented per-key ranking (module docstring)."""
    top = max(max_score or 0.0, 0.0)
    return (profile_distance or 0.0) + (1.0 if not_in_reference > 0 else 0.0) + 0.1 * top / (1.0 + top)


class StreamJudge:
    """What a stream owns for its combined scores: its template counts, alert threshold and verdict."""

    def __init__(self, score: ScoreSettings, templates: TemplateSettings):
        self.score_settings = score
        self.templates: StreamTemplates | None = (
            StreamTemplates(templates.stream_max_clusters) if templates.enabled else None
        )
        self.threshold = AlertThreshold()
        self.verdict = Verdict()

    def judge(self, line: LineScore, partition: TemplateMemory | None) -> None:
        """Fill `line`'s template, score and alert from the memories, then fold the line into them."""
        sc = self.score_settings
        new_stream = new_partition = new_reference = False
        line.severity = line_severity(line.text, sc.severity)
        if partition is not None and self.templates is not None:
            match = partition.observe(line.text)
            seen_stream = self.templates.observe(match.id)
            new_stream, new_partition = seen_stream == 0, match.seen_partition == 0
            new_reference = partition.ref_lines > 0 and match.seen_reference == 0
            line.template = {
                "id": match.id, "text": match.text, "seen_stream": seen_stream,
                "seen_partition": match.seen_partition,
                "seen_reference": match.seen_reference if partition.ref_lines else None,
            }
            line.score = combined_score(sc, line.z, new_stream=new_stream, new_partition=new_partition,
                                        new_reference=new_reference, seen=match.seen_partition + match.seen_reference,
                                        lines=match.partition_lines + partition.ref_lines, severity=line.severity)
        else:
            line.score = combined_score(sc, line.z, severity=line.severity)
        if line.line_no >= sc.alert_warmup_lines:
            line.alert = self.threshold.exceeds(line.score)
        else:  # a young (or short) stream: against its partition's scores (module docstring)
            shared = partition.threshold if partition is not None else None
            line.alert = shared is not None and shared.n >= sc.alert_warmup_lines and shared.exceeds(line.score)
        if line.line_no >= sc.warmup_lines:  # before, z rests on too few lines and every template is new
            self.threshold.add(line.score, sc.alert_rate)
        if partition is not None:
            partition.threshold.add(line.score, sc.alert_rate)
        self.verdict.line(line, new_stream, new_partition, new_reference)

    def settle(self, partition: TemplateMemory | None) -> None:
        """After the lines of a record: the verdict's profile distance and key score. Once a record, not once a
        line: only the record's verdict is published, and the distance costs a pass over the reference's
        profiles."""
        distance = None
        if partition is not None and self.templates is not None:
            distance = partition.profile_distance(self.templates.counts)
        self.verdict.settle(distance)

    def to_json(self) -> dict[str, Any]:
        return {"templates": None if self.templates is None else self.templates.to_json(),
                "threshold": self.threshold.to_json(), "verdict": self.verdict.model_dump(mode="json")}

    @classmethod
    def from_json(cls, score: ScoreSettings, templates: TemplateSettings, data: dict[str, Any]) -> StreamJudge:
        judge = cls(score, templates)
        if judge.templates is not None and data.get("templates") is not None:
            judge.templates = StreamTemplates.from_json(templates.stream_max_clusters, data["templates"])
        judge.threshold = AlertThreshold.from_json(data["threshold"])
        judge.verdict = Verdict.model_validate(data["verdict"])
        return judge
