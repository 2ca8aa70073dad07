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
