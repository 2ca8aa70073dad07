"""Connection options every Kafka client of sinkstream shares (source, sink, admin): brokers and security.

The connectors take this small dataclass rather than the application's settings, so `connectors/` never
imports `pipeline/`; `pipeline.service.wiring` builds it from `KafkaSettings`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER")


@dataclass(frozen=True)
class KafkaClientConfig:
    """Where the brokers are and how to authenticate to them.

    `sasl_password` is left out of `repr()` so the config can be logged. `ssl_cafile` points at the CA bundle
    that signs the brokers' certificates (SSL / SASL_SSL); None uses the system's trust store.
    """

    bootstrap_servers: str
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = "PLAIN"
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    ssl_cafile: str | None = None
    # Client certificate and key for mutual TLS (both or neither).
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    def __post_init__(self) -> None:
        if not self.bootstrap_servers or not self.bootstrap_servers.strip():
            raise ValueError(
                "expected Kafka bootstrap servers ('host:port[,host:port]'), got an empty string; set "
                "kafka.bootstrap_servers or start the embedded stack (`sinkstream stack up`)"
            )
        if self.security_protocol not in SECURITY_PROTOCOLS:
            raise ValueError(f"expected security_protocol in {SECURITY_PROTOCOLS}, got {self.security_protocol!r}")
        if self.sasl_mechanism not in SASL_MECHANISMS:
            raise ValueError(f"expected sasl_mechanism in {SASL_MECHANISMS}, got {self.sasl_mechanism!r}")
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ValueError(
                "expected both ssl_certfile and ssl_keyfile (mutual TLS) or neither, got only "
                f"{'ssl_certfile' if self.ssl_certfile else 'ssl_keyfile'}"
            )

    @property
    def servers(self) -> list[str]:
        """The bootstrap list, split and stripped."""
        return [s.strip() for s in self.bootstrap_servers.split(",") if s.strip()]

    def options(self) -> dict[str, Any]:
        """kafka-python keyword options (`bootstrap_servers`, `security_protocol`, SASL and SSL ones)."""
        cfg: dict[str, Any] = {"bootstrap_servers": self.servers, "security_protocol": self.security_protocol}
        if self.sasl_username:
            cfg["sasl_mechanism"] = self.sasl_mechanism
            cfg["sasl_plain_username"] = self.sasl_username
            cfg["sasl_plain_password"] = self.sasl_password or ""
        if self.ssl_cafile:
            cfg["ssl_cafile"] = self.ssl_cafile
        if self.ssl_certfile:
            cfg["ssl_certfile"] = self.ssl_certfile
            cfg["ssl_keyfile"] = self.ssl_keyfile
        return cfg


def client_config(client: KafkaClientConfig | str) -> KafkaClientConfig:
    """Accept either a full `KafkaClientConfig` or a plain `host:port[,host:port]` string (PLAINTEXT)."""
    return client if isinstance(client, KafkaClientConfig) else KafkaClientConfig(bootstrap_servers=client)
