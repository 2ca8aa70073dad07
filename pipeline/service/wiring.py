"""The one place that turns `Settings` into the service's connectors: Kafka source and sink, Redis state store.

`pipeline.service.service.Service` only knows the protocols of `connectors.protocols`; this module picks the
concrete classes, resolves the addresses (settings, else the embedded stack of `sinkstream stack up`), checks
that the broker and Redis answer before anything starts (waiting up to `service.startup_wait_s` for them), and
hands everything to the service. A broker or Redis that still does not answer is a `UserError` naming the
address that was tried (never the Redis URL itself, which can carry a password).

Rebalance callbacks: the Kafka source must call the service's `on_assign` / `on_revoke` / `on_lost`, so the
service receives a `SourceFactory` (see `connectors.protocols`) and builds its source with its own callbacks.
"""

from __future__ import annotations

import os

import redis
import structlog
import tenacity
from kafka.errors import KafkaError

from connectors.kafka.admin import kafka_metadata
from connectors.kafka.config import KafkaClientConfig
from connectors.kafka.sink import KafkaSink
from connectors.kafka.source import KafkaSource
from connectors.protocols import PartitionCallbacks, Source, SourceFactory
from connectors.redis_store import RedisStateStore, connect_redis, redacted_address
from model.loader import AdapterError, LoadedModel, load_model
from pipeline.errors import UserError
from pipeline.service.engine import Engine
from pipeline.service.service import Service
from pipeline.settings import KafkaSettings, Settings, sinkstream_home

log = structlog.get_logger(__name__)


def resolve_addresses(settings: Settings) -> tuple[str, str]:
    """(bootstrap servers, redis url) from settings, else from the embedded stack (`sinkstream stack up`)."""
    bootstrap, url = settings.kafka.bootstrap_servers, settings.redis.url
    if not bootstrap or not url:
        from pipeline.devstack.stack import read_stack  # only for local runs without addresses

        stack = read_stack(sinkstream_home())
        if stack is None:
            raise UserError(
                "expected kafka.bootstrap_servers and redis.url in config.yaml (or SINKSTREAM_KAFKA__BOOTSTRAP_SERVERS "
                "/ SINKSTREAM_REDIS__URL), or a running embedded stack (`sinkstream stack up`); got empty "
                "addresses and no stack"
            )
        bootstrap, url = bootstrap or stack.bootstrap_servers, url or stack.redis_url
    return bootstrap, url


def kafka_client(settings: KafkaSettings, bootstrap_servers: str) -> KafkaClientConfig:
    """The connectors' client config (brokers + security) from the application's Kafka settings."""
    return KafkaClientConfig(
        bootstrap_servers=bootstrap_servers,
        security_protocol=settings.security_protocol,
        sasl_mechanism=settings.sasl_mechanism,
        sasl_username=settings.sasl_username,
        sasl_password=settings.sasl_password.get_secret_value() if settings.sasl_password else None,
        ssl_cafile=settings.ssl_cafile,
        ssl_certfile=settings.ssl_certfile,
        ssl_keyfile=settings.ssl_keyfile,
    )


def source_factory(settings: KafkaSettings, client: KafkaClientConfig) -> SourceFactory:
    """A factory that subscribes a `KafkaSource` to the input topic(s) with the service's callbacks."""

    def build(callbacks: PartitionCallbacks) -> Source:
        return KafkaSource(
            settings.input_topic,
            bootstrap_servers=client,
            group_id=settings.group_id,
            callbacks=callbacks,
            group_instance_id=settings.group_instance_id or os.environ.get("POD_NAME") or None,
            auto_offset_reset=settings.auto_offset_reset,
            max_poll_records=settings.max_poll_records,
            session_timeout_ms=settings.session_timeout_ms,
            max_poll_interval_ms=settings.max_poll_interval_ms,
        )

    return build


def build_store(settings: Settings, url: str) -> RedisStateStore:
    """A `RedisStateStore` on `url` with the settings' password, timeout, key prefix and checkpoint pacing."""
    r = settings.redis
    client = connect_redis(
        url, password=r.password.get_secret_value() if r.password else None, socket_timeout_s=r.socket_timeout_s,
        ssl_ca_certs=r.ssl_ca_certs,
    )
    return RedisStateStore(client, key_prefix=r.key_prefix, pace_s=settings.checkpoint.pace_ms / 1000.0)


class _NotAnswering(Exception):
    """One start-up check missed; the message is the user-facing line."""


class _Refused(Exception):
    """A start-up check was answered with a refusal that waiting cannot fix (credentials); not retried."""


def check_reachable(
    client: KafkaClientConfig, store: RedisStateStore, url: str, wait_s: float = 0.0, timeout_s: float = 10.0
) -> None:
    """Wait up to `wait_s` seconds for the broker and Redis to answer (backoff 0.5 s doubling to 5 s, a
    `startup.waiting` log line per miss), then raise `UserError` naming what did not answer: after the wait
    a wrong address is the likely cause, a user mistake."""

    def check() -> None:
        try:
            kafka_metadata(client, timeout_s)
        except (OSError, KafkaError) as exc:
            raise _NotAnswering(
                f"expected a Kafka broker at {client.bootstrap_servers}, none answered within {timeout_s:.0f}s "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        try:
            store.ping()
        except (redis.AuthenticationError, redis.exceptions.NoPermissionError) as exc:
            raise _Refused(  # a wrong password or ACL does not heal by waiting: fail at once
                f"expected Redis at {redacted_address(url)} to accept the configured credentials, it refused them "
                f"({type(exc).__name__}: {exc}); check redis.url / redis.password"
            ) from exc
        except redis.RedisError as exc:
            raise _NotAnswering(
                f"expected Redis at {redacted_address(url)}, it did not answer ({type(exc).__name__}: {exc})"
            ) from exc

    def waiting(state: tenacity.RetryCallState) -> None:
        assert state.outcome is not None  # before_sleep runs after a failed attempt
        log.warning("startup.waiting", attempt=state.attempt_number, why=str(state.outcome.exception()),
                    waited_s=round(state.seconds_since_start or 0.0, 1), wait_s=wait_s)

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_delay(wait_s), wait=tenacity.wait_exponential(multiplier=0.5, max=5.0),
        retry=tenacity.retry_if_exception_type(_NotAnswering), before_sleep=waiting, reraise=True,
    )
    try:
        retrying(check)
    except _Refused as exc:
        raise UserError(str(exc)) from exc.__cause__
    except _NotAnswering as exc:
        waited = f" (waited {wait_s:g}s; service.startup_wait_s)" if wait_s else ""
        raise UserError(f"{exc}{waited}") from exc.__cause__


def build_service(settings: Settings, lm: LoadedModel | None = None) -> Service:
    """The production service: Kafka source and sink, Redis store, the model (loaded unless `lm` is given)."""
    bootstrap, url = resolve_addresses(settings)
    client = kafka_client(settings.kafka, bootstrap)
    store = build_store(settings, url)
    check_reachable(client, store, url, wait_s=settings.service.startup_wait_s)
    m = settings.model
    if lm is None:
        try:
            lm = load_model(m.name, m.device, m.dtype, m.threads, cache_dir=sinkstream_home() / "models",
                            adapter=m.adapter, heap=m.heap, row_plans=m.row_plans)
        except AdapterError as exc:
            raise UserError(str(exc)) from exc
    engine = Engine(lm, settings)
    sink = KafkaSink(bootstrap_servers=client)
    log.info("wiring.connectors", bootstrap=bootstrap, redis=redacted_address(url), group=settings.kafka.group_id)
    return Service(settings, engine, source_factory(settings.kafka, client), sink, store)
