"""What a sink cache remembers: a streaming recall task in the spirit of StreamEval / LongEval "lines".

A stream of lines `line <id>: REGISTER_CONTENT is <n>` (n: a random 5-digit number) is fed through a cache.
Every `every` lines, after a warm-up, the model is asked for the content of the line `d` lines back, for
every `d` in `distances`. Each question runs on the cache as it is at that moment and is then rolled back
(`SinkCache.state()/restore()`), so questions never enter the stream.

Scoring is teacher-forced (no sampling, no free generation loop), and cheaper than generating, which is why:
the question is fed once, then each candidate number's digits but the last are fed from that state (and
rolled back), giving log p(candidate | question) for the true number and `distractors` other lines' numbers.
- `correct`: every digit of the true number is the argmax given the question and the digits before it,
  which is exactly when greedy generation would produce the number (its 5 digit tokens);
- `chosen`: the true number has the highest log-probability among itself and the distractors
  (chance 1 / (distractors + 1));
- `logprob`: log p(true number | question); chance for 5 random digits is 5 log(1/10) = -11.5 nats.

The distance of a question is counted in tokens, from the number's first digit to the token that predicts
the answer's first digit. With S sinks and window W the number is visible (for that prediction) while the
distance is at most W-1; the line's tag (`line <id>:`) leaves the window a few tokens earlier.

Prompts (`prompt`):
- `chat` (default): a user turn in the model's chat template, `What is the REGISTER_CONTENT in line <id>?`,
  and the assistant's answer opened with `The REGISTER_CONTENT in line <id> is <`;
- `cue`: the line's own prefix again, `line <id>: REGISTER_CONTENT is <` (a bare copy task; SmolLM2-135M
  reads it as a new line and makes a number up, so it scores worse than `chat`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel

from model.loader import LoadedModel
from model.stepper import SinkModel
from pipeline.dialogue.template import ChatTurns

Prompt = Literal["cue", "chat"]
POLICIES = ("sink", "window", "dense")
REGIONS = ("inside", "edge", "evicted")
EDGE_FRACTION = 0.75  # "near the edge" starts at 0.75 W
# Line distances as fractions of the window (in lines); the window is about W / tokens_per_line lines.
DISTANCE_FRACTIONS = (0.05, 0.15, 0.3, 0.45, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.2, 1.35, 1.6, 2.0, 2.5)


@dataclass(frozen=True)
class RecallLine:
    key: int
    value: int
    prefix_ids: list[int]  # `line <key>: REGISTER_CONTENT is <`
    value_ids: list[int]  # the digits of `value`
    end_ids: list[int]  # `>` and the newline

    @property
    def ids(self) -> list[int]:
        return [*self.prefix_ids, *self.value_ids, *self.end_ids]


def prefix_text(key: int) -> str:
    return f"line {key}: REGISTER_CONTENT is <"


def build_lines(tokenizer, count: int, seed: int = 0) -> list[RecallLine]:
    """`count` lines with ids 1..count and random 5-digit contents, tokenized piece by piece."""
    rng = random.Random(seed)
    newline = tokenizer(">\n", add_special_tokens=False)["input_ids"]
    lines = []
    for key in range(1, count + 1):
        value = rng.randrange(10_000, 100_000)
        lines.append(
            RecallLine(
                key,
                value,
                tokenizer(prefix_text(key), add_special_tokens=False)["input_ids"],
                tokenizer(str(value), add_special_tokens=False)["input_ids"],
                newline,
            )
        )
    return lines


def question(tokenizer, line: RecallLine, prompt: Prompt, chat: ChatTurns | None) -> tuple[list[int], list[int]]:
    """(question ids, answer ids) asking for `line`'s content."""
    if prompt == "cue":
        return list(line.prefix_ids), list(line.value_ids)
    if chat is None:
        raise ValueError("prompt 'chat' needs the model's chat template (ChatTurns), got None")
    user = chat.user_ids(f"What is the REGISTER_CONTENT in line {line.key}?", first=False)
    opener = tokenizer(f"The REGISTER_CONTENT in line {line.key} is <", add_special_tokens=False)["input_ids"]
    return [*user, *opener], list(line.value_ids)


class QuestionResult(BaseModel):
    query_line: int  # lines fed before the question
    target_line: int  # key of the line asked about
    d_lines: int  # how many lines back (1 = the last line)
    d_tokens: int  # from the number's first digit to the token predicting the answer's first digit
    value_visible: bool  # the number's first digit is still attended at that prediction
    tag_visible: bool  # the line's `line <id>:` tag is still attended
    correct: bool  # greedy generation reproduces the number
    chosen: bool  # the true number scores highest among the candidates
    candidates: int  # the true number plus distractors
    logprob: float  # log p(number | question), nats


class Bucket(BaseModel):
    n: int
    accuracy: float | None  # greedy exact match
    choice_accuracy: float | None  # true number ranked first among the candidates
    mean_logprob: float | None


