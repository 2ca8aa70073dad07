"""wiring.py: the one place that turns Settings into connectors, and says clearly when they are unreachable."""

from __future__ import annotations

import pytest

from connectors.kafka.config import KafkaClientConfig
from connectors.redis_store import connect_redis, redacted_address
from pipeline.errors import UserError
from pipeline.service import wiring
from pipeline.settings import load_settings


def test_kafka_client_carries_the_security_settings():
    settings = load_settings(None, kafka={"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
                                          "sasl_username": "svc", "sasl_password": "pw", "ssl_cafile": "/ca.pem",
                                          "ssl_certfile": "/tls.crt", "ssl_keyfile": "/tls.key"})
    client = wiring.kafka_client(settings.kafka, "b1:9092, b2:9092")
    assert client == KafkaClientConfig("b1:9092, b2:9092", "SASL_SSL", "SCRAM-SHA-512", "svc", "pw", "/ca.pem",
                                       "/tls.crt", "/tls.key")
    assert "pw" not in repr(client)
    assert client.options() == {
        "bootstrap_servers": ["b1:9092", "b2:9092"], "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "svc", "sasl_plain_password": "pw",
        "ssl_cafile": "/ca.pem", "ssl_certfile": "/tls.crt", "ssl_keyfile": "/tls.key",
    }


def test_half_a_client_certificate_and_a_ca_bundle_over_plain_redis_are_refused():
    with pytest.raises(ValueError, match="expected both ssl_certfile and ssl_keyfile .* got only ssl_certfile"):
        KafkaClientConfig("b:9092", "SSL", ssl_certfile="/tls.crt")
    with pytest.raises(ValueError, match="expected a rediss:// URL, got h:6379 over plain redis://"):
        connect_redis("redis://h:6379/0", ssl_ca_certs="/ca.crt")
    assert (
        connect_redis("rediss://h:6380/0", ssl_ca_certs="/ca.crt").connection_pool.connection_kwargs["ssl_ca_certs"]
        == "/ca.crt"
    )


def test_empty_addresses_without_a_stack_are_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SINKSTREAM_HOME", str(tmp_path))
    with pytest.raises(UserError, match="expected kafka.bootstrap_servers and redis.url"):
        wiring.resolve_addresses(load_settings(None))


def test_redis_url_is_logged_as_host_and_port_only():
    assert redacted_address("redis://:s3cret@cache.internal:6380/2") == "cache.internal:6380"
    assert redacted_address("redis://localhost/0") == "localhost:6379"


@pytest.mark.integration
def test_build_store_uses_prefix_pacing_and_password_free_url(redis_server):
    settings = load_settings(None, redis={"url": redis_server.url, "key_prefix": redis_server.unique_prefix("w")},
                             checkpoint={"pace_ms": 1})
    store = wiring.build_store(settings, redis_server.url)
    assert store._pace_s == 0.001
    epoch = store.claim("in-2")
    store.write_checkpoint("in-2", epoch, {"a": b"1", "b": b"2"}, {})
    assert redis_server.client().exists(f"{settings.redis.key_prefix}:manifest:{{in-2}}")


class _Store:
    """A store whose ping fails `misses` times, then answers."""

    def __init__(self, misses: int):
        self.misses, self.pings = misses, 0

    def ping(self) -> None:
        import redis

        self.pings += 1
        if self.pings <= self.misses:
            raise redis.ConnectionError("Connection refused")


def test_start_up_waits_for_redis_that_comes_back(monkeypatch):
    """Redis down for the first two checks: start-up waits (backoff), logs each miss, then goes on."""
    from structlog.testing import capture_logs

    monkeypatch.setattr(wiring, "kafka_metadata", lambda client, timeout_s: {})
    store = _Store(misses=2)
    client = KafkaClientConfig(bootstrap_servers="127.0.0.1:9")
    with capture_logs() as logs:
        wiring.check_reachable(client, store, "redis://:pw@127.0.0.1:6390/0", wait_s=30)  # type: ignore[arg-type]
    assert store.pings == 3
    waits = [e for e in logs if e["event"] == "startup.waiting"]
    assert [e["attempt"] for e in waits] == [1, 2]
    assert all(e["why"].startswith("expected Redis at 127.0.0.1:6390, it did not answer") for e in waits)
    assert not any("pw" in str(e) for e in logs)


def test_start_up_gives_up_after_the_wait_with_one_line_naming_what_did_not_answer(monkeypatch):
    import time

    monkeypatch.setattr(wiring, "kafka_metadata", lambda client, timeout_s: {})
    store = _Store(misses=10**6)
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        wiring.check_reachable(KafkaClientConfig(bootstrap_servers="h:1"), store, "redis://127.0.0.1:6390/0",  # type: ignore[arg-type]
                               wait_s=1.2)
    assert 1.2 <= time.monotonic() - start < 8
    assert str(err.value).startswith("expected Redis at 127.0.0.1:6390, it did not answer (ConnectionError")
    assert str(err.value).endswith("(waited 1.2s; service.startup_wait_s)")
    assert store.pings >= 2


def test_batch_tokens_default_depends_on_the_models_device(text_lm):
    from pipeline.service.engine import Engine

    unset = load_settings(None)
    assert unset.service.batch_tokens is None
    assert (unset.service.batch_tokens_on("cpu"), unset.service.batch_tokens_on("cuda")) == (2048, 16384)
    assert load_settings(None, service={"batch_tokens": 512}).service.batch_tokens_on("cuda") == 512
    assert Engine(text_lm, unset).batch_tokens == 2048  # text_lm runs on the CPU
