"""What an operator's tools see of a running service: HTTP status codes and parsed Prometheus samples."""

from __future__ import annotations

import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def get(url: str, timeout_s: float = 2.0) -> tuple[int | None, str]:
    """(HTTP status, body) of a GET; (None, reason) while nothing listens or the request times out."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        return None, str(exc)


def scrape(port: int) -> Samples:
    """Every sample of `/metrics`, keyed by (sample name, sorted labels), parsed by prometheus_client's own
    text parser (so the exposition format is checked too)."""
    code, body = get(f"http://127.0.0.1:{port}/metrics")
    assert code == 200, f"expected /metrics to answer 200, got {code}: {body[:300]}"
    out: Samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The sample `name{labels}` (exact label set), or None when it is not exported."""
    return samples.get((name, tuple(sorted(labels.items()))))


def labelled(samples: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample called `name`, by label set."""
    return {labels: v for (n, labels), v in samples.items() if n == name}
