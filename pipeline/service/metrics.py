"""Prometheus metrics, the health endpoints and the status page of the service.

HTTP (`service.metrics_host`:`service.metrics_port`):
- `/metrics`: Prometheus text format (the names and their meaning are listed in `deploy/README.md`).
- `/healthz`: 200 while the poll loop turns (liveness).
- `/readyz`: 200 when the model is loaded, the state store answered, Kafka answers and every assigned
  partition was claimed and restored; 503 while Redis or Kafka is unreachable.
- `/status.json`: what the status page shows (`StatusBoard.snapshot()` plus `ready`).
- `/` : a static HTML status page (package data `pipeline/service/static/status.html`: partitions with lag
  and checkpoint age, resident streams, the most anomalous recent lines per stream) that reads `/status.json`
  every 2 s; a new section is a container plus a renderer there.

One WSGI application (`app`) serves them: `/metrics` is prometheus_client's own `make_wsgi_app()`, the rest
sits beside it; `serve` runs it on the standard library's threading WSGI server.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from http import HTTPStatus
from importlib import metadata
from importlib.resources import files
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import Counter, Gauge, Histogram, Info, make_wsgi_app

RECORDS = Counter("sinkstream_records_total", "Input records processed (annotated or answered with an error)")
TOKENS = Counter("sinkstream_tokens_total", "Tokens fed to the model")
ANNOTATIONS = Counter("sinkstream_annotations_total", "Annotations published", ["kind"])
ANOMALIES = Counter("sinkstream_anomalous_lines_total", "Lines flagged as anomalous")
RESIDENT = Gauge("sinkstream_resident_streams", "Stream sessions in memory")
STREAMS_SPILLED = Counter("sinkstream_streams_spilled_total", "Sessions moved out of memory to the state store")
STREAMS_RELOADED = Counter("sinkstream_streams_reloaded_total", "Sessions read back from the state store")
EVICTIONS = Counter("sinkstream_cache_evictions_total", "Tokens evicted from stream windows")
PARTITIONS = Gauge("sinkstream_assigned_partitions", "Input partitions owned by this process")
LAG = Gauge("sinkstream_partition_lag_records", "High watermark minus next offset to process (consumer's view)",
            ["partition"])
CHECKPOINT_AGE = Gauge("sinkstream_checkpoint_age_seconds", "Seconds since the partition's last checkpoint",
                       ["partition"])
CHECKPOINT_SECONDS = Histogram("sinkstream_checkpoint_seconds", "Time of one partition checkpoint (flush to commit)",
                               buckets=(0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100))
CHECKPOINT_SIZE = Histogram("sinkstream_checkpoint_size_bytes", "Snapshot bytes written by one checkpoint",
                            buckets=(0, 1e5, 1e6, 1e7, 5e7, 1e8, 5e8, 1e9, 5e9))
CHECKPOINT_FAILURES = Counter("sinkstream_checkpoint_failures_total", "Checkpoints that did not go through",
                              ["reason"])
MODEL_STEP_SECONDS = Histogram("sinkstream_model_step_seconds", "Model time of one batched step (forward passes only)",
                               buckets=(0.005, 0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30))
GROUP_SECONDS = Histogram("sinkstream_group_seconds", "Time of one group of records, model step to publish",
                          buckets=(0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100))
BATCH_TOKENS = Histogram("sinkstream_batch_tokens", "Tokens in one model step",
                         buckets=(1, 4, 16, 64, 256, 1024, 4096, 16384))
BATCH_STREAMS = Histogram(
    "sinkstream_batch_streams", "Streams in one model step", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
)
ERRORS = Counter("sinkstream_errors_total", "Errors by type", ["type"])
KAFKA_UP = Gauge("sinkstream_kafka_up", "1 while the broker answers polls, else 0")
REDIS_UP = Gauge("sinkstream_redis_up", "1 while the state store answers, else 0")
READY = Gauge("sinkstream_ready", "1 while /readyz answers 200")
STREAMS_CLOSED = Counter(
    "sinkstream_streams_closed_total",
    "Stream sessions closed after service.session_gap of input time without a record (state deleted)",
)
STATE_LOSSES = Counter(
    "sinkstream_state_losses_total",
    "Times the state store lost an owned partition's state (epoch key or a blob gone: FLUSHALL, an empty "
    "replica, eviction); the partition was claimed afresh and its in-memory streams re-checkpointed",
)
BUILD = Info("sinkstream_build", "Version, model and cache of this process")

for _type in ("bad_input", "redis", "kafka", "snapshot_refused", "fenced", "model_step", "state_lost"):
    ERRORS.labels(_type)
for _reason in ("store", "sink", "fenced", "state_lost"):
    CHECKPOINT_FAILURES.labels(_reason)


def describe_build(lm: Any, settings: Any) -> None:
    """Fill `sinkstream_build_info` (version, model, fingerprint, device, dtype and why, sinks, window) and the
    model part of /status.json."""
    try:
        version = metadata.version("sinkstream")
    except metadata.PackageNotFoundError:
        version = "unknown"
    BUILD.info({
        "version": version, "model": settings.model.name, "fingerprint": lm.fingerprint, "device": str(lm.device),
        "dtype": str(lm.dtype).replace("torch.", ""), "dtype_reason": getattr(lm, "dtype_reason", "requested"),
        "sinks": str(settings.cache.sinks), "window": str(settings.cache.window),
    })
    STATUS.model = {"name": settings.model.name, "device": str(lm.device), "dtype": str(lm.dtype).replace("torch.", ""),
                    "dtype_reason": getattr(lm, "dtype_reason", "requested")}


class Health:
    """Liveness (the poll loop turns) and readiness (set by the service from what it knows)."""

    def __init__(self, stall_after_s: float = 300.0):
        self.stall_after_s = stall_after_s
        self.last_loop = time.monotonic()
        self.ready = False
        self.kafka_down_since: float | None = None

    def beat(self) -> None:
        self.last_loop = time.monotonic()

    def alive(self) -> bool:
        return time.monotonic() - self.last_loop < self.stall_after_s


class StatusBoard:
    """What the status page shows: per stream, the most anomalous of its recent lines, and the most recent
    alerts of all streams with their template and the stream's verdict at that time (bounded memory)."""

    def __init__(self, per_stream: int = 5, streams: int = 200, alerts: int = 50):
        self.per_stream, self.streams = per_stream, streams
        self._lines: dict[str, deque[dict[str, Any]]] = {}
        self._alerts: deque[dict[str, Any]] = deque(maxlen=alerts)
        self._lock = threading.Lock()
        self.partitions: dict[str, dict[str, Any]] = {}
        self.model: dict[str, str] = {}  # name, device, dtype and why (`describe_build`)

    def observe(self, stream: str, annotation: dict[str, Any]) -> None:
        score = annotation["score"]
        alerts = [line for line in score["lines"] if line.get("alert")]
        if alerts:
            source = annotation["source"]
            with self._lock:
                for line in alerts:
                    t = line.get("template")
                    self._alerts.append({
                        "stream": stream, "line_no": line["line_no"], "text": line["text"],
                        "score": line.get("score"), "z": line["z"], "offset": source["offset"],
                        "partition": f"{source['topic']}:{source['partition']}",
                        "template": None if t is None else {"id": t["id"], "text": t["text"],
                                                             "seen_reference": t.get("seen_reference")},
                        "verdict": score.get("verdict"),
                    })
        scored = [line for line in score["lines"] if line["z"] is not None]
        if not scored:
            return
        with self._lock:
            recent = self._lines.setdefault(stream, deque(maxlen=50))
            for line in scored:
                recent.append({"line_no": line["line_no"], "text": line["text"], "z": line["z"],
                               "anomaly": line["anomaly"], "offset": annotation["source"]["offset"]})
            if len(self._lines) > self.streams:
                self._lines.pop(next(iter(self._lines)))

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            streams = {
                key: sorted(lines, key=lambda line: -line["z"])[: self.per_stream] for key, lines in self._lines.items()
            }
            recent_alerts = list(reversed(self._alerts))  # newest first
        resident = int(next(iter(RESIDENT.collect())).samples[0].value)
        return {"model": self.model, "partitions": self.partitions, "resident_streams": resident, "streams": streams,
                "recent_alerts": recent_alerts}


