"""`sinkstream bench churn`: many short-lived keys with `service.session_gap` on, against the same lines under
15 busy keys (issue 19 item 5).

Both runs feed the same Loghub lines (one line per record) through the real service, in process, on in-memory
Kafka connectors and a real Redis (a redis-server of its own, started like `sinkstream stack up` does, emptied
before each run), with the same settings and `session_gap` in records:

- `busy`: the lines spread round-robin over 15 keys (every key stays open: it never idles for the gap);
- `churn`: `keys` keys of one short session each (`lines_per_key` consecutive records per key), so every key
  idles past the gap once the next keys have run, and is closed.

Measured per run: throughput (tokens/s and records/s between the first and the last record processed),
Redis `used_memory` at the end above the empty server's (after the final checkpoint), the snapshot bytes of one
open stream (`MEMORY USAGE` of its blob keys: what an open or spilled stream costs Redis), the manifest's bytes
per open and per closed key, and the `closed` annotations per key (each must come once; keys still within the gap
of the end stay open). Acceptance (issue 19): churn Redis memory <= 2x busy, churn throughput >= 0.9x busy.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import redis

from connectors.memory import MemorySink, MemorySource, MemoryTopic
from connectors.redis_store import RedisStateStore
from model.loader import LoadedModel
from pipeline.devstack.processes import start_redis
from pipeline.evaluation.datasets import loghub_dir
from pipeline.service.engine import Engine
from pipeline.service.service import Service
from pipeline.settings import load_settings

BUSY_KEYS = 15
SOURCES = ["HDFS_2k.log", "OpenSSH_2k.log", "Zookeeper_2k.log", "Apache_2k.log", "Linux_2k.log"]


def _lines(n: int) -> list[str]:
    pools = [(loghub_dir() / name).read_text(errors="replace").splitlines() for name in SOURCES]
    return [pools[i % len(pools)][i // len(pools)] for i in range(n)]


def _settings(window: int, gap: int, threads: int | None) -> Any:
    return load_settings(None, **{
        "model": {"threads": threads} if threads else {},
        "cache": {"sinks": 4, "window": window, "chunk": 64},
        "kafka": {"output_topic": "out", "max_poll_records": 64},
        "checkpoint": {"every_records": 200, "every_seconds": 5.0},
        "service": {"session_gap": gap, "max_resident_streams": 128},
    })


def _run(lm: LoadedModel, settings: Any, items: list[tuple[bytes, bytes]], client: redis.Redis) -> dict[str, Any]:
    client.flushall()
    empty = int(client.info("memory")["used_memory"])
    topic = MemoryTopic("in")
    for key, value in items:
        topic.append(0, key, value)
    sink = MemorySink()
    store = RedisStateStore(client, "churn")
    service = Service(settings, Engine(lm, settings), MemorySource.factory(topic), sink, store)
    started = time.perf_counter()
    service.run(idle_exit_s=0.5, install_signals=False)
    wall = time.perf_counter() - started
    p = service.progress
    span = max(1e-9, p["last"] - p["first"])
    used = int(client.info("memory")["used_memory"]) - empty
    values = sink.values("out")
    closed = Counter(a["stream"] for a in values if a["kind"] == "closed")
    raw = client.get("churn:manifest:{in:0}")
    doc = json.loads(raw) if raw else {"snapshots": {}, "manifest": {}}
    blobs = list(doc["snapshots"].values())
    blob_bytes = [int(client.memory_usage(k) or 0) for k in blobs]
    user = doc["manifest"]
    closed_json = len(json.dumps(user.get("closed", []), separators=(",", ":")))
    open_json = len(json.dumps([user.get("open", []), user.get("verdicts", {})], separators=(",", ":")))
    n_open = len(user.get("open", []))
    return {
        "records": len(items),
        "keys": len({k for k, _ in items}),
        "seconds_wall": wall,
        "tokens_per_s": p["tokens"] / span,
        "records_per_s": p["records"] / span,
        "redis_used_bytes": used,
        "redis_keys": int(client.dbsize()),
        "manifest_bytes": len(raw or b""),
        "open_keys_at_end": n_open,
        "snapshot_bytes_per_open_stream": sum(blob_bytes) / len(blob_bytes) if blob_bytes else 0,
        "manifest_bytes_per_open_key": open_json / n_open if n_open else 0,
        "closed_keys": len(closed),
        "closed_more_than_once": sum(1 for c in closed.values() if c > 1),
        "manifest_bytes_per_closed_key": closed_json / len(closed) if closed else 0,
        "annotations": dict(Counter(a["kind"] for a in values)),
    }


def bench_churn(lm: LoadedModel, keys: int, lines_per_key: int = 2, gap: int = 64, window: int = 252,
                threads: int | None = 1, progress: Any = None) -> dict[str, Any]:
    """Run `busy` (15 keys) and `churn` (`keys` one-session keys) over the same lines; see the module docstring."""
    lines = _lines(keys * lines_per_key)
    busy = [(f"busy{i % BUSY_KEYS}".encode(), (line + "\n").encode()) for i, line in enumerate(lines)]
    churn = [(f"key{i // lines_per_key}".encode(), (line + "\n").encode()) for i, line in enumerate(lines)]
    settings = _settings(window, gap, threads)
    with tempfile.TemporaryDirectory(prefix="sinkstream-churn-") as tmp:
        proc = start_redis(Path(tmp))
        client = redis.Redis(host="127.0.0.1", port=proc.port)
        try:
            client.config_set("maxmemory-policy", "noeviction")
            if progress:
                progress(f"churn: {BUSY_KEYS} busy keys, {len(lines)} lines")
            a = _run(lm, settings, busy, client)
            if progress:
                progress(f"churn: {keys} one-session keys, {len(lines)} lines")
            b = _run(lm, settings, churn, client)
        finally:
            client.close()
            proc.stop()
    return {
        "settings": {"keys": keys, "lines_per_key": lines_per_key, "session_gap_records": gap, "window": window,
                     "threads": threads},
        "busy": a,
        "churn": b,
        "redis_memory_ratio": b["redis_used_bytes"] / max(1, a["redis_used_bytes"]),
        "throughput_ratio": b["tokens_per_s"] / a["tokens_per_s"],
        "goals": {"redis_memory_ratio_max": 2.0, "throughput_ratio_min": 0.9},
    }


def plot_churn(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    names = [f"{result['busy']['keys']} busy keys", f"{result['churn']['keys']} one-session keys"]
    a.bar(names, [result["busy"]["redis_used_bytes"] / 1e6, result["churn"]["redis_used_bytes"] / 1e6],
          color=["#4c72b0", "#c44e52"])
    a.axhline(2 * result["busy"]["redis_used_bytes"] / 1e6, color="k", ls="--", label="goal: <= 2x busy")
    a.set_ylabel("Redis used memory at the end (MB)")
    a.legend()
    b.bar(names, [result["busy"]["tokens_per_s"], result["churn"]["tokens_per_s"]], color=["#4c72b0", "#c44e52"])
    b.axhline(0.9 * result["busy"]["tokens_per_s"], color="k", ls="--", label="goal: >= 0.9x busy")
    b.set_ylabel("tokens / s")
    b.legend()
    fig.suptitle(f"session_gap {result['settings']['session_gap_records']} records, same "
                 f"{result['busy']['records']} lines")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
