"""`sinkstream bench service`: end-to-end throughput against model-only, and the cost of a checkpoint.

Throughput, three levels over the same keyed log records (real Loghub lines):

- model only: the tokens of each record's complete lines through `SinkModel.nll`, nothing else;
- session: `StreamSession.process` (chunking, tokenizing, scoring, building annotations);
- end to end: the real service on the embedded broker and Redis (poll, process, publish, checkpoint),
  timed from its first record to its last.

Checkpoint cost: one stream with a full cache (sinks + window tokens, the default 4 + 1020 on SmolLM2):
serialising its snapshot, writing it to Redis through `write_checkpoint` (blob + manifest switch), and
reading + restoring it; medians over repeats.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
import torch

from connectors.kafka.admin import create_topics
from connectors.protocols import Record
from connectors.redis_store import RedisStateStore
from model.loader import LoadedModel
from pipeline.devstack.processes import start_redis, start_tansu
from pipeline.evaluation.datasets import bgl_labels, loghub_dir
from pipeline.service.engine import Engine
from pipeline.service.session import StreamSession, stream_key
from pipeline.settings import Settings, load_settings

STREAMS = {"hdfs": "HDFS_2k.log", "ssh": "OpenSSH_2k.log", "bgl": "BGL_2k.log", "zk": "Zookeeper_2k.log"}


def _records(lines_per_stream: int, lines_per_record: int) -> list[tuple[str, bytes]]:
    out = []
    for key, name in STREAMS.items():
        path = loghub_dir() / name
        lines = [t for t, _ in bgl_labels(path)] if key == "bgl" else path.read_text(errors="replace").splitlines()
        lines = lines[:lines_per_stream]
        for i in range(0, len(lines), lines_per_record):
            out.append((key, "".join(x + "\n" for x in lines[i : i + lines_per_record]).encode()))
    return out


def _model_only(engine: Engine, records: list[tuple[str, bytes]]) -> dict[str, float]:
    token_lists: dict[str, list[list[int]]] = {}
    for key, value in records:
        ids = [t for line in value.decode().splitlines(keepends=True) for t in engine.tokenize(line)]
        token_lists.setdefault(key, []).append(ids)
    start = time.perf_counter()
    tokens = 0
    c = engine.settings.cache
    for lists in token_lists.values():
        cache = engine.runner.new_cache(c.sinks, c.window, max_chunk=c.chunk)  # the model alone, one cache
        for ids in lists:
            engine.runner.nll(cache, ids)
            tokens += len(ids)
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def _session_only(engine: Engine, records: list[tuple[str, bytes]]) -> dict[str, float]:
    sessions: dict[str, StreamSession] = {}
    start = time.perf_counter()
    tokens = 0
    for offset, (key, value) in enumerate(records):
        record = Record("bench", 0, offset, key.encode(), value, {}, 0)
        if stream_key(record) not in sessions:
            sessions[stream_key(record)] = StreamSession(engine, key)
        session = sessions[stream_key(record)]
        tokens += sum(a["score"]["tokens"] for a in session.process(record) if a["kind"] == "score")
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def _end_to_end(
    settings_values: dict[str, Any], lm: LoadedModel, records: list[tuple[str, bytes]], workdir: Path
) -> dict[str, float]:
    from kafka import KafkaProducer

    from pipeline.service.wiring import build_service

    broker, store = start_tansu(workdir / "kafka"), start_redis(workdir / "redis")
    try:
        bootstrap, url = f"127.0.0.1:{broker.port}", f"redis://127.0.0.1:{store.port}/0"
        create_topics(bootstrap, {"bench.in": len(STREAMS), "bench.out": 1})
        producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
        partitions = {key: i for i, key in enumerate(STREAMS)}
        for key, value in records:
            producer.send("bench.in", key=key.encode(), value=value, partition=partitions[key])
        producer.flush()
        producer.close()
        values = {**settings_values, "kafka": {**settings_values.get("kafka", {}), "bootstrap_servers": bootstrap,
                                               "input_topic": "bench.in", "output_topic": "bench.out",
                                               "group_id": "bench", "session_timeout_ms": 6000},
                  "redis": {"url": url}}
        service = build_service(load_settings(None, **values), lm=lm)
        service.run(idle_exit_s=3.0, install_signals=False)
        p = service.progress
        seconds = p["last"] - p["first"]
        return {"tokens": p["tokens"], "records": p["records"], "seconds": seconds,
                "tokens_per_s": p["tokens"] / seconds}
    finally:
        broker.stop()
        store.stop()


def _checkpoint_cost(engine: Engine, settings: Settings, workdir: Path, repeats: int) -> dict[str, Any]:
    lines = (loghub_dir() / "HDFS_2k.log").read_text(errors="replace").splitlines()
    session = StreamSession(engine, "hdfs")
    offset = 0
    span = settings.cache.sinks + settings.cache.window
    while session.tokens_seen < span + 64:  # a full cache: sinks + window, evictions under way
        text = "".join(x + "\n" for x in lines[offset * 4 : offset * 4 + 4])
        session.process(Record("bench", 0, offset, b"hdfs", text.encode(), {}, 0))
        offset += 1
    server = start_redis(workdir / "redis-cp")
    try:
        store = RedisStateStore(redis.Redis.from_url(f"redis://127.0.0.1:{server.port}/0"), key_prefix="bench")
        epoch = store.claim("bench:0")
        dump, write, restore = [], [], []
        for i in range(repeats):
            t0 = time.perf_counter()
            blob = session.snapshot()
            t1 = time.perf_counter()
            doc = store.write_checkpoint("bench:0", epoch, {"hdfs": blob}, {"next_offset": offset + i})
            t2 = time.perf_counter()
            restored = StreamSession.restore(engine, store.read_snapshot(doc["snapshots"]["hdfs"]))
            t3 = time.perf_counter()
            restored.release()
            dump.append(t1 - t0)
            write.append(t2 - t1)
            restore.append(t3 - t2)
        med = statistics.median
        return {"tokens_in_cache": min(session.primed + session.tokens_seen, span), "bytes": len(blob),
                "snapshot_ms": 1000 * med(dump),
                "redis_write_ms": 1000 * med(write), "checkpoint_ms": 1000 * (med(dump) + med(write)),
                "restore_ms": 1000 * med(restore), "repeats": repeats, "goal_checkpoint_ms": 150.0}
    finally:
        server.stop()


def bench_service(lm, settings_values: dict[str, Any], quick: bool = False) -> dict[str, Any]:
    """Run the service benchmark; returns a JSON-able dict (see module docstring)."""
    settings = load_settings(None, **settings_values)
    engine = Engine(lm, settings)
    records = _records(lines_per_stream=40 if quick else 150, lines_per_record=4)
    with tempfile.TemporaryDirectory(prefix="sinkstream-bench-") as tmp:
        work = Path(tmp)
        model_only = _model_only(engine, records)
        session = _session_only(engine, records)
        e2e = _end_to_end(settings_values, lm, records, work)
        checkpoint = _checkpoint_cost(engine, settings, work, repeats=3 if quick else 7)
    return {
        "records": len(records),
        "cache": {"sinks": settings.cache.sinks, "window": settings.cache.window, "chunk": settings.cache.chunk},
        "torch_threads": torch.get_num_threads(),
        "model_only": model_only,
        "session": session,
        "end_to_end": e2e,
        "ratio_end_to_end_vs_model_only": e2e["tokens_per_s"] / model_only["tokens_per_s"],
        "ratio_session_vs_model_only": session["tokens_per_s"] / model_only["tokens_per_s"],
        "goal_ratio": 0.9,
        "checkpoint": checkpoint,
    }


def plot_service(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    names = ["model only", "session", "end to end"]
    values = [result[key]["tokens_per_s"] for key in ("model_only", "session", "end_to_end")]
    a.bar(names, values, color=["#4c72b0", "#55a868", "#c44e52"])
    a.set_ylabel("tokens / s")
    a.set_title("service throughput")
    cp = result["checkpoint"]
    b.bar(["snapshot", "redis write", "restore"], [cp["snapshot_ms"], cp["redis_write_ms"], cp["restore_ms"]])
    b.axhline(cp["goal_checkpoint_ms"], color="k", ls="--", label="goal (checkpoint)")
    b.set_ylabel("ms (median)")
    b.set_title(f"one stream, {cp['tokens_in_cache']} tokens, {cp['bytes'] / 1e6:.0f} MB")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