STATUS = StatusBoard()

PAGE = files("pipeline.service").joinpath("static/status.html")  # package data; reads /status.json


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep access logs out of the service log
        pass


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def app(health: Health) -> Callable[..., Iterable[bytes]]:
    """The WSGI application of the metrics port: prometheus_client's `/metrics` app, beside it the health
    endpoints, `/status.json` and the static status page."""
    prometheus = make_wsgi_app()
    page = PAGE.read_bytes()

    def respond(start_response: Callable[..., Any], code: int, body: bytes,
                ctype: str = "text/plain; charset=utf-8") -> list[bytes]:
        start_response(f"{code} {HTTPStatus(code).phrase}",
                       [("Content-Type", ctype), ("Content-Length", str(len(body)))])
        return [body]

    def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            return prometheus(environ, start_response)
        if path == "/healthz":
            ok = health.alive()
            return respond(start_response, 200 if ok else 503, b"ok\n" if ok else b"poll loop stalled\n")
        if path == "/readyz":
            return respond(start_response, 200 if health.ready else 503,
                           b"ready\n" if health.ready else b"not ready\n")
        if path == "/status.json":
            body = {**STATUS.snapshot(), "ready": health.ready}
            return respond(start_response, 200, json.dumps(body).encode(), "application/json")
        if path in ("/", "/index.html"):
            return respond(start_response, 200, page, "text/html; charset=utf-8")
        return respond(start_response, 404, b"not found: try /, /metrics, /healthz, /readyz or /status.json\n")

    return application


def serve(host: str, port: int, health: Health) -> WSGIServer:
    """Serve `app(health)` on `host:port` from a daemon thread; `shutdown()` and `server_close()` stop it."""
    server = make_server(host, port, app(health), server_class=_ThreadingWSGIServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
