"""Helpers for service integration tests: input records, the uninterrupted baseline, service subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from connectors.protocols import Record
from pipeline.evaluation.datasets import loghub_dir
from pipeline.service.annotations import encode
from pipeline.service.engine import Engine
from pipeline.service.session import StreamSession, stream_key
from pipeline.settings import Settings, load_settings

# The dtype of the suite's service runs and their baselines (issue 20): "auto", so a CPU with bf16 matrix units runs
# them in bfloat16 (about 2x faster there, and exact resume holds in it) and any other CPU in float32. Tests about
# one dtype name it.
SUITE_DTYPE = "auto"

REPO = Path(__file__).resolve().parents[2]


def input_records(partitions: int, per_partition: int) -> dict[int, list[tuple[bytes | None, bytes, dict]]]:
    """Real log lines as keyed streams; records split lines (and a UTF-8 character) at arbitrary points."""
    sources = {"hdfs": "HDFS_2k.log", "ssh": "OpenSSH_2k.log", "zk": "Zookeeper_2k.log", "apache": "Apache_2k.log"}
    texts = {k: (loghub_dir() / f).read_text(errors="replace").splitlines() for k, f in sources.items()}
    out: dict[int, list] = {p: [] for p in range(partitions)}
    keys = list(sources)
    for p in range(partitions):
        key = keys[p % len(keys)]
        lines = texts[key][p * 50 :]
        pending = b""
        for i in range(per_partition):
            data = pending + (lines[i] + ("  ✓ ok\n" if i % 7 == 3 else "\n")).encode()
            cut = len(data) if i % 3 else len(data) * 2 // 3  # every third record ends mid-line
            pending = data[cut:]
            record_key = None if (p == 0 and i % 5 == 4) else key.encode()
            out[p].append((record_key, data[:cut], {}))
    return out


def baseline(settings: Settings, lm, topic: str, records: dict[int, list]) -> dict[str, bytes]:
    """Annotations of an uninterrupted run, computed offline: id -> canonical bytes.

    Uses the services' torch thread count: CPU results are bit-identical only for the same thread count.
    """
    threads = torch.get_num_threads()
    if settings.model.threads:
        torch.set_num_threads(settings.model.threads)
    try:
        return _baseline(settings, lm, topic, records)
    finally:
        torch.set_num_threads(threads)


class BaselineInBackground(Mapping[str, bytes]):
    """`baseline(...)` computed on a thread of the test process while the test runs its services.

    The baseline and each test service use one torch thread (`service_settings`), and CPU results depend on the
    thread count, not on the load, so on a 2-core machine the two overlap instead of adding up (the baseline takes
    20-45 s per scenario). Reading the mapping (ids, bytes) waits for the result, and re-raises its error.
    """

    def __init__(self, settings: Settings, lm, topic: str, records: dict[int, list]):
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="baseline")
        self._future: Future[dict[str, bytes]] = pool.submit(baseline, settings, lm, topic, records)
        pool.shutdown(wait=False)

    def _result(self) -> dict[str, bytes]:
        return self._future.result()

    def __getitem__(self, key: str) -> bytes:
        return self._result()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._result())

    def __len__(self) -> int:
        return len(self._result())


def _baseline(settings: Settings, lm, topic: str, records: dict[int, list]) -> dict[str, bytes]:
    # Every stream stays resident here (the service spills and reloads them; exact resume makes that invisible).
    roomy = settings.model_copy(update={"service": settings.service.model_copy(update={"max_resident_streams": 64})})
    engine = Engine(lm, roomy)
    result: dict[str, bytes] = {}
    for partition, items in records.items():
        sessions: dict[str, StreamSession] = {}
        templates = engine.new_template_memory()  # the partition's template memory, shared by its streams
        for offset, (key, value, headers) in enumerate(items):
            record = Record(topic, partition, offset, key, value, headers, 0)
            name = stream_key(record)
            if name not in sessions:
                sessions[name] = StreamSession(engine, name, templates=templates)
            session = sessions[name]
            for annotation in session.process(record):
                result[annotation["id"]] = encode(annotation)
    return result


def service_settings(bootstrap: str, redis_url: str, topic: str, out_topic: str, group: str, prefix: str,
                     dtype: str = SUITE_DTYPE) -> dict:
    """Settings for test services: small cache, frequent checkpoints, fast group membership. The baseline model
    must be loaded with the same `dtype` ("auto" is bfloat16 on a CPU with bf16 units, else float32)."""
    return {
        "log_format": "json",
        "log_level": "INFO",
        # One torch thread per service: two services share this machine's 2 cores in the rebalance test.
        "model": {"threads": 1, "dtype": dtype},
        "cache": {"sinks": 4, "window": 252, "chunk": 64},
        "kafka": {"bootstrap_servers": bootstrap, "input_topic": topic, "output_topic": out_topic, "group_id": group,
                  "max_poll_records": 4, "session_timeout_ms": 6000, "max_poll_interval_ms": 120000},
        "redis": {"url": redis_url, "key_prefix": prefix},
        "checkpoint": {"every_records": 5, "every_seconds": 5.0},
        "service": {"max_resident_streams": 3},
    }


def load(values: dict) -> Settings:
    return load_settings(None, **values)


@dataclass
class ServiceProcess:
    """`sinkstream run` in a subprocess, logging JSON lines to a file."""

    proc: subprocess.Popen
    log_path: Path

    @classmethod
    def start(cls, config: dict, workdir: Path, name: str, idle_exit_s: float | None = None) -> ServiceProcess:
        cfg = workdir / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump(config))
        log_path = workdir / f"{name}.log"
        argv = [sys.executable, "-m", "pipeline.cli.main", "--log-format", "json", "run", "--config", str(cfg)]
        if idle_exit_s is not None:
            argv += ["--exit-when-idle", str(idle_exit_s)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        return cls(proc, log_path)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            self.proc.wait(timeout=120)

    def wait(self, timeout_s: float) -> int:
        return self.proc.wait(timeout=timeout_s)

    def wait_for_log(self, text: str, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if text in self.log():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"service exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            time.sleep(0.2)
        raise AssertionError(f"expected {text!r} in the service log within {timeout_s} s:\n{self.log()[-3000:]}")


def check_output(messages: list[dict], expected: dict[str, bytes]) -> int:
    """Every expected id is there, every copy of every id is byte-identical to the baseline (and its header id
    and record key match the document); returns the number of duplicates (replayed copies)."""
    copies: dict[str, list[bytes]] = defaultdict(list)
    for m in messages:
        assert m["headers"]["sinkstream-id"].decode() == m["value"]["id"]
        assert m["key"].decode() == m["value"]["stream"]
        copies[m["value"]["id"]].append(m["raw"])
    assert set(copies) == set(expected), (
        sorted(set(expected) - set(copies))[:5],
        sorted(set(copies) - set(expected))[:5],
    )
    for aid, blobs in copies.items():
        assert all(b == expected[aid] for b in blobs), (aid, blobs[0], expected[aid])
    return sum(len(b) for b in copies.values()) - len(copies)


def assert_equivalent(a: object, b: object, tol: float = 1e-4, path: str = "") -> None:
    """The equivalence of annotations whose forward passes were batched differently on several torch threads
    (pipeline/service/backend.py, "Batch invariance"): the same keys, ids, lines, token counts, strings and
    flags; floats within `tol` (absolute, or relative to values above 1)."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), (path, sorted(a.keys() ^ b.keys()))
        for k in a:
            assert_equivalent(a[k], b[k], tol, f"{path}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), (path, len(a), len(b))
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equivalent(x, y, tol, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, (int, float)) and isinstance(b, (int, float)), (path, a, b)
        assert abs(a - b) <= tol * max(1.0, abs(a)), (path, a, b)
    else:
        assert type(a) is type(b) and a == b, (path, a, b)