class DistanceRow(Bucket):
    d_lines: int
    mean_d_tokens: float


class PolicyResult(BaseModel):
    name: str
    label: str
    sinks: int
    window: int | None  # None: dense
    questions: list[QuestionResult]
    by_distance: list[DistanceRow]
    by_region: dict[str, Bucket]  # inside [0, 0.75 W), edge [0.75 W, W), evicted [W, ...) in tokens
    stopped_at_line: int | None  # dense only: the stream outgrew the model's positions here


class RecallReport(BaseModel):
    """`sinkstream eval recall` result document (eval_recall.json)."""

    model: str
    prompt: Prompt
    sinks: int
    window: int
    lines: int
    every: int
    warmup: int
    distances: list[int]
    tokens_per_line: float
    stream_tokens: int
    seed: int
    scoring: str
    distractors: int
    chance_exact: float
    chance_choice: float
    policies: list[PolicyResult]


def auto_distances(window: int, tokens_per_line: float) -> list[int]:
    """Line distances spanning 0.05 W to 2.5 W in tokens (always including 1)."""
    lines = window / tokens_per_line
    return sorted({1, *(max(1, round(f * lines)) for f in DISTANCE_FRACTIONS)})


def region(d_tokens: int, window: int) -> str:
    if d_tokens >= window:
        return "evicted"
    return "edge" if d_tokens >= EDGE_FRACTION * window else "inside"


def _bucket(rows: Sequence[QuestionResult]) -> Bucket:
    n = len(rows)
    if not n:
        return Bucket(n=0, accuracy=None, choice_accuracy=None, mean_logprob=None)
    return Bucket(
        n=n,
        accuracy=sum(r.correct for r in rows) / n,
        choice_accuracy=sum(r.chosen for r in rows) / n,
        mean_logprob=sum(r.logprob for r in rows) / n,
    )


def summarize(questions: Sequence[QuestionResult], window: int) -> tuple[list[DistanceRow], dict[str, Bucket]]:
    by_d: dict[int, list[QuestionResult]] = {}
    for q in questions:
        by_d.setdefault(q.d_lines, []).append(q)
    rows = [
        DistanceRow(d_lines=d, mean_d_tokens=sum(q.d_tokens for q in qs) / len(qs), **_bucket(qs).model_dump())
        for d, qs in sorted(by_d.items())
    ]
    regions = {name: _bucket([q for q in questions if region(q.d_tokens, window) == name]) for name in REGIONS}
    return rows, regions


def policy_cache(policy: str, sinks: int, window: int) -> tuple[int, int | None, str]:
    """(sinks, window, label) of a policy at the same cache size S+W: StreamingLLM, window only, dense."""
    if policy == "sink":
        return sinks, window, f"StreamingLLM {sinks}+{window}"
    if policy == "window":
        return 0, sinks + window, f"window 0+{sinks + window}"
    if policy == "dense":
        return 0, None, "dense (no eviction)"
    raise ValueError(f"policy: expected one of {POLICIES}, got {policy!r}")


@torch.inference_mode()
def score_candidates(
    model: SinkModel, cache, q_ids: Sequence[int], candidates: Sequence[Sequence[int]]
) -> tuple[list[float], torch.Tensor]:
    """log p(candidate | question) for each candidate, and the (A, V) logits that predict candidates[0].

    The cache is returned to its state before the call (questions never enter the stream).
    """
    before = cache.state()
    try:
        first = torch.log_softmax(model.step(cache, list(q_ids))[-1], -1)  # (V,) predicts digit 1
        after_question = cache.state()
        scores, true_rows = [], None
        for cand in candidates:
            logp = float(first[cand[0]])
            rows = first[None]  # (1, V)
            if len(cand) > 1:
                more = model.step(cache, list(cand[:-1]))  # (A - 1, V) predict digits 2..A
                cache.restore(after_question)
                logp += float(torch.log_softmax(more, -1).gather(1, torch.tensor(cand[1:])[:, None]).sum())
                rows = torch.cat([rows, more])  # (A, V)
            scores.append(logp)
            if true_rows is None:
                true_rows = rows
    finally:
        cache.restore(before)
    assert true_rows is not None  # set by the first candidate; there is at least one
    return scores, true_rows


