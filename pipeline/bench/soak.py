"""`sinkstream bench soak`: the real service under random faults for many minutes, then an audit of its output.

What runs (all on loopback, in a fresh temporary folder):

- the embedded broker (tansu) and Redis, started like `sinkstream stack up` does (`pipeline.devstack.processes`);
- a producer (confluent-kafka, independent of the service's client) writing keyed streams of real Loghub lines
  at a steady rate (default 0.5 records/s: what one torch thread keeps up with on a busy 2-core machine) for the
  first ~70 % of the run; records carry 1-3 lines and some end in the middle of a line;
- `sinkstream run` as a subprocess with the small settings of the integration tests (window 252, chunk 64,
  one torch thread, checkpoints every 5 records or 5 s);
- a chaos schedule, bounded in count and time, that one event at a time: SIGKILLs the service and restarts it
  after 1-4 s, pauses Redis (SIGSTOP, 3-30 s, SIGCONT), pauses the broker (SIGSTOP, 3-15 s, SIGCONT), empties
  Redis (FLUSHALL: the service must tell state loss from fencing and carry on), or fills it (`maxmemory` just
  above what it holds, `noeviction`, for 5-20 s: checkpoints fail until the memory is back);
- input that is hostile as text: about one record in ten carries a line with chat-template special-token text
  (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`), scored as the characters they are;
- key churn (`churn` > 0): that share of records goes to a fresh key of one short session (1-2 records), with
  `service.session_gap` on, so thousands of keys open and close; Redis `used_memory` is sampled every 2 s;
- a reader (confluent-kafka, by assignment, no group) that keeps every annotation with the time it arrived.

After the schedule, the service gets until the output covers every produced input (or a drain timeout), then
SIGTERM; its exit code is reported. The audit, by input offset and annotation id:

- `inputs_lost`: produced records with neither a `score` nor an `error` annotation (must be 0);
- `duplicates_before_dedupe`: annotation messages minus distinct ids (replays after kills are expected);
- `payload_mismatches_after_dedupe`: ids whose copies are not byte-identical; `mismatches_after_state_loss` of
  them are records re-scored after their partition's state was lost (a FLUSHALL between a kill and the restart's
  claim: `state.lost` in the log, the context they were first scored with is gone), and `mismatches_unexplained`
  the rest (must be 0: a replay re-publishes the same bytes);
- `worst_record_latency_s`: the longest time from a record's acknowledgement by the broker to its first
  annotation arriving at the reader (it includes restarts and pauses, by design);
- `peak_rss_mb`: the largest VmHWM of any service incarnation, sampled from /proc every 0.5 s;
- `stalls`: gaps of more than `STALL_S` between two annotations while inputs were waiting and no fault was in
  progress (a kill's restart counts as in progress until the new incarnation has its partitions);
- `redis_used_mb`: Redis memory at the middle and at the end of production and its peak, `churn_keys` and
  `churn_keys_closed` (each churn key's `closed` verdict at most once: `closed_more_than_once`).

`soak()` returns the report (a dict) and writes `bench_soak.json` and a timeline `bench_soak.png` under `out`.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import yaml

from connectors.kafka.admin import create_topics
from pipeline.bench import common
from pipeline.devstack.processes import ManagedProcess, start_redis, start_tansu
from pipeline.evaluation.datasets import loghub_dir

log = structlog.get_logger(__name__)

REPO = Path(__file__).resolve().parents[2]
SOURCES = ["HDFS_2k.log", "OpenSSH_2k.log", "Zookeeper_2k.log", "Apache_2k.log", "Linux_2k.log", "BGL_2k.log",
           "Hadoop_2k.log", "Spark_2k.log"]
PRODUCE_SHARE = 0.7  # records are produced during this share of the run; the rest lets the service catch up
STALL_S = 120.0  # no annotation for this long while inputs wait and no fault is in progress: a stall
SPECIAL_LINES = ["gateway: completion ended with <|endoftext|> after 212 tokens",
                 "gateway: prompt <|im_start|>system\nYou are helpful<|im_end|> accepted",
                 "gateway: user turn <|im_start|>user hello <|im_end|><|im_start|>assistant"]
SESSION_GAP = 40  # records of a partition: churn keys close this long after their session


@dataclass
class _Service:
    """One `sinkstream run` incarnation and what was seen of it."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    started: float
    messages_at_start: int = 0  # annotations the reader had received when this incarnation started
    peak_kb: int = 0

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class _Run:
    """Shared state of one soak run (the threads write, the audit reads)."""

    t0: float
    acked: dict[tuple[int, int], float] = field(default_factory=dict)  # (partition, offset) -> ack time (s)
    produce_errors: int = 0
    messages: list[tuple[float, bytes]] = field(default_factory=list)  # (arrival time s, raw annotation)
    events: list[dict[str, Any]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def now(self) -> float:
        return time.monotonic() - self.t0


def _service_config(
    bootstrap: str, redis_url: str, topic: str, out_topic: str, model: str, threads: int, session_gap: int = 0
) -> dict[str, Any]:
    """The integration tests' small settings (tests/helpers/service.py) with a short Redis timeout."""
    return {
        "log_format": "json",
        "log_level": "INFO",
        "model": {"name": model, "threads": threads},
        "cache": {"sinks": 4, "window": 252, "chunk": 64},
        "kafka": {"bootstrap_servers": bootstrap, "input_topic": topic, "output_topic": out_topic, "group_id": "soak",
                  "max_poll_records": 4, "session_timeout_ms": 6000, "max_poll_interval_ms": 120000},
        "redis": {"url": redis_url, "key_prefix": "soak", "socket_timeout_s": 3.0},
        "checkpoint": {"every_records": 5, "every_seconds": 5.0},
        "service": {"max_resident_streams": 3, "session_gap": session_gap},
    }


def _start_service(config_path: Path, workdir: Path, n: int, run: _Run) -> _Service:
    log_path = workdir / f"service{n}.log"
    argv = [sys.executable, "-m", "pipeline.cli.main", "--log-format", "json", "run", "--config", str(config_path)]
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,  # noqa: S603 - our own argv
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    run.events.append({"t": run.now(), "event": "service_start", "pid": proc.pid})
    return _Service(proc, log_path, run.now(), len(run.messages))


def _sample_rss(services: list[_Service], run: _Run) -> None:
    """Keep each live incarnation's VmHWM (peak resident set) up to date."""
    while not run.stop.is_set():
        for svc in list(services):
            if not svc.alive():
                continue
            try:
                status = Path(f"/proc/{svc.proc.pid}/status").read_text()
                svc.peak_kb = max(svc.peak_kb, int(status.split("VmHWM:")[1].split()[0]))
            except (OSError, IndexError, ValueError):
                pass
        run.stop.wait(0.5)


def _stream_lines(streams: int, seed: int) -> dict[str, list[str]]:
    folder = loghub_dir()
    out = {}
    for i in range(streams):
        name = SOURCES[i % len(SOURCES)]
        lines = (folder / name).read_text(errors="replace").splitlines()
        start = random.Random(seed + i).randrange(0, max(1, len(lines) - 500))
        out[f"{name.split('_')[0].lower()}-{i}"] = lines[start:] + lines[:start]
    return out


def _produce(bootstrap: str, topic: str, streams: int, rate: float, until_s: float, seed: int, run: _Run,
             churn: float = 0.0) -> None:
    """Keyed records at `rate` per second (all streams together) until `until_s` into the run; a `churn` share
    of them opens a fresh key of one short session, about one in ten carries a special-token line."""
    from confluent_kafka import Producer

    rng = random.Random(seed)
    texts = _stream_lines(streams, seed)
    keys = list(texts)
    cursor = dict.fromkeys(keys, 0)
    pending = dict.fromkeys(keys, b"")
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5,
                         "message.timeout.ms": 600000})

    def acked(err, msg) -> None:
        with run.lock:
            if err is not None:
                run.produce_errors += 1
            else:
                run.acked[(msg.partition(), msg.offset())] = run.now()

    sent = 0
    churn_keys: list[str] = []
    while run.now() < until_s and not run.stop.is_set():
        if churn and rng.random() < churn:  # a short session: a fresh key, or the newest one's second record
            if churn_keys and rng.random() < 0.5 and cursor.get(churn_keys[-1], 0) < 2:
                key = churn_keys[-1]
            else:
                key = f"churn-{len(churn_keys)}"
                churn_keys.append(key)
                texts[key] = texts[keys[len(churn_keys) % len(keys)]][len(churn_keys) % 400:]
                cursor[key], pending[key] = 0, b""
        else:
            key = rng.choice(keys)
        lines = texts[key]
        n = rng.randint(1, 3)
        data = pending[key] + "".join(lines[(cursor[key] + j) % len(lines)] + "\n" for j in range(n)).encode()
        if rng.random() < 0.1:
            data += (rng.choice(SPECIAL_LINES) + "\n").encode()
        cursor[key] += n
        cut = len(data) if rng.random() < 0.7 else rng.randint(1, len(data))  # some records end mid-line
        pending[key] = data[cut:]
        producer.produce(topic, key=key.encode(), value=data[:cut], on_delivery=acked)
        sent += 1
        producer.poll(0)
        time.sleep(1.0 / rate)  # steady pace; delivery callbacks run inside poll()
    remaining = producer.flush(120)
    if remaining:
        with run.lock:
            run.produce_errors += remaining
    run.events.append({"t": run.now(), "event": "production_done", "sent": sent, "churn_keys": len(churn_keys)})


