"""Typed settings: `config.yaml` first, then `SINKSTREAM_*` environment variables on top.

Nested fields use a double underscore in the environment: `SINKSTREAM_KAFKA__BOOTSTRAP_SERVERS`,
`SINKSTREAM_CACHE__WINDOW`, `SINKSTREAM_REDIS__PASSWORD`. Secrets are `SecretStr`, so they never appear in
logs or in `repr()`.

Precedence (highest first): explicit keyword arguments, environment variables, the YAML file
(`--config FILE`, else `$SINKSTREAM_CONFIG`, else `./config.yaml` if present), the defaults below.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    YamlConfigSettingsSource,
)

from model.heap import Heap
from pipeline.errors import UserError

_YAML_FILE: ContextVar[Path | None] = ContextVar("sinkstream_yaml_file", default=None)


def sinkstream_home() -> Path:
    """Folder for converted models, the embedded stack's state and downloaded sample data."""
    return Path(os.environ.get("SINKSTREAM_HOME", Path.home() / ".cache" / "sinkstream")).expanduser()


class _Section(BaseModel):
    """A settings section: misspelled keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class ModelSettings(_Section):
    # `smollm2-135m` (the packaged default), a local Hugging Face directory, or a `.gguf` file.
    name: str = "smollm2-135m"
    # `auto` picks CUDA when present, else CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # `auto`: bfloat16 on CUDA (float16 where bf16 is unsupported); on a CPU bfloat16 where it has AMX bf16
    # tiles (amx_bf16), else float32 (AVX512-BF16 alone is slower than fp32 in the row blocks exact resume
    # needs, docs/results.md 4.8). The choice and why go to the start-up log,
    # /status.json and sinkstream_build_info. Converted weights stay float32 on disk; the cast is at load.
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    # CPU threads for torch; 0 keeps torch's default.
    threads: int = Field(0, ge=0)
    # On a CPU, `keep`: freed memory stays in the process heap (glibc mmap/trim thresholds raised), so the large
    # activations of every forward are not fresh zero-filled pages each time (1.3-1.6x tokens/s on one thread,
    # docs/results.md 4.8); the process keeps its peak heap resident. `system`: glibc's defaults. See model/heap.py.
    heap: Heap = "keep"
    # bf16 on a CPU: the folder where the row plans measured at start are kept (model/row_stable.py: about 3-7 s
    # to measure, 1 s to read back). null: `row_plans` beside the models ($SINKSTREAM_HOME/row_plans). Name a
    # writable folder when that one is read-only (the chart: /tmp/sinkstream-row-plans); unwritable only means
    # every start measures again.
    row_plans: str | None = None
    # A LoRA adapter folder written by `sinkstream adapt` (null = none). Merged into the weights at start, so the
    # forward pass costs the same; it changes the model fingerprint, so snapshots taken without this adapter (or
    # with another) are refused and those streams start fresh.
    adapter: str | None = None


class CacheSettings(_Section):
    # Attention sinks: the first `sinks` tokens of every stream stay in the cache forever.
    sinks: int = Field(4, ge=0)
    # Rolling window: each token attends to the `window` most recent tokens, itself included.
    window: int = Field(1020, ge=1)
    # Tokens fed to the model per forward pass; results do not depend on it (exact chunked feed).
    chunk: int = Field(64, ge=1)
    # Dedicated sink token (issue 13; Xiao et al. 2023, sec. 3.3), off (null) by default: an id (int) or the
    # token's text (str, e.g. "<|sink|>", which must map to exactly one token). It is fed first into every new
    # stream's cache (also after `sinkstream-reset`), never scored, and kept as a sink; use `sinks: 1` with a
    # model pre-trained with that token (`sinkstream pretrain`). See pipeline/service/sink_token.py.
    sink_token: int | str | None = None

    @field_validator("sink_token")
    @classmethod
    def _sink_token(cls, v: int | str | None) -> int | str | None:
        # Environment variables arrive as text: a decimal string is a token id, anything else the token's text.
        if isinstance(v, str) and v.strip().isdigit():
            v = int(v)
        if isinstance(v, int) and v < 0:
            raise ValueError(f"expected a token id >= 0 or the token's text, got {v}")
        if isinstance(v, str) and not v:
            raise ValueError("expected a token id or the token's text, got an empty string (use null for off)")
        return v


class KafkaSettings(_Section):
    # Comma-separated `host:port` list. Empty means: use the embedded stack from `sinkstream stack up`.
    bootstrap_servers: str = ""
    # Topic(s) to read text from (comma-separated).
    input_topic: str = Field("sinkstream.input", min_length=1)
    # Topic annotations are published to; the record key is the stream key.
    output_topic: str = Field("sinkstream.annotations", min_length=1)
    # Consumer group; all replicas of the service share it.
    group_id: str = Field("sinkstream", min_length=1)
    # Static membership id. Defaults to the pod name (`$POD_NAME`) when set, so restarts do not rebalance.
    group_instance_id: str | None = None
    # Where a partition with no checkpoint and no committed offset starts.
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    # Most records returned by one poll; chunking never depends on it.
    max_poll_records: int = Field(256, ge=1)
    # Session timeout of the consumer group, in milliseconds.
    session_timeout_ms: int = Field(30000, gt=0)
    # Maximum time between polls before the member is evicted, in milliseconds.
    max_poll_interval_ms: int = Field(300000, gt=0)
    # SASL credentials, if the cluster needs them (used with SASL_PLAINTEXT / SASL_SSL).
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    # `PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512` or `OAUTHBEARER`.
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] = "PLAIN"
    # `PLAINTEXT`, `SSL`, `SASL_PLAINTEXT` or `SASL_SSL`.
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    # CA bundle (PEM file) that signs the brokers' certificates, for SSL / SASL_SSL; empty uses the system's.
    ssl_cafile: str | None = None
    # Client certificate and its key (PEM files) for mutual TLS; both or neither.
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    # Topic that also receives a copy of every record that got an `error` annotation (with the reasons in the
    # `sinkstream-reason` header); empty turns the dead-letter copy off.
    dead_letter_topic: str = ""


    @field_validator("bootstrap_servers")
    @classmethod
    def _servers(cls, v: str) -> str:
        for server in (s.strip() for s in v.split(",") if s.strip()):
            host, _, port = server.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"expected 'host:port[,host:port]' with ports 1-65535, got {server!r} in it")
        return v


class RedisSettings(_Section):
    # `redis://host:port/db`. Empty means: use the embedded stack from `sinkstream stack up`.
    url: str = ""
    # Password, if Redis requires one (kept out of the URL so it never gets logged).
    password: SecretStr | None = None
    # Prefix for every key sinkstream writes.
    key_prefix: str = Field("sinkstream", min_length=1)
    # Socket timeout for Redis calls, in seconds.
    socket_timeout_s: float = Field(10.0, gt=0)
    # CA bundle (PEM file) that signs the server's certificate, for a rediss:// URL; empty uses the system's.
    ssl_ca_certs: str | None = None


    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if v and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                "expected a URL starting with redis://, rediss:// or unix:// (or empty for the embedded stack)"
            )
        return v


class CheckpointSettings(_Section):
    # Checkpoint a partition after this many records since its last checkpoint.
    every_records: int = Field(500, ge=1)
    # ... or after this many seconds, whichever comes first. An idle partition rewrites its checkpoint this often
    # (no blob is written), which finds state Redis lost (FLUSHALL, failover, eviction) within one interval.
    every_seconds: float = Field(30.0, gt=0)
    # Sleep between snapshot writes of one checkpoint, in milliseconds, so large values do not stall Redis.
    pace_ms: float = Field(0.0, ge=0)
    # First retry delay after a failed checkpoint (store down), in seconds; doubles per failure ...
    retry_initial_s: float = Field(0.5, gt=0)
    # ... up to this cap.
    retry_max_s: float = Field(15.0, gt=0)
    # While checkpoints fail, a partition keeps processing until it holds this many records not covered by a
    # checkpoint, then pauses until one goes through (bounds replay work and memory during a Redis outage).
    max_uncheckpointed_records: int = Field(2000, ge=1)
    # Captured snapshots a checkpoint hands to the background writer at once; bounds host memory during a
    # checkpoint to this many stream states (plus one serialized blob), however many streams changed. Also the
    # most spilled sessions whose write the writer has not confirmed (beyond it, cold sessions stay resident).
    max_inflight_snapshots: int = Field(4, ge=1)


# `score.severity`'s default: the level names of syslog (RFC 5424), log4j/logback, Python logging and
# java.util.logging as they appear in lines, and Apache httpd's bracketed lowercase ones.
DEFAULT_SEVERITY: dict[str, float] = {
    **dict.fromkeys(("TRACE", "DEBUG", "INFO", "NOTICE", "[debug]", "[info]", "[notice]"), 0.0),
    **dict.fromkeys(("WARN", "WARNING", "[warn]"), 1.0),
    **dict.fromkeys(("ERROR", "ERR", "SEVERE", "[error]"), 4.0),
    **dict.fromkeys(("FATAL", "CRITICAL", "CRIT", "ALERT", "EMERG", "EMERGENCY", "PANIC", "[crit]", "[alert]",
                     "[emerg]"), 8.0),
}


class ScoreSettings(_Section):
    # Number of most surprising tokens reported per line.
    top_tokens: int = Field(3, ge=0)
    # A line is flagged when its z-score (mean NLL against the stream's running statistics) exceeds this.
    anomaly_z: float = 3.0
    # Lines scored before the running statistics are trusted enough to flag anomalies.
    warmup_lines: int = Field(20, ge=0)
    # Replace variable fields (timestamps, numbers, IPs, hex ids) with placeholders before scoring.
    normalize: bool = False
    # Target share of lines with `alert: true`: a line alerts when its combined `score` exceeds the stream's
    # running (1 - alert_rate) quantile of earlier scores (a t-digest, checkpointed with the stream).
    alert_rate: float = Field(0.001, gt=0.0, lt=1.0)
    # Lines of a stream scored before it alerts against its own threshold (the quantile needs about
    # 1 / alert_rate lines to mean much); until then it alerts against its partition's threshold (all its streams'
    # scores, with templates on), once the partition has scored this many lines: short keys alert too.
    alert_warmup_lines: int = Field(200, ge=0)
    # Weights of the combined `score` (docs/anomaly.md): surprise given the window (positive part of z) ...
    weight_surprise: float = Field(0.5, ge=0.0)
    # ... a template never seen before in this stream ...
    weight_new_stream: float = Field(1.0, ge=0.0)
    # ... a template never seen before in this partition ...
    weight_new_partition: float = Field(2.0, ge=0.0)
    # ... a template not in the reference of normal (`templates.reference`; 0 without one) ...
    weight_new_reference: float = Field(4.0, ge=0.0)
    # ... and rarity in the long-term memory (partition and reference), -log2((seen + 1) / (lines + 1)), in bits.
    weight_rarity: float = Field(0.25, ge=0.0)
    # The line's declared severity: the first of the line's first 16 whitespace-separated tokens that is a key
    # here (as is, or without surrounding punctuation such as `[]():,`; case-sensitive) adds its value to the
    # score. Levels that add 0 are keys too, so that a later word of the message ("... parity error corrected"
    # after `INFO`) is not taken for the level. Fatal levels add 8, more than the three novelty flags together
    # (7): a line that declares itself fatal outranks a merely new routine line. {} turns the term off.
    severity: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_SEVERITY))

    @field_validator("severity")
    @classmethod
    def _severity_words(cls, v: dict[str, float]) -> dict[str, float]:
        for word, weight in v.items():
            if not word or word != word.strip() or len(word.split()) != 1:
                raise ValueError(f"expected severity keys that are single words without spaces, got {word!r}")
            if not (weight >= 0.0 and math.isfinite(weight)):
                raise ValueError(f"expected a finite severity weight >= 0 for {word!r}, got {weight!r}")
        return v


class TemplateSettings(_Section):
    """Long-term memory of log templates (Drain), per partition and per stream (`pipeline.service.templates`)."""

    # Mine templates and give every scored line its template, novelty and combined score.
    enabled: bool = True
    # A text file of normal lines: its templates seed every partition's memory, so a line can be "not in the
    # reference" as well as new to its stream or partition. Null: no reference.
    reference: Path | None = None
    # A regular expression that names the session a reference line belongs to (its first group, else the whole
    # match), e.g. 'blk_-?[0-9]+' for HDFS block ids. With it the reference is also a set of normal sessions, and
    # every stream's verdict carries `profile_distance`: how far the stream's mix of templates so far is from the
    # nearest reference session's (0 = exactly a normal session's). Lines it does not match belong to no
    # session. Null: no sessions, no profile_distance.
    reference_session: str | None = None
    # Most distinct session profiles kept from the reference (the first ones met); bounds memory and the cost
    # per line.
    reference_max_profiles: int = Field(10_000, ge=1)
    # Most templates a partition remembers (the reference's not counted); the least recently seen goes first.
    partition_max_clusters: int = Field(2000, ge=1)
    # Most templates a stream keeps counts for; the least recently seen goes first.
    stream_max_clusters: int = Field(500, ge=1)
    # Drain: similarity (share of equal tokens) for a line to join a template.
    sim_th: float = Field(0.4, gt=0.0, le=1.0)
    # Drain: depth of the prefix tree (>= 3: root, token count, then depth - 2 leading tokens).
    depth: int = Field(4, ge=3)
    # Drain: most children of a tree node; past it, new tokens share the `<*>` child.
    max_children: int = Field(100, ge=2)

    @field_validator("reference_session")
    @classmethod
    def _session_pattern(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"expected a regular expression, got {v!r} ({exc})") from None
        return v


class NoteSettings(_Section):
    # Run the note prompt every this many tokens of a stream; 0 turns notes off.
    every_tokens: int = Field(0, ge=0)
    # Prompt appended to the stream's context; generation is rolled back afterwards.
    prompt: str = "\nSummarize the last lines in one sentence:"
    # Tokens generated per note (greedy).
    max_new_tokens: int = Field(32, ge=1)


class DialogueSettings(_Section):
    """Replies in `service.mode: dialogue`; the fields of `pipeline.dialogue.GenerationSettings` (a test keeps
    the two in step; this copy keeps torch out of the settings import)."""

    # Most tokens in one reply (the end-of-turn token included); a reply cut here is closed by the template.
    max_reply_tokens: int = Field(64, ge=1)
    # 0 = greedy (argmax). > 0 samples from softmax(logits / temperature), seeded per conversation turn.
    temperature: float = Field(0.0, ge=0.0)
    # Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1.0 = all).
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    # Seed of the per-turn generators when sampling (null: 0); with the turn number it fixes every draw.
    seed: int | None = None
    # System prompt of each conversation's first turn; null keeps the chat template's default.
    system_prompt: str | None = None


class ServiceSettings(_Section):
    # `score`: records are text, every line is scored (`score` annotations). `dialogue`: every record is a user
    # turn of the conversation named by its key; the reply is generated into that conversation's cache and
    # published as a `reply` annotation (settings: `dialogue`). Dialogue mode uses one cache per stream.
    mode: Literal["score", "dialogue"] = "score"
    # Most stream sessions kept in memory; colder ones are spilled to Redis and reloaded on demand.
    max_resident_streams: int = Field(64, ge=1)
    # KV slots reserved for whole-slot backups. Before a record longer than one forward (`cache.chunk` tokens)
    # the stream's state is copied aside so that a failure half-way rolls it back to the record's start: usually
    # only the few kept-window columns the record overwrites (no slot); a whole slot when a frame move falls
    # inside the record (about once per `cache.window` tokens of a stream). Idle stream slots are borrowed too;
    # when none is free such a record waits within its group. Pooled backend only; slot size: docs/operations.md.
    backup_slots: int = Field(4, ge=1)
    # Port for Prometheus metrics and health checks; 0 turns the HTTP endpoint off.
    metrics_port: int = Field(0, ge=0, le=65535)
    # Longest line scored as one: a longer line (terminated or not) is scored in pieces of at most this many
    # bytes, cut between UTF-8 characters; also the most bytes of an unterminated line kept between records.
    max_pending_bytes: int = Field(65536, ge=4)
    # Address the metrics/health/status HTTP endpoint binds to: 0.0.0.0 in a pod, 127.0.0.1 on a laptop.
    metrics_host: str = "127.0.0.1"
    # Tokens the model steps per group of records (many streams together); the service checks SIGTERM,
    # checkpoint cadence and poll age between groups. Larger groups batch better; smaller answer faster.
    # Unset: by device, 2048 on a CPU (compute-bound: larger groups gain nothing) and 16384 on CUDA (a packed
    # forward of a few thousand tokens leaves a large GPU mostly idle).
    batch_tokens: int | None = Field(None, ge=1, le=1_048_576)

    def batch_tokens_on(self, device_type: str) -> int:
        """`batch_tokens`, or the default for a model on `device_type` ("cpu", "cuda", ...)."""
        if self.batch_tokens is not None:
            return self.batch_tokens
        return 16_384 if device_type == "cuda" else 2048
    # Keep resident streams in one preallocated KV pool and step many streams per forward pass (RoPE and
    # GPT-2 style models; others always use one cache per stream). Memory: see docs/operations.md.
    kv_pool: bool = True
    # Bytes of one record that are read; the rest is skipped and reported in an `error` annotation.
    max_record_bytes: int = Field(1_048_576, ge=1)
    # Tokens of one record that are scored; lines past the budget are skipped and reported (`error`).
    max_record_tokens: int = Field(8192, ge=1)
    # Largest annotation published; a `score` annotation's per-line list is cut to fit (`lines_omitted`).
    # Keep it below the producer's and the topic's message size limit (1 MiB by default).
    max_annotation_bytes: int = Field(900_000, ge=4096, le=100 * 1024 * 1024)
    # A stream whose model step failed this many records in a row is quarantined (its records get `error`
    # annotations without touching the model) until the service restarts.
    quarantine_after: int = Field(3, ge=1)
    # Longest wait for one partition's final checkpoint on revoke or shutdown, in seconds.
    shutdown_checkpoint_s: float = Field(30.0, gt=0)
    # At start-up, how long to wait for the broker and Redis to answer (retrying with backoff, one log line
    # per miss) before giving up with exit code 2, in seconds; 0 gives up at the first miss. Lets a pod start
    # before, or during a restart of, its Redis or Kafka.
    startup_wait_s: float = Field(60.0, ge=0)
    # Close a stream idle this long in the input's own time (0 = never: endless streams): its `closed` verdict is
    # published, its state deleted from Redis and memory, and a later record of its key starts afresh with a
    # `context_reset` notice. Measured in `session_gap_unit` of the partition, never the wall clock, so a
    # replay closes the same sessions at the same records.
    session_gap: int = Field(0, ge=0)
    # `records`: offsets of the partition (a stream is closed once its partition moved this many records past
    # the stream's last one); `ms`: record timestamps (the partition's latest timestamp this many milliseconds
    # past the stream's last record; records without a timestamp do not move the clock).
    session_gap_unit: Literal["records", "ms"] = "records"
    # Closed keys remembered per partition (so that their next record gets a `context_reset` notice); the
    # oldest are forgotten first, and a key forgotten so starts afresh without a notice.
    closed_keys_remembered: int = Field(10_000, ge=0)


class Settings(BaseSettings):
    """All sinkstream settings. See config.yaml for a commented example."""

    model_config = SettingsConfigDict(env_prefix="SINKSTREAM_", env_nested_delimiter="__", extra="forbid")

    # `json` for production log collectors, `console` for humans.
    log_format: Literal["json", "console"] = "json"
    # Log level name: DEBUG, INFO, WARNING, ERROR or CRITICAL.
    log_level: str = "INFO"
    model: ModelSettings = ModelSettings()
    cache: CacheSettings = CacheSettings()
    kafka: KafkaSettings = KafkaSettings()
    redis: RedisSettings = RedisSettings()
    checkpoint: CheckpointSettings = CheckpointSettings()
    score: ScoreSettings = ScoreSettings()
    templates: TemplateSettings = TemplateSettings()
    note: NoteSettings = NoteSettings()
    dialogue: DialogueSettings = DialogueSettings()
    service: ServiceSettings = ServiceSettings()

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        if v.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError(f"log_level: expected DEBUG, INFO, WARNING, ERROR or CRITICAL, got {v!r}")
        return v.upper()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if _YAML_FILE.get() is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=_YAML_FILE.get()))
        return tuple(sources)


class UnknownSettingError(UserError, ValueError):
    """A `SINKSTREAM_*` environment variable names no setting."""


ENV_PREFIX = "SINKSTREAM_"
# SINKSTREAM_* variables read outside `Settings`: the settings file, the home folder, the Loghub samples.
NON_SETTINGS_ENV = frozenset({"SINKSTREAM_CONFIG", "SINKSTREAM_HOME", "SINKSTREAM_LOGHUB"})


def settings_env_names() -> set[str]:
    """Every `SINKSTREAM_*` variable that sets a field (`SINKSTREAM_LOG_LEVEL`, `SINKSTREAM_CACHE__WINDOW`, ...)."""
    names = set()
    for name, info in Settings.model_fields.items():
        section = info.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            names.add(f"{ENV_PREFIX}{name.upper()}")  # a whole section as JSON
            names.update(f"{ENV_PREFIX}{name.upper()}__{field.upper()}" for field in section.model_fields)
        else:
            names.add(f"{ENV_PREFIX}{name.upper()}")
    return names


def check_environment(environ: Mapping[str, str] | None = None) -> None:
    """Raise `UnknownSettingError` naming every `SINKSTREAM_*` variable that matches no setting (a typo would
    otherwise be silently ignored and the default used)."""
    environ = os.environ if environ is None else environ
    known = settings_env_names() | NON_SETTINGS_ENV
    unknown = sorted(k for k in environ if k.upper().startswith(ENV_PREFIX) and k.upper() not in known)
    if unknown:
        raise UnknownSettingError(
            f"unknown environment variable{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: expected "
            f"SINKSTREAM_<FIELD> or SINKSTREAM_<SECTION>__<FIELD> naming a setting (see config.yaml), or one of "
            f"{', '.join(sorted(NON_SETTINGS_ENV))}"
        )


def load_settings(path: str | os.PathLike | None = None, **overrides: Any) -> Settings:
    """Load settings from a YAML file (see module docstring for precedence) plus environment variables.

    Raises FileNotFoundError when an explicitly named file is missing, `UnknownSettingError` for a
    `SINKSTREAM_*` variable that names no setting, and pydantic's ValidationError for a bad value or an
    unknown key in the file (`describe_validation_error` makes one line of it).
    """
    check_environment()
    explicit = path or os.environ.get("SINKSTREAM_CONFIG")
    candidate = Path(explicit) if explicit else Path("config.yaml")
    if explicit and not candidate.exists():
        raise FileNotFoundError(f"config file {candidate} does not exist (from --config or $SINKSTREAM_CONFIG)")
    if candidate.exists():
        _check_yaml(candidate)
    token = _YAML_FILE.set(candidate if candidate.exists() else None)
    try:
        return Settings(**overrides)
    except SettingsError as exc:  # e.g. a section-level SINKSTREAM_CACHE that is not JSON
        raise UserError(f"invalid settings from the environment: {exc}") from None
    finally:
        _YAML_FILE.reset(token)


def _check_yaml(path: Path) -> None:
    """A config file must parse as YAML into a mapping with str keys; else one line naming the file."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise UserError(
            f"config file {path}: expected YAML{at}, got a syntax error ({getattr(exc, 'problem', exc)})"
        ) from None
    if doc is not None and not isinstance(doc, dict):
        raise UserError(
            f"config file {path}: expected a mapping of sections (cache:, kafka:, ...), got a {type(doc).__name__}"
        )

    def keys(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if not isinstance(key, str):
                    raise UserError(
                        f"config file {path}: expected text keys, got {key!r} under {where or 'the top level'}"
                    )
                keys(value, f"{where}.{key}" if where else key)

    keys(doc, "")


_SECRET_WORDS = ("password", "passwd", "secret", "token")


def _shown(field: str, value: Any) -> str:
    """`repr(value)` for an error message, with secrets left out: the value of a field whose name is (or looks
    like a misspelling of) a secret word, and the credentials of a URL (`redis://:pw@host` -> `redis://***@host`)."""
    import difflib

    name = field.rsplit(".", 1)[-1].lower()
    words = [*name.split("_"), name]
    if any(s in name for s in _SECRET_WORDS) or any(
        difflib.get_close_matches(w, _SECRET_WORDS, cutoff=0.75) for w in words
    ):
        return "<hidden>"
    if isinstance(value, str) and "://" in value and "@" in value:
        scheme, rest = value.split("://", 1)
        return repr(f"{scheme}://***@{rest.rsplit('@', 1)[1]}")
    if field.endswith("url") and isinstance(value, str) and "@" in value:  # a URL without a scheme: hide it all
        return "<hidden>"
    return repr(value)


def describe_validation_error(exc: ValidationError) -> str:
    """One line for a settings `ValidationError`: each field (dotted path), what was expected and what arrived
    (secrets and URL credentials hidden)."""
    parts = []
    for err in exc.errors(include_url=False):
        field = ".".join(str(x) for x in err["loc"]) or "settings"
        arrived = _shown(field, err.get("input"))
        if err["type"] == "extra_forbidden":
            parts.append(f"{field}: unknown key (misspelled?), got {arrived}")
        elif err["type"] == "missing":
            parts.append(f"{field}: required, got nothing")
        else:
            expected = err["msg"].removeprefix("Value error, ")
            parts.append(f"{field}: {expected}; got {arrived}")
    return f"invalid settings: {'; '.join(parts)}"
