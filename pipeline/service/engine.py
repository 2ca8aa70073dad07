"""The engine: what all stream sessions of a process share, and the one way a record goes through it.

The engine holds the shared, stateless model, its tokenizer, the KV backend (`KVSlots` owns its capacity),
the scorer, the reference of normal, and the `Mode` (score or dialogue), picked once here from
`service.mode`. Per group of records, on the model thread (vLLM v1's split: the scheduler decides, the runner
executes, the outputs are applied, one way):

1. `prepare(session, record)` decides: the mode turns the record into a `RecordWork` (what goes to the model,
   what is skipped and why); a record already folded into the session (a replay) is marked and left alone.
2. `run(works)` executes: the mode's model step over every stream's records of the group; each record's
   `StepOutput` is filled (NLLs, a reply, or the error that isolated its stream).
3. `finish(work)` applies: the stream's verdict, failure count and offset move, and the record's annotations
   come out: the mode's own for a successful step, an `error` one for every problem (limits, a failed step, a
   quarantined stream), never silent.
"""

from __future__ import annotations

from typing import Any

from connectors.protocols import Record
from model.loader import LoadedModel
from model.stepper import SinkModel
from model.tokens import encode_text
from pipeline.service import annotations as ann
from pipeline.service.annotations import Problem
from pipeline.service.backend import KVHandle, make_backend
from pipeline.service.dialogue_mode import DialogueMode
from pipeline.service.normalizer import normalize_line
from pipeline.service.score_mode import ScoreMode
from pipeline.service.scoring import LineScorer
from pipeline.service.session import Mode, RecordWork, StreamSession, by_stream
from pipeline.service.sink_token import resolve_sink_token
from pipeline.service.templates import TemplateMemory, load_reference
from pipeline.settings import Settings


class Engine:
    """What all sessions of a process share: the model, its tokenizer, the mode, the scoring settings, the limits."""

    def __init__(self, lm: LoadedModel, settings: Settings):
        self.lm = lm
        self.runner = SinkModel(lm)
        self.settings = settings
        self.tokenizer = lm.tokenizer
        sc = settings.score
        self.scorer = LineScorer(lm.tokenizer, sc.top_tokens, sc.anomaly_z, sc.warmup_lines)
        self.meta = {
            "model": {"name": settings.model.name, "fingerprint": lm.fingerprint},
            "cache": {"sinks": settings.cache.sinks, "window": settings.cache.window},
        }
        # `cache.sink_token` (issue 13): fed into every new stream's cache before its text, never scored.
        vocab = lm.model.config.get_text_config().vocab_size
        self.sink_token = resolve_sink_token(lm.tokenizer, settings.cache.sink_token, vocab)
        # Tokens per group of records (`service.batch_tokens`, else the default for the model's device).
        self.batch_tokens = settings.service.batch_tokens_on(lm.device.type)
        # The mode, chosen here and nowhere else: `service.mode: dialogue` answers user turns, `score` scores lines.
        self.mode: Mode = (DialogueMode(lm, settings, self.meta) if settings.service.mode == "dialogue"
                           else ScoreMode(settings, self.tokenize, self.scorer, self.meta))
        # Where every stream's KV state lives: one pooled set of slots, or a SinkCache each (`backend`).
        self.backend = make_backend(lm, settings, pooled=self.mode.pooled)
        # Issue 18: the reference of normal (`templates.reference`), mined once; every partition's template
        # memory starts as a copy of it (`new_template_memory`).
        self.reference: TemplateMemory | None = None
        if self.mode.uses_templates and settings.templates.enabled and settings.templates.reference is not None:
            self.reference = load_reference(settings.templates.reference, settings.templates)

    def new_template_memory(self) -> TemplateMemory | None:
        """A partition's template memory: a copy of the reference, else empty; None when templates are off.

        Code with a reference as lines rather than a file (an evaluation) sets `engine.reference =
        pipeline.service.templates.build_reference(lines, settings.templates)` before making sessions; sessions
        of one partition share one memory (`StreamSession(engine, key, templates=memory)`)."""
        if not self.settings.templates.enabled or not self.mode.uses_templates:
            return None
        return self.reference.copy() if self.reference is not None else TemplateMemory(self.settings.templates)

    def new_cache(self) -> KVHandle:
        """A new stream's KV handle (a pool slot or a SinkCache, see `backend`); primed with the sink token
        when `cache.sink_token` is set. Raises `CacheFull` when `backend.slots` has no stream slot left."""
        handle = self.backend.new()
        if self.sink_token is not None:
            self.backend.prime(handle, self.sink_token)  # type: ignore[arg-type]  # its own backend's handle
        return handle

    def tokenize(self, line: str) -> list[int]:
        text = normalize_line(line) if self.settings.score.normalize else line
        return encode_text(self.tokenizer, text)  # input is data: special markers are scored as text

    # ---- decide, execute, apply (see the module docstring) -------------------------------------------------
    def prepare(self, session: StreamSession, record: Record) -> RecordWork:
        # Step 1
        if record.offset < session.counters.next_offset:
            return RecordWork(record, session, [], [], replay=True)
        return self.mode.prepare(session, record)

    def run(self, works: list[RecordWork]) -> None:
        # Step 2
        groups = by_stream(works)
        if groups:
            self.mode.run(groups)

    def finish(self, work: RecordWork) -> list[dict[str, Any]]:
        # Step 3
        session, record, step = work.session, work.record, work.step
        rid = {"topic": record.topic, "partition": record.partition, "offset": record.offset}
        if work.reset:  # the statistics part of a `sinkstream-reset` (see `StreamSession.reset`)
            session.restart_scoring()
        session.judge.verdict.record(record.offset)
        out: list[dict[str, Any]] = []
        problems = list(work.problems)
        if work.skip_score:
            pass
        elif step.error is not None:
            session.failures += 1
            problems.append(Problem(reason="quarantined" if session.quarantined else "model_step_failed",
                                    message=step.error, skipped_lines=len(work.lines), skipped_tokens=work.tokens))
        else:
            session.failures = 0
            out.extend(self.mode.annotate(session, work))
        if problems:
            seen = step.tokens_seen if step.tokens_seen is not None else session.tokens_seen
            out.append(ann.error_annotation(rid, session.key, problems, seen, self.meta))
        session.counters.next_offset = record.offset + 1
        return out

    def process(self, session: StreamSession, record: Record) -> list[dict[str, Any]]:
        """One record on its own (a group of one): prepare, run, finish. For tools and tests."""
        work = self.prepare(session, record)
        if work.replay:
            return []
        self.run([work])
        return self.finish(work)