def _read(bootstrap: str, out_topic: str, run: _Run) -> None:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"soak-reader-{time.monotonic_ns()}",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    consumer.assign([TopicPartition(out_topic, 0, 0)])
    try:
        while not run.stop.is_set():
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            with run.lock:
                run.messages.append((run.now(), msg.value() or b""))  # a tombstone counts as an empty value
    finally:
        consumer.close()


def _covered(run: _Run, topic: str) -> tuple[int, int]:
    """(inputs acknowledged, inputs with a score or error annotation so far)."""
    with run.lock:
        acked = set(run.acked)
        raw = [m for _, m in run.messages]
    done = set()
    for value in raw:
        doc = json.loads(value)
        src = doc["source"]
        if src["topic"] == topic and doc["kind"] in ("score", "error"):
            done.add((src["partition"], src["offset"]))
    return len(acked), len(acked & done)


def _schedule(rng: random.Random, kills: int, redis_pauses: int, broker_pauses: int, start_s: float, end_s: float,
              max_redis_pause_s: float, max_broker_pause_s: float, flushes: int = 0,
              ooms: int = 0) -> list[tuple[float, str, float]]:
    """(time, kind, duration) of each fault, one at a time, spread over [start_s, end_s] with jitter. A FLUSHALL's
    duration is the quiet time after it (two checkpoint intervals: the service re-checkpoints before the next
    fault, so a kill right after it cannot turn lost context into a replay that differs)."""
    kinds = ["kill"] * kills + ["redis"] * redis_pauses + ["broker"] * broker_pauses + ["flushall"] * flushes
    kinds += ["oom"] * ooms
    rng.shuffle(kinds)
    durations = {"kill": lambda: rng.uniform(1.0, 4.0), "redis": lambda: rng.uniform(3.0, max_redis_pause_s),
                 "broker": lambda: rng.uniform(3.0, max_broker_pause_s), "flushall": lambda: 12.0,
                 "oom": lambda: rng.uniform(5.0, 20.0)}
    plan = [(kind, durations[kind]()) for kind in kinds]
    busy = sum(d for _, d in plan)
    slack = max(0.0, (end_s - start_s) - busy)
    gaps = sorted(rng.uniform(0, slack) for _ in plan)
    out, t, prev_gap = [], start_s, 0.0
    for (kind, duration), gap in zip(plan, gaps):
        t += gap - prev_gap
        prev_gap = gap
        out.append((t, kind, duration))
        t += duration
    return out