def run_policy(
    lm: LoadedModel,
    lines: Sequence[RecallLine],
    policy: str,
    sinks: int,
    window: int,
    chunk: int,
    distances: Sequence[int],
    warmup: int,
    every: int,
    prompt: Prompt = "chat",
    distractors: int = 9,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> PolicyResult:
    """Stream `lines` through one policy's cache and ask every question; see the module docstring."""
    model = SinkModel(lm)
    s, w, label = policy_cache(policy, sinks, window)
    cache = model.new_cache(sinks=s, window=w, max_chunk=chunk)
    visible_span = math.inf if w is None else w  # a window token is attended while its distance is <= w - 1
    tokenizer = lm.tokenizer
    chat = ChatTurns.from_tokenizer(tokenizer) if prompt == "chat" else None
    limit = lm.arch.max_positions if w is None else None
    pending: list[int] = []
    starts: list[tuple[int, int]] = []  # stream index of each line's first token and first digit
    questions: list[QuestionResult] = []
    stopped = None

    def flush() -> None:
        for start in range(0, len(pending), cache.max_chunk):
            model.step(cache, pending[start : start + cache.max_chunk])
        pending.clear()

    seen = 0
    for i, line in enumerate(lines):
        starts.append((seen, seen + len(line.prefix_ids)))
        pending.extend(line.ids)
        seen += len(line.ids)
        fed = i + 1
        if fed < warmup or (fed - warmup) % every:
            continue
        asked = [(d, question(tokenizer, lines[fed - d], prompt, chat)) for d in distances if d <= fed]
        longest = max(len(q) + len(a) for _, (q, a) in asked)
        if limit is not None and seen + longest > limit:
            stopped = fed
            break
        flush()
        for d, (q_ids, a_ids) in asked:
            target = fed - d  # index of the line asked about
            query_at = seen + len(q_ids) - 1  # stream index of the token predicting the first digit
            others = [
                ln.value_ids for k, ln in enumerate(lines[:fed]) if k != target and ln.value != lines[target].value
            ]
            rng = random.Random(seed * 1_000_003 + fed * 1_009 + d)
            candidates = [a_ids, *rng.sample(others, min(distractors, len(others)))]
            scores, rows = score_candidates(model, cache, q_ids, candidates)
            line_start, value_start = starts[target]
            d_tokens = query_at - value_start
            questions.append(
                QuestionResult(
                    query_line=fed,
                    target_line=lines[target].key,
                    d_lines=d,
                    d_tokens=d_tokens,
                    value_visible=d_tokens <= visible_span - 1,
                    tag_visible=query_at - line_start <= visible_span - 1,
                    correct=bool(torch.equal(rows.argmax(-1).cpu(), torch.tensor(a_ids))),
                    chosen=max(range(len(scores)), key=scores.__getitem__) == 0,
                    candidates=len(candidates),
                    logprob=scores[0],
                )
            )
            if progress is not None:
                progress(1)
    by_distance, by_region = summarize(questions, window)
    return PolicyResult(
        name=policy, label=label, sinks=s, window=w, questions=questions, by_distance=by_distance,
        by_region=by_region, stopped_at_line=stopped,
    )


def plan(lm: LoadedModel, window: int, queries: int, every: int, distances: Sequence[int] | None, seed: int):
    """Lines, distances and warm-up for `queries` question points `every` lines apart."""
    probe = build_lines(lm.tokenizer, 200, seed)
    tokens_per_line = sum(len(line.ids) for line in probe) / len(probe)
    dists = sorted(set(distances)) if distances else auto_distances(window, tokens_per_line)
    warmup = max(dists)
    count = warmup + (queries - 1) * every
    return build_lines(lm.tokenizer, count, seed), dists, warmup


def recall_experiment(
    lm: LoadedModel,
    model_name: str,
    sinks: int = 4,
    window: int = 256,
    chunk: int = 64,
    queries: int = 12,
    every: int = 4,
    distances: Sequence[int] | None = None,
    prompt: Prompt = "chat",
    distractors: int = 9,
    policies: Sequence[str] = POLICIES,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> RecallReport:
    """Run the recall task for each policy (same lines, same questions); return the report document."""
    if lm.tokenizer is None:
        raise ValueError("the recall task needs the model's tokenizer, got a model without one")
    lines, dists, warmup = plan(lm, window, queries, every, distances, seed)
    results = [
        run_policy(lm, lines, p, sinks, window, chunk, dists, warmup, every, prompt, distractors, seed, progress)
        for p in policies
    ]
    digits = len(lines[0].value_ids) if lines else 5
    return RecallReport(
        model=model_name,
        prompt=prompt,
        sinks=sinks,
        window=window,
        lines=len(lines),
        every=every,
        warmup=warmup,
        distances=dists,
        tokens_per_line=sum(len(line.ids) for line in lines) / len(lines),
        stream_tokens=sum(len(line.ids) for line in lines),
        seed=seed,
        scoring=(
            "teacher-forced: correct = every digit of the number is the argmax given the question and the digits "
            "before it (= greedy generation reproduces the number); chosen = the true number has the highest "
            f"log p among itself and {distractors} other lines' numbers; questions are rolled back and never enter "
            "the stream"
        ),
        distractors=distractors,
        chance_exact=1 / 90_000 if digits == 5 else float("nan"),
        chance_choice=1 / (distractors + 1),
        policies=results,
    )
