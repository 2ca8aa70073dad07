"""Every kafka-python name `KafkaSource` relies on beyond the plain consumer calls, in one place.

kafka-python documents `KafkaConsumer.metrics()` as "an unstable interface" and keeps its record checksum
choice in `kafka.record.util`; the rebalance listener classes live in `kafka.consumer.subscription_state`.
All of it is public (no name with a leading underscore is read here or anywhere else in this code base:
`tests/connectors/test_no_private_internals.py`), and `tests/connectors/test_kafka_compat.py` fails by name
when an upgrade moves one of them.

- Fetch health: the fetch manager's `fetch-rate` metric (fetch responses per second) over a short sample
  window (`METRICS_CONFIG`: 2 samples of 1 s), so a rate above zero means a fetch response arrived within
  the last 1-2 s.
- Record checksums: `kafka.record.util.crc32c_c` is the C `crc32c` function when that extension is installed
  (kafka-python then uses it instead of its pure-Python fallback), else None.
"""

from __future__ import annotations

from typing import Any

from kafka.record import util as record_util

FETCH_METRIC_GROUP = "consumer-fetch-manager-metrics"
FETCH_RATE = "fetch-rate"
# Consumer options that make the fetch-rate metric describe the last 1-2 seconds (default: 30-60 s).
METRICS_CONFIG: dict[str, Any] = {"metrics_enabled": True, "metrics_sample_window_ms": 1000, "metrics_num_samples": 2}


def fetch_rate(consumer: Any) -> float | None:
    """Fetch responses per second over the last 1-2 s (see `METRICS_CONFIG`); None without metrics."""
    metrics = consumer.metrics()
    if not metrics:
        return None
    rate = metrics.get(FETCH_METRIC_GROUP, {}).get(FETCH_RATE)
    return float(rate) if rate is not None else None


def crc32c_accelerated() -> bool:
    """kafka-python checks record CRCs with the `crc32c` C extension (not its pure-Python fallback)."""
    return record_util.crc32c_c is not None
