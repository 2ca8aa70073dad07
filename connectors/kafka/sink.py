"""`KafkaSink`: the pipeline's `Sink` on kafka-python 3 (`KafkaProducer`).

Durability settings: `acks=all` and `enable_idempotence=True` (no duplicates from the producer's own
retries, per-partition order kept), a small `linger_ms` so annotations of one poll batch share a request,
and no compression by default (tansu, the embedded broker, is exercised without it; pass
`compression_type=` to change it).

`send` only queues; `flush` is the synchronisation point. Every future since the previous flush is
checked after the producer's own flush, and all failures are reported together in one `SinkError`, so
the caller knows the checkpoint must not be written.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import structlog
from kafka import KafkaProducer
from kafka.errors import KafkaError, KafkaTimeoutError

from connectors.errors import FailedSend, SinkError
from connectors.kafka.config import KafkaClientConfig, client_config

log = structlog.get_logger(__name__)

_MAX_LISTED_FAILURES = 10



class KafkaSink:
    """Idempotent producer with batched delivery checks.

    Args:
        bootstrap_servers: a `KafkaClientConfig` (brokers + security), or a plain `host:port[,host:port]`.
        linger_ms: how long the producer waits to fill a batch.
        producer_config: extra `KafkaProducer` options (override the ones set here).
    """

    def __init__(
        self,
        *,
        bootstrap_servers: KafkaClientConfig | str,
        linger_ms: int = 5,
        **producer_config: Any,
    ) -> None:
        client = client_config(bootstrap_servers)
        config: dict[str, Any] = {
            **client.options(),
            "acks": "all",
            "enable_idempotence": True,
            "linger_ms": linger_ms,
            "compression_type": None,
            **producer_config,
        }
        try:
            self._producer = KafkaProducer(**config)
        except KafkaTimeoutError as exc:  # raised by kafka-python 3 when bootstrap fails
            raise SinkError(f"expected a Kafka broker at {client.bootstrap_servers}, none answered: {exc}") from exc
        self._lock = threading.Lock()
        self._pending: list[tuple[str, bytes, Any]] = []
        self._closed = False
        log.info("kafka.sink_started", bootstrap_servers=client.bootstrap_servers, idempotent=True)


    def send(self, topic: str, key: bytes, value: bytes, headers: Mapping[str, bytes] | None = None) -> None:
        """Queue one record; delivery errors are reported by `flush`."""
        if self._closed:
            raise SinkError(f"send to {topic!r}: expected an open KafkaSink, got a closed one")
        if not isinstance(key, (bytes, bytearray)) or not isinstance(value, (bytes, bytearray)):
            raise TypeError(
                f"send to {topic!r}: expected bytes key and value, got {type(key).__name__} and {type(value).__name__}"
            )
        header_list: list[tuple[str, bytes]] = []
        for name, hval in (headers or {}).items():
            if not isinstance(name, str) or not isinstance(hval, (bytes, bytearray)):
                raise TypeError(
                    f"send to {topic!r}: expected str header names and bytes values, got {name!r}: {hval!r}"
                )
            header_list.append((name, bytes(hval)))
        future = self._producer.send(topic, key=bytes(key), value=bytes(value), headers=header_list or None)
        with self._lock:
            self._pending.append((topic, bytes(key), future))

    def flush(self, timeout_s: float) -> None:
        """Wait until everything sent so far is acknowledged; raise `SinkError` listing every failure."""
        if self._closed:
            raise SinkError("flush: expected an open KafkaSink, got a closed one")
        with self._lock:
            pending, self._pending = self._pending, []
        try:
            self._producer.flush(timeout=timeout_s)
        except KafkaTimeoutError as exc:
            unfinished = sum(1 for _, _, f in pending if not f.is_done)
            raise SinkError(
                f"flush: expected all {len(pending)} queued records acknowledged within {timeout_s}s; "
                f"{unfinished} still unacknowledged"
            ) from exc
        failures: list[FailedSend] = []
        for topic, key, future in pending:
            if not future.is_done:  # flush returned, so this can only be a producer bug
                failures.append(FailedSend(topic, key, KafkaError("not completed after flush")))
            elif future.exception is not None:
                failures.append(FailedSend(topic, key, future.exception))
        if failures:
            listed = "; ".join(f"{f.topic} key={f.key[:40]!r}: {f.error!r}" for f in failures[:_MAX_LISTED_FAILURES])
            more = f" (and {len(failures) - _MAX_LISTED_FAILURES} more)" if len(failures) > _MAX_LISTED_FAILURES else ""
            log.error("kafka.sink_flush_failed", failed=len(failures), succeeded=len(pending) - len(failures))
            raise SinkError(
                f"flush: expected {len(pending)} records acknowledged, {len(failures)} failed: {listed}{more}",
                failures,
                len(pending) - len(failures),
            )
        log.debug("kafka.sink_flushed", records=len(pending))

    def close(self, timeout_s: float = 10.0) -> None:
        """Flush within `timeout_s` and close the producer. Idempotent; logs instead of raising."""
        if self._closed:
            return
        try:
            self.flush(timeout_s)
        except SinkError as exc:
            log.warning("kafka.sink_close_unflushed", error=str(exc))
        self._closed = True
        try:
            self._producer.close(timeout=timeout_s)
        except Exception as exc:  # noqa: BLE001 - closing must not mask the caller's own error
            log.warning("kafka.sink_close_failed", error=repr(exc))
        log.info("kafka.sink_closed")

    def __enter__(self) -> KafkaSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