def _pause(proc: ManagedProcess, seconds: float, run: _Run, name: str) -> None:
    run.events.append({"t": run.now(), "event": f"{name}_pause", "seconds": round(seconds, 1)})
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        run.stop.wait(seconds)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    run.events.append({"t": run.now(), "event": f"{name}_resume"})


def _redis_fault(client: Any, kind: str, seconds: float, run: _Run) -> None:
    """FLUSHALL (then a quiet `seconds`), or Redis full (`maxmemory` just above what it holds) for `seconds`."""
    if kind == "flushall":
        client.flushall()
        run.events.append({"t": run.now(), "event": "redis_flushall"})
        run.stop.wait(seconds)
        return
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory", used + 256 * 1024)
    run.events.append({"t": run.now(), "event": "redis_full", "seconds": round(seconds, 1)})
    try:
        run.stop.wait(seconds)
    finally:
        client.config_set("maxmemory", 0)
    run.events.append({"t": run.now(), "event": "redis_full_end"})


def _sample_redis(client: Any, run: _Run, samples: list[tuple[float, int]]) -> None:
    while not run.stop.is_set():
        try:
            samples.append((run.now(), int(client.info("memory")["used_memory"])))
        except Exception:  # noqa: BLE001 - paused or full: sample later
            pass
        run.stop.wait(2.0)


def soak(
    minutes: float,
    streams: int,
    out: Path,
    *,
    kills: int | None = None,
    redis_pauses: int | None = None,
    broker_pauses: int | None = None,
    flushes: int | None = None,
    ooms: int | None = None,
    churn: float = 0.3,
    rate: float = 0.5,
    model: str = "smollm2-135m",
    threads: int = 1,
    seed: int = 0,
    max_redis_pause_s: float = 30.0,
    max_broker_pause_s: float = 15.0,
    drain_timeout_s: float | None = None,
) -> dict[str, Any]:
    """Run the soak (see the module docstring) and return its report; also written to `out/bench_soak.json`.

    Fault counts default to one SIGKILL per minute, one Redis pause per two minutes and one broker pause per three
    (at least one of each). `rate` is records per second over all `streams`.
    """
    if minutes <= 0 or streams < 1 or rate <= 0:
        raise ValueError(f"expected minutes > 0, streams >= 1 and rate > 0, got {minutes}, {streams}, {rate}")
    kills = max(1, round(minutes)) if kills is None else kills
    redis_pauses = max(1, round(minutes / 2)) if redis_pauses is None else redis_pauses
    broker_pauses = max(1, round(minutes / 3)) if broker_pauses is None else broker_pauses
    flushes = max(1, round(minutes / 4)) if flushes is None else flushes
    ooms = max(1, round(minutes / 4)) if ooms is None else ooms
    duration_s = minutes * 60.0
    drain_timeout_s = max(180.0, duration_s) if drain_timeout_s is None else drain_timeout_s
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    load_at_start = common.machine()["load_average"]
    workdir = Path(tempfile.mkdtemp(prefix="sinkstream-soak-"))
    broker = start_tansu(workdir / "kafka")
    redis_proc = start_redis(workdir / "redis")
    run = _Run(time.monotonic())
    services: list[_Service] = []
    threads_: list[threading.Thread] = []
    kill_log: list[dict[str, Any]] = []
    final_exit: int | None = None
    import redis as redis_lib

    redis_client = redis_lib.Redis(host="127.0.0.1", port=redis_proc.port, socket_timeout=5)
    redis_client.config_set("maxmemory-policy", "noeviction")
    redis_samples: list[tuple[float, int]] = []
    try:
        bootstrap, redis_url = f"127.0.0.1:{broker.port}", f"redis://127.0.0.1:{redis_proc.port}/0"
        partitions = min(streams, 4)
        topic, out_topic = "soak.in", "soak.out"
        create_topics(bootstrap, {topic: partitions, out_topic: 1})
        config_path = workdir / "service.yaml"
        config_path.write_text(yaml.safe_dump(_service_config(bootstrap, redis_url, topic, out_topic, model, threads,
                                                              SESSION_GAP if churn else 0)))
        services.append(_start_service(config_path, workdir, 0, run))
        produce_until = duration_s * PRODUCE_SHARE
        for target, args in ((_sample_rss, (services, run)), (_read, (bootstrap, out_topic, run)),
                             (_produce, (bootstrap, topic, streams, rate, produce_until, seed, run, churn)),
                             (_sample_redis, (redis_client, run, redis_samples))):
            th = threading.Thread(target=target, args=args, daemon=True)
            th.start()
            threads_.append(th)
        # Faults start once the first incarnation wrote a checkpoint (so a kill exercises the resume path), and
        # end with the run.
        deadline = time.monotonic() + 300
        while '"checkpoint.done"' not in services[0].log_text():
            if not services[0].alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the service wrote no checkpoint within 300 s: {services[0].log_text()[-2000:]}")
            time.sleep(0.5)
        run.events.append({"t": run.now(), "event": "first_checkpoint"})
        start_s = run.now() + 5.0
        plan = _schedule(rng, kills, redis_pauses, broker_pauses, start_s, max(start_s + 1.0, duration_s),
                         max_redis_pause_s, max_broker_pause_s, flushes, ooms)
        planned = [(round(t, 1), k, round(d, 1)) for t, k, d in plan]
        run.events.append({"t": run.now(), "event": "chaos_plan", "plan": planned})
        for at, kind, seconds in plan:
            while run.now() < at:
                time.sleep(0.2)
            if kind == "kill":
                svc = services[-1]
                # Kill an incarnation only once it published annotations of its own (so it survived the previous
                # kill, and the kill lands between publishing and a checkpoint): on a slow machine a restart takes
                # longer than the gap between two planned kills. Bounded wait.
                # Better still (up to 120 s more): after an annotation published since its last checkpoint, so
                # the restart replays it (a duplicate that must be byte-identical).
                ready_by = time.monotonic() + 180
                while svc.alive() and time.monotonic() < ready_by and not (
                    '"partition.assigned"' in svc.log_text() and len(run.messages) > svc.messages_at_start
                ):
                    time.sleep(0.5)
                checkpoints, since = -1, len(run.messages)
                replay_by = time.monotonic() + 120
                while svc.alive() and time.monotonic() < replay_by:
                    acked, annotated = _covered(run, topic)
                    if run.now() > produce_until and annotated == acked:
                        break  # nothing left to publish, so nothing to replay: kill now
                    done = svc.log_text().count('"checkpoint.done"')
                    if done != checkpoints:
                        checkpoints, since = done, len(run.messages)
                    elif len(run.messages) > since:
                        break
                    time.sleep(0.3)
                if svc.alive():
                    svc.proc.send_signal(signal.SIGKILL)
                    svc.proc.wait(60)
                run.events.append({"t": run.now(), "event": "kill", "pid": svc.proc.pid})
                time.sleep(seconds)
                services.append(_start_service(config_path, workdir, len(services), run))
                kill_log.append({"t": round(at, 1), "killed_pid": svc.proc.pid, "restarted_pid": services[-1].proc.pid})
            elif kind == "redis":
                _pause(redis_proc, seconds, run, "redis")
            elif kind in ("flushall", "oom"):
                _redis_fault(redis_client, kind, seconds, run)
            else:
                _pause(broker, seconds, run, "broker")
        # Drain: production is over; wait until every acknowledged input is annotated (or the timeout).
        threads_[2].join(timeout=180)
        drain_deadline = time.monotonic() + drain_timeout_s
        while time.monotonic() < drain_deadline:
            acked, done = _covered(run, topic)
            if acked and done == acked:
                break
            if not services[-1].alive():  # an unexpected exit: note it and restart, the audit will tell
                run.events.append({"t": run.now(), "event": "service_exited", "code": services[-1].proc.returncode})
                services.append(_start_service(config_path, workdir, len(services), run))
            time.sleep(1.0)
        acked, done = _covered(run, topic)
        run.events.append({"t": run.now(), "event": "drained" if acked and done == acked else "drain_timeout",
                           "acked": acked, "annotated": done})
        svc = services[-1]
        ready_by = time.monotonic() + 180  # SIGTERM a running service, not one still loading its model
        while svc.alive() and '"partition.assigned"' not in svc.log_text() and time.monotonic() < ready_by:
            time.sleep(0.5)
        if svc.alive():
            svc.proc.send_signal(signal.SIGTERM)
            try:
                final_exit = svc.proc.wait(180)
            except subprocess.TimeoutExpired:
                svc.proc.kill()
                final_exit = svc.proc.wait(30)
        else:
            final_exit = svc.proc.returncode
        run.events.append({"t": run.now(), "event": "service_stopped", "code": final_exit})
        time.sleep(2.0)  # the reader catches the shutdown's last annotations
    finally:
        run.stop.set()
        redis_client.close()
        for svc in services:
            if svc.alive():
                svc.proc.kill()
                svc.proc.wait(30)
        for th in threads_:
            th.join(timeout=10)
        for proc in (redis_proc, broker):
            try:
                os.kill(proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            proc.stop()
    report = _audit(run, topic, services, kill_log, final_exit)
    report.update(_churn_report(run, redis_samples, produce_until))
    report.update({
        "benchmark": "soak", "minutes": minutes, "streams": streams, "partitions": min(streams, 4),
        "rate_records_per_s": rate, "model": model, "torch_threads": threads, "seed": seed,
        "settings": {"window": 252, "sinks": 4, "chunk": 64, "checkpoint_every_records": 5,
                     "checkpoint_every_seconds": 5.0, "redis_socket_timeout_s": 3.0,
                     "session_gap_records": SESSION_GAP if churn else 0, "churn_share": churn},
        "load_average_at_start": load_at_start, "load_average_at_end": common.machine()["load_average"],
        "machine": common.machine(), "workdir": str(workdir), "events": run.events,
    })
    path = out / "bench_soak.json"
    path.write_text(json.dumps(report, indent=1))
    plot_timeline(run, report, out / "bench_soak.png")
    return report


def _churn_report(run: _Run, samples: list[tuple[float, int]], produce_until: float) -> dict[str, Any]:
    """Key churn and Redis memory: closed verdicts per churn key, and Redis used memory over the run."""
    closed: dict[str, int] = defaultdict(int)
    ids: set[str] = set()
    for _, raw in run.messages:
        doc = json.loads(raw)
        if doc["kind"] == "closed" and doc["id"] not in ids:
            ids.add(doc["id"])
            closed[doc["stream"]] += 1
    churn_keys = next((e.get("churn_keys", 0) for e in run.events if e["event"] == "production_done"), 0)

    def at(t: float) -> float | None:
        before = [b for s, b in samples if s <= t]
        return round(before[-1] / 1e6, 1) if before else None

    return {
        "churn_keys": churn_keys,
        "churn_keys_closed": sum(1 for k in closed if k.startswith("churn-")),
        "closed_more_than_once": sum(1 for n in closed.values() if n > 1),
        "redis_used_mb": {"mid_production": at(produce_until / 2), "end_production": at(produce_until),
                          "end": at(float("inf")),
                          "peak": round(max((b for _, b in samples), default=0) / 1e6, 1)},
        "redis_flushalls": sum(1 for e in run.events if e["event"] == "redis_flushall"),
        "redis_full": sum(1 for e in run.events if e["event"] == "redis_full"),
        "stalls": _stalls(run),
    }


def _stalls(run: _Run) -> int:
    """Gaps of more than STALL_S without an annotation while inputs waited, outside faults and restarts."""
    busy: list[tuple[float, float]] = []
    open_at: dict[str, float] = {}
    for e in run.events:
        name, t = e["event"], e["t"]
        if name in ("redis_pause", "broker_pause", "redis_full", "kill"):
            open_at[name] = t
        elif name in ("redis_resume", "broker_resume", "redis_full_end"):
            key = {"redis_resume": "redis_pause", "broker_resume": "broker_pause"}.get(name, "redis_full")
            busy.append((open_at.pop(key, t), t))
        elif name == "service_start" and "kill" in open_at:
            busy.append((open_at.pop("kill"), t + 90.0))  # model load and group join on a loaded machine
    arrivals = sorted(at for at, _ in run.messages)
    acked = sorted(run.acked.values())
    stalls = 0
    for a, b in zip(arrivals, arrivals[1:]):
        waiting = any(a <= t < b for t in acked) or b - a > STALL_S and acked and acked[-1] > a
        covered = any(s <= a + STALL_S and e >= b - STALL_S for s, e in busy)
        if b - a > STALL_S and waiting and not covered:
            stalls += 1
    return stalls


def _state_lost_from(services: list[_Service]) -> dict[int, list[tuple[int, float]]]:
    """Per partition, the offset ranges an incarnation re-scored without state: from the committed offset it
    resumed from after `state.lost` up to its first checkpoint of that partition (`checkpoint.done`), open-ended
    when it wrote none before it ended."""
    out: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for svc in services:
        open_from: dict[int, int] = {}
        for line in svc.log_text().splitlines():
            if '"state.lost"' not in line and '"checkpoint.done"' not in line:
                continue
            try:
                doc = json.loads(line)
                partition = int(str(doc["partition"]).rsplit(":", 1)[1])
                if doc["event"] == "state.lost":
                    open_from.setdefault(partition, int(doc["committed_offset"]))
                elif doc["event"] == "checkpoint.done" and partition in open_from:
                    out[partition].append((open_from.pop(partition), float(doc["offset"])))
            except (ValueError, KeyError, IndexError, TypeError):
                continue
        for partition, first in open_from.items():
            out[partition].append((first, math.inf))
    return dict(out)


def _after_state_loss(annotation_id: str, topic: str, lost: dict[int, list[tuple[int, float]]]) -> bool:
    """`annotation_id` (`topic/partition/offset/kind`) is of a record re-scored without its partition's state."""
    parts = annotation_id.split("/")
    if len(parts) != 4 or parts[0] != topic or not parts[1].isdigit() or not parts[2].isdigit():
        return False
    offset = int(parts[2])
    return any(first <= offset < end for first, end in lost.get(int(parts[1]), []))


def _audit(
    run: _Run, topic: str, services: list[_Service], kill_log: list[dict[str, Any]], final_exit: int | None
) -> dict[str, Any]:
    copies: dict[str, list[bytes]] = defaultdict(list)
    first_seen: dict[tuple[int, int], float] = {}
    kinds: dict[str, int] = defaultdict(int)
    for at, raw in run.messages:
        doc = json.loads(raw)
        copies[doc["id"]].append(raw)
        src = doc["source"]
        if src["topic"] == topic and doc["kind"] in ("score", "error"):
            key = (src["partition"], src["offset"])
            first_seen.setdefault(key, at)
    for aid in copies:
        kinds[aid.rsplit("/", 1)[-1]] += 1
    acked = dict(run.acked)
    lost = sorted(k for k in acked if k not in first_seen)
    latencies = [first_seen[k] - t for k, t in acked.items() if k in first_seen]
    mismatched = sorted(aid for aid, blobs in copies.items() if any(b != blobs[0] for b in blobs))
    lost_from = _state_lost_from(services)
    after_loss = [aid for aid in mismatched if _after_state_loss(aid, topic, lost_from)]
    restarts_ok = 0
    for svc in services[1:]:
        if '"partition.assigned"' in svc.log_text():
            restarts_ok += 1
    tracebacks = sum(1 for svc in services if "Traceback" in svc.log_text())
    return {
        "records_produced": len(acked),
        "produce_errors": run.produce_errors,
        "records_processed": len(first_seen),
        "annotations_received": len(run.messages),
        "distinct_annotations": len(copies),
        "annotations_by_kind": dict(kinds),
        "duplicates_before_dedupe": len(run.messages) - len(copies),
        # Inputs without an annotation when the run ended; with `drained` False the service was still behind
        # (throughput), not necessarily losing them: the next run would resume from its last checkpoint.
        "drained": any(e["event"] == "drained" for e in run.events),
        "inputs_lost": len(lost),
        "lost_examples": [list(k) for k in lost[:10]],
        "payload_mismatches_after_dedupe": len(mismatched),
        "mismatch_examples": mismatched[:10],
        # Of those, ids re-scored after their partition's state was lost (from the committed offset an incarnation
        # resumed from after `state.lost` to its first checkpoint): the context they were first scored with is
        # gone, so their bytes differ by design. The rest would be non-exact replays (must be 0).
        "mismatches_after_state_loss": len(after_loss),
        "mismatches_unexplained": len(mismatched) - len(after_loss),
        "kills": len(kill_log),
        "kills_survived": min(len(kill_log), restarts_ok),
        "kill_log": kill_log,
        "redis_pauses": sum(1 for e in run.events if e["event"] == "redis_pause"),
        "redis_pause_s": [e["seconds"] for e in run.events if e["event"] == "redis_pause"],
        "broker_pauses": sum(1 for e in run.events if e["event"] == "broker_pause"),
        "broker_pause_s": [e["seconds"] for e in run.events if e["event"] == "broker_pause"],
        "service_incarnations": len(services),
        "unexpected_exits": sum(1 for e in run.events if e["event"] == "service_exited"),
        "logs_with_traceback": tracebacks,
        "final_exit_code": final_exit,
        "worst_record_latency_s": round(max(latencies), 2) if latencies else None,
        "median_record_latency_s": round(sorted(latencies)[len(latencies) // 2], 2) if latencies else None,
        "peak_rss_mb": round(max((s.peak_kb for s in services), default=0) / 1024, 1),
        "run_s": round(run.now(), 1),
    }


def plot_timeline(run: _Run, report: dict[str, Any], path: Path) -> None:
    """Inputs acknowledged and inputs annotated over time, with the faults marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acked_times = sorted(run.acked.values())
    seen: dict[tuple[int, int], float] = {}
    for at, raw in run.messages:
        doc = json.loads(raw)
        if doc["kind"] in ("score", "error"):
            seen.setdefault((doc["source"]["partition"], doc["source"]["offset"]), at)
    done_times = sorted(seen.values())
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.step(acked_times, range(1, len(acked_times) + 1), where="post", label="records produced (acked)")
    ax.step(done_times, range(1, len(done_times) + 1), where="post", label="records annotated")
    starts: dict[str, float] = {}
    labelled: set[str] = set()
    for e in run.events:
        name = e["event"]
        if name.endswith("_pause"):
            starts[name[:-6]] = e["t"]
        elif name.endswith("_resume"):
            what = name[:-7]
            color = "tab:red" if what == "redis" else "tab:orange"
            ax.axvspan(starts.pop(what, e["t"]), e["t"], color=color, alpha=0.2,
                       label=None if what in labelled else f"{what} paused")
            labelled.add(what)
        elif name == "kill":
            ax.axvline(e["t"], color="k", ls="--", lw=1, label=None if "kill" in labelled else "SIGKILL + restart")
            labelled.add("kill")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("records")
    ax.set_title(f"soak: {report['records_produced']} records, {report['kills']} kills, {report['redis_pauses']} Redis "
                 f"and {report['broker_pauses']} broker pauses; lost {report['inputs_lost']}, "
                 f"mismatches {report['payload_mismatches_after_dedupe']} "
                 f"({report['mismatches_after_state_loss']} after state loss)")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run_cli(args: Any) -> int:
    """`sinkstream bench soak --minutes M --streams K --out DIR` (registered in `pipeline.cli.bench`)."""
    streams = args.streams[0] if args.streams else 4
    report = soak(args.minutes, streams, args.out, model=args.model, threads=args.threads or 1)
    keys = ["records_produced", "records_processed", "kills", "kills_survived", "redis_pauses", "broker_pauses",
            "redis_flushalls", "redis_full", "churn_keys", "churn_keys_closed", "closed_more_than_once",
            "redis_used_mb", "stalls", "duplicates_before_dedupe", "inputs_lost", "payload_mismatches_after_dedupe",
            "mismatches_after_state_loss", "mismatches_unexplained", "worst_record_latency_s", "peak_rss_mb",
            "final_exit_code"]
    sys.stdout.write("\n## bench soak\n" + "\n".join(f"{k}: {report[k]}" for k in keys)
                     + f"\nwrote {args.out / 'bench_soak.json'} and .png\n")
    return 0 if report["inputs_lost"] == 0 and report["mismatches_unexplained"] == 0 else 1
