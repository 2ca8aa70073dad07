"""`sinkstream bench`: latency, overhead, ingest, memory and multi-stream benchmarks, each as JSON + PNG.

Every benchmark writes `<out>/bench_<name>.json` (with the machine description) and `<out>/bench_<name>.png`,
and prints a short summary to stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from pipeline.bench import batch, common, ingest, latency, memory, overhead
from pipeline.cli.common import (
    DEVICES,
    DTYPES,
    add_model_options,
    int_list,
    load_model_for_cli,
    non_negative_int,
    positive_int,
)
from pipeline.errors import UserError
from pipeline.evaluation.plots import Panel, save_figure

BENCHES = ("latency", "overhead", "ingest", "memory", "batch", "service", "streams")



def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmarks: latency vs cache size, overhead vs DynamicCache, ingest, memory, batched streams",
        description=(
            "latency: per-token decode latency vs cache size for sink/window/dense/recompute (paper Fig. 10). "
            "overhead: sink decode step vs DynamicCache over the same keys. ingest: chunked tokens/s vs a raw "
            "forward at the same span. memory: peak RSS after N streamed tokens (subprocess). batch: B streams "
            "in one forward vs one by one. service: end-to-end tokens/s through the embedded broker and Redis vs "
            "model-only, and the cost of checkpointing one full stream. churn: --churn-keys one-session keys with "
            "service.session_gap on vs the same lines under 15 keys (Redis memory, throughput, closed verdicts). "
            "llamacpp: llama.cpp (llama-cpp-python, built once into $SINKSTREAM_HOME/bench/llamacpp) on the same GGUF "
            "beside the pooled path per --dtype, for --streams (default 1,64). Writes bench_<name>.json/.png under "
            "--out."
        ),
    )
    # churn and soak start their own Redis (and broker) and run for minutes, llamacpp needs its own build: not in "all"
    p.add_argument("benchmark", nargs="?", choices=[*BENCHES, "churn", "soak", "llamacpp", "all"], default="all")
    p.add_argument("--out", type=Path, default=Path("out/bench"), help="output folder (default out/bench)")
    p.add_argument("--quick", action="store_true", help="fewer sizes, steps and repeats; shorter memory run")
    p.add_argument("--repeats", type=positive_int, default=None, help="repeats per measurement (median is reported)")
    p.add_argument("--sizes", type=int_list, default=None, help="latency: cache sizes (default 256,512,1024,2048,4096)")
    p.add_argument("--keys", type=int_list, default=None, help="overhead: key counts (default 256,1024,4096)")
    p.add_argument("--chunks", type=int_list, default=None, help="ingest: chunk sizes (default 1,16,64,256,512)")
    p.add_argument("--sinks", type=non_negative_int, default=4, help="sinks S of the sink caches (default 4)")
    p.add_argument("--window", type=positive_int, default=1020, help="ingest, memory, batch: window W (default 1020)")
    p.add_argument("--streams", type=int_list, default=None,
                   help="batch: stream counts (default 1,4,16); streams: stream counts (default 1,16,64,256)")
    p.add_argument("--templates", choices=("on", "off", "both"), default="on",
                   help="streams: run the service with the template memory, combined score and verdicts (issue 18) "
                        "on, off, or both side by side in the same run (reports on/off throughput; default on)")
    p.add_argument(
        "--memory-tokens", type=int_list, default=None, help="memory: checkpoints for --model (default 10000,100000)"
    )
    p.add_argument(
        "--tiny-tokens",
        type=int_list,
        default=None,
        help="memory: checkpoints for the tiny model (default 10000,100000,1000000)",
    )
    p.add_argument(
        "--minutes",
        type=float,
        default=10.0,
        help="soak: run length in minutes (default 10; --streams K: keyed streams, default 4)",
    )
    p.add_argument("--churn-keys", type=positive_int, default=2000,
                   help="churn: one-session keys (default 2000; 2 lines each, session_gap 64 records)")
    add_model_options(p, device_and_dtype=False)
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="where the model runs (default auto: cuda when available, else cpu)")
    p.add_argument("--dtype", type=dtype_list, default=["auto"],
                   help="weights and activations (default auto: bfloat16 or float16 on CUDA; on a CPU bfloat16 where "
                        "it has amx_bf16, else float32); streams: a comma-separated list "
                        "(float32,bfloat16) runs the same benchmark in each, side by side")
    p.add_argument("--rounds", type=positive_int, default=1,
                   help="streams with a --dtype list: run the dtypes alternately this many times in one process and "
                        "keep each dtype's best round (by service tokens/s at the largest --streams), so a busy "
                        "moment of a shared machine hurts no dtype more; every round's figures stay in the JSON "
                        "(default 1)")
    p.set_defaults(func=run)


def dtype_list(text: str) -> list[str]:
    """argparse type for "float32,bfloat16": dtypes of `DTYPES`, no repeats."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in DTYPES]
    if not values or bad or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected comma-separated dtypes from {', '.join(DTYPES)} without "
                                         f"repeats, got {text!r}")
    return values


def _pick(value, full, quick, is_quick):
    return value if value is not None else (quick if is_quick else full)


def _latency(lm, args, note):
    sizes = _pick(args.sizes, [256, 512, 1024, 2048, 4096], [256, 1024, 2048], args.quick)
    r = latency.latency(
        lm,
        sizes,
        sinks=args.sinks,
        steps=4 if args.quick else 8,
        repeats=_pick(args.repeats, 3, 2, args.quick),
        progress=note,
    )
    ms = r["ms_per_token"]
    series = {p: (sizes, [ms[p][s] for s in sizes]) for p in ms}
    speed, cpu_speed = r["speedup_sink_over_recompute"], r["cpu_speedup_sink_over_recompute"]
    panels = [
        Panel("per-token decode latency (wall)", "cache size (tokens)", "ms / token", series, logx=True, logy=True),
        Panel(
            "speedup of sink over recompute",
            "cache size (tokens)",
            "x",
            {
                "wall time": (sizes, [speed.get(s) for s in sizes]),
                "CPU time": (sizes, [cpu_speed.get(s) for s in sizes]),
            },
            logx=True,
            logy=True,
            hlines={"paper: 22.2x": 22.2},
        ),
    ]
    lines = [
        f"cache {s}: "
        + ", ".join(f"{p} {ms[p][s]:.1f} ms" for p in ms)
        + (f"; sink {speed[s]:.1f}x faster than recompute ({cpu_speed[s]:.1f}x in CPU time)" if speed else "")
        for s in sizes
    ]
    return r, panels, lines


def _overhead(lm, args, note):
    keys = _pick(args.keys, [256, 1024, 4096], [1024], args.quick)
    r = overhead.overhead(lm, keys, sinks=args.sinks, repeats=_pick(args.repeats, 5, 3, args.quick), progress=note)
    rows = r["rows"]
    panels = [
        Panel(
            "decode step over the same keys",
            "keys attended",
            "ms / step",
            {
                "sink cache step": (keys, [x["sink_ms"] for x in rows]),
                "DynamicCache step": (keys, [x["dynamic_ms"] for x in rows]),
            },
            logx=True,
        ),
        Panel(
            "sink / DynamicCache",
            "keys attended",
            "time ratio",
            {"ratio": (keys, [x["ratio"] for x in rows])},
            logx=True,
            hlines={"goal 1.05": 1.05},
        ),
    ]
    lines = [
        f"{x['keys']} keys: sink {x['sink_ms']:.2f} ms, DynamicCache {x['dynamic_ms']:.2f} ms, ratio {x['ratio']:.3f} "
        f"(CPU time {x['cpu_ratio']:.3f}; goal <= 1.05)"
        for x in rows
    ]
    return r, panels, lines


def _ingest(lm, args, note):
    chunks = _pick(args.chunks, [1, 16, 64, 256, 512], [1, 64, 256], args.quick)
    r = ingest.ingest(lm, chunks, args.sinks, args.window, repeats=_pick(args.repeats, 3, 2, args.quick), progress=note)
    rows = r["rows"]
    panels = [
        Panel(
            f"ingest at span {r['span']}",
            "chunk (tokens per forward)",
            "tokens / s",
            {
                "sink cache": (chunks, [x["sink_tokens_per_s"] for x in rows]),
                "raw forward": (chunks, [x["raw_tokens_per_s"] for x in rows]),
            },
            logx=True,
            logy=True,
        ),
        Panel(
            "sink / raw throughput",
            "chunk",
            "ratio",
            {"ratio": (chunks, [x["ratio"] for x in rows])},
            logx=True,
            hlines={"goal 0.9": 0.9},
        ),
    ]
    lines = [
        f"chunk {x['chunk']}: sink {x['sink_tokens_per_s']:.0f} tok/s, raw {x['raw_tokens_per_s']:.0f} tok/s, "
        f"ratio {x['ratio']:.3f} "
        f"(CPU time {x['cpu_ratio']:.3f}; goal >= 0.9)"
        for x in rows
    ]
    return r, panels, lines


def _memory(lm, args, note):
    real_cp = _pick(args.memory_tokens, [10_000, 100_000], [2_000, 10_000], args.quick)
    tiny_cp = _pick(args.tiny_tokens, [10_000, 100_000, 1_000_000], [10_000, 100_000, 1_000_000], args.quick)
    runs = {}
    for model, cps in ((args.model, real_cp), (memory.TINY, tiny_cp)):
        with tqdm(total=max(cps), desc=f"memory {model}", unit="tok", file=sys.stderr) as bar:
            runs[model] = memory.memory(model, cps, args.sinks, args.window, threads=args.threads,
                                               progress=lambda rd, bar=bar: bar.update(rd["tokens"] - bar.n))
    r = {"benchmark": "memory", "runs": runs, "goal_ratio_max": 1.02}
    panels = [
        Panel(
            f"RSS while streaming ({args.sinks}+{args.window} cache)",
            "tokens streamed",
            "MiB",
            {
                f"{m} peak": ([x["tokens"] for x in v["readings"][1:]], [x["peak_rss_mb"] for x in v["readings"][1:]])
                for m, v in runs.items()
            }
            | {
                f"{m} current": ([x["tokens"] for x in v["readings"][1:]], [x["rss_mb"] for x in v["readings"][1:]])
                for m, v in runs.items()
            },
            logx=True,
            logy=True,
        )
    ]
    lines = [f"{m}: " + ", ".join(f"{x['tokens']} tok peak {x['peak_rss_mb']:.0f} MiB" for x in v["readings"][1:])
             + f"; peak ratio last/first {v['peak_ratio_last_over_first']:.4f} (goal <= 1.02)" for m, v in runs.items()]
    return r, panels, lines


def _batch(lm, args, note):
    streams = _pick(args.streams, [1, 4, 16], [1, 4, 16], args.quick)
    r = batch.batch(
        lm,
        streams,
        args.sinks,
        args.window,
        steps=4 if args.quick else 8,
        repeats=_pick(args.repeats, 3, 2, args.quick),
        progress=note,
    )
    rows = r["rows"]
    panels = [Panel("B streams, one token each", "streams B", "tokens / s",
                    {"batched step_many": (streams, [x["batched_tokens_per_s"] for x in rows]),
                     "one by one": (streams, [x["sequential_tokens_per_s"] for x in rows])}, logx=True)]
    lines = [
        f"B={x['streams']}: batched {x['batched_tokens_per_s']:.1f} tok/s, "
        f"one by one {x['sequential_tokens_per_s']:.1f} tok/s, "
        f"speedup {x['speedup']:.2f}x (CPU time {x['cpu_speedup']:.2f}x), "
        f"max |logit diff| {x['max_abs_logit_diff']:.2e}"
        for x in rows
    ]
    return r, panels, lines


def _service(lm, args, note):
    from pipeline.bench.service import bench_service, plot_service

    note("service")
    values = {"cache": {"sinks": args.sinks, "window": args.window}, "model": {"name": args.model}}
    r = bench_service(lm, values, quick=args.quick)
    cp = r["checkpoint"]
    lines = [
        f"model only {r['model_only']['tokens_per_s']:.0f} tok/s, session {r['session']['tokens_per_s']:.0f} tok/s, "
        f"end to end {r['end_to_end']['tokens_per_s']:.0f} tok/s: "
        f"{r['ratio_end_to_end_vs_model_only']:.2f}x of model-only (goal >= 0.9x)",
        f"checkpoint of one stream ({cp['tokens_in_cache']} tokens, {cp['bytes'] / 1e6:.1f} MB): "
        f"snapshot {cp['snapshot_ms']:.0f} ms + Redis {cp['redis_write_ms']:.0f} ms = {cp['checkpoint_ms']:.0f} ms "
        f"(goal < 150 ms); restore {cp['restore_ms']:.0f} ms",
    ]
    return r, lambda path: plot_service(r, path), lines


def _streams(lm, args, note):
    from pipeline.bench.streams import bench_streams, plot_streams

    counts = args.streams or ([4, 16] if args.quick else [1, 16, 64, 256])
    r = bench_streams(
        lm,
        counts,
        sinks=args.sinks,
        window=args.window,
        lines_per_stream=2 if args.quick else 4,
        decode_sizes=[1, 4] if args.quick else [1, 4, 16, 64],
        repeats=_pick(args.repeats, 2, 1, args.quick),
        progress=note,
        templates=args.templates,
    )
    lines = [
        f"N={x['streams']}: service {x['service_pool']['tokens_per_s']:.0f} tok/s "
        f"({x['service_pool']['lines_per_s']:.1f} lines/s, "
        f"{x['service_pool']['outside_model_fraction']:.0%} of it outside the model forward), "
        + (
            f"raw padded forward {x['raw_padded']['tokens_per_s']:.0f} tok/s: {x['pool_vs_raw']:.2f}x "
            "(goal >= 1.0 at 64)"
            if x["raw_padded"]
            else "raw padded forward not run (N > raw_max: its DynamicCache and padded batch outgrow this machine)"
        )
        + (
            f"; one cache per stream {x['service_per_stream']['tokens_per_s']:.0f} tok/s "
            f"({x['pool_vs_per_stream']:.2f}x)"
            if x["service_per_stream"]
            else ""
        )
        for x in r["rows"]
    ]
    for x in r["rows"]:
        if x["templates_on_vs_off"] is not None:
            lines.append(f"N={x['streams']}: templates on {x['service_pool']['tokens_per_s']:.0f} tok/s, off "
                         f"{x['service_pool_templates_off']['tokens_per_s']:.0f} tok/s: "
                         f"{x['templates_on_vs_off']:.3f}x (goal >= 0.9)")
    for d in r.get("decode", {}).get("rows", []):
        lines.append(
            f"decode B={d['streams']}: pooled {d['tokens_per_s']['pool_batched']:.0f} tok/s, "
            f"DynamicCache batched {d['tokens_per_s']['dynamic_batched']:.0f} tok/s: {d['pool_vs_dynamic']:.2f}x "
            f"(goal >= 0.8 at 16); one by one {d['tokens_per_s']['pool_one_by_one']:.0f} tok/s"
        )
    lines.append(f"memory per resident stream: {r['bytes_per_resident_stream'] / 1e6:.1f} MB")
    return r, lambda path: plot_streams(r, path), lines


def _churn(lm, args, note):
    from pipeline.bench.churn import bench_churn, plot_churn

    keys = 100 if args.quick else args.churn_keys
    r = bench_churn(lm, keys, threads=args.threads or 1, progress=note)
    a, b = r["busy"], r["churn"]
    lines = [
        f"{a['keys']} busy keys: {a['tokens_per_s']:.0f} tok/s, Redis {a['redis_used_bytes'] / 1e6:.1f} MB at the end",
        f"{b['keys']} one-session keys: {b['tokens_per_s']:.0f} tok/s ({r['throughput_ratio']:.2f}x, goal >= 0.9), "
        f"Redis {b['redis_used_bytes'] / 1e6:.1f} MB ({r['redis_memory_ratio']:.2f}x, goal <= 2), "
        f"{b['closed_keys']} keys closed ({b['closed_more_than_once']} more than once), "
        f"{b['open_keys_at_end']} open at the end",
        f"per open stream: {b['snapshot_bytes_per_open_stream'] / 1e6:.2f} MB of snapshot + "
        f"{b['manifest_bytes_per_open_key']:.0f} B of manifest; per closed key: "
        f"{b['manifest_bytes_per_closed_key']:.0f} B of manifest",
    ]
    return r, lambda path: plot_churn(r, path), lines


def _llamacpp(args: argparse.Namespace) -> int:
    """`bench llamacpp`: llama.cpp and the pooled path per dtype, one process, one thread count."""
    from pipeline.bench.llamacpp import bench_llamacpp, table
    from pipeline.evaluation.datasets import loghub_dir

    args.out.mkdir(parents=True, exist_ok=True)
    threads = args.threads or 1
    started, load_at_start = time.perf_counter(), common.machine()["load_average"]
    models = [load_model_for_cli(args.model, device=args.device, dtype=d, threads=threads) for d in args.dtype]
    with tqdm(desc="bench llamacpp", file=sys.stderr, bar_format="{desc} [{elapsed}]") as bar:
        result = bench_llamacpp(models, loghub_dir(), threads, args.streams or [1, 64],
                                repeats=_pick(args.repeats, 2, 1, args.quick),
                                progress=lambda text: bar.set_description_str(f"bench {text}"))
    result = {**result, "model": args.model, "machine": common.machine(models[0]),
              "load_average_at_start": load_at_start, "seconds": time.perf_counter() - started}
    path = args.out / "bench_llamacpp.json"
    path.write_text(json.dumps(result, indent=1))
    lines = table(result)
    if "error" in result["llamacpp"]:
        lines.append(f"llama.cpp not measured: {result['llamacpp']['error']}")
    (args.out / "bench_llamacpp.md").write_text("\n".join(lines) + "\n")
    sys.stdout.write(f"\n## bench llamacpp ({result['seconds']:.0f} s)\n" + "\n".join(lines)
                     + f"\nwrote {path} and .md\n")
    return 0


def _streams_by_dtype(args: argparse.Namespace) -> int:
    """`bench streams --dtype a,b`: the same streams run (and raw forward) in each dtype, in one process."""
    import gc

    from pipeline.bench.streams import compare_dtypes, plot_streams_dtypes

    args.out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict] = {}
    found_by: dict[str, list[str]] = {}
    rounds: dict[str, list[list[float]]] = {}  # per dtype, per round: service tokens/s per stream count
    started = time.perf_counter()
    load_at_start = common.machine()["load_average"]
    models = {}
    for dtype in args.dtype:
        lm = load_model_for_cli(args.model, device=args.device, dtype=dtype, threads=args.threads)
        models[str(lm.dtype).removeprefix("torch.")] = lm
    for round_no in range(args.rounds):
        for name, lm in models.items():
            with tqdm(desc=f"bench streams {name} (round {round_no + 1}/{args.rounds})", file=sys.stderr,
                      bar_format="{desc} [{elapsed}]") as bar:
                result, _, found = _streams(lm, args, lambda text, bar=bar: bar.set_description_str(f"bench {text}"))
            rounds.setdefault(name, []).append([r["service_pool"]["tokens_per_s"] for r in result["rows"]])
            if name not in runs or (result["rows"][-1]["service_pool"]["tokens_per_s"]
                                    > runs[name]["rows"][-1]["service_pool"]["tokens_per_s"]):
                runs[name] = {**result, "machine": common.machine(lm), "round": round_no + 1}
                found_by[name] = found
            gc.collect()
    del models
    lines = [f"[{name}] {line}" for name in runs for line in found_by[name]]
    if args.rounds > 1:
        lines += [f"[{name}] service tok/s by round (streams {args.streams or 'default'}): "
                  + "; ".join(", ".join(f"{v:.0f}" for v in r) for r in rs) + f" (kept round {runs[name]['round']})"
                  for name, rs in rounds.items()]
    result = {**compare_dtypes(runs), "model": args.model, "quick": args.quick, "rounds": rounds,
              "load_average_at_start": load_at_start,
              "load_average_at_end": common.machine()["load_average"], "seconds": time.perf_counter() - started}
    for key, rows in result["ratios"].items():
        for r in rows:
            raw = f"{r['raw_padded']:.2f}x" if r["raw_padded"] else "not run"
            lines.append(f"{key} N={r['streams']}: service end to end {r['service_pool']:.2f}x, raw forward {raw}")
    path = args.out / "bench_streams_dtypes.json"
    path.write_text(json.dumps(result, indent=1))
    plot_streams_dtypes(result, path.with_suffix(".png"))
    sys.stdout.write(f"\n## bench streams by dtype ({result['seconds']:.0f} s)\n" + "\n".join(lines)
                     + f"\nwrote {path} and .png\n")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.benchmark == "soak":  # the real service under faults (pipeline/bench/soak.py); loads no model here
        from pipeline.bench.soak import run_cli
        return run_cli(args)
    names = BENCHES if args.benchmark == "all" else (args.benchmark,)
    if args.benchmark == "llamacpp":
        return _llamacpp(args)
    if len(args.dtype) > 1 and names != ("streams",):
        raise UserError(f"--dtype: expected one dtype for bench {args.benchmark}; a list ({','.join(args.dtype)}) "
                        "is for bench streams and bench llamacpp")
    if len(args.dtype) > 1:
        return _streams_by_dtype(args)
    lm = load_model_for_cli(args.model, device=args.device, dtype=args.dtype[0], threads=args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    info = common.machine(lm)
    sys.stdout.write(
        f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} with {info['torch_threads']} threads\n"
    )
    for name in names:
        load_at_start = common.machine()["load_average"]
        started = time.perf_counter()
        with tqdm(desc=f"bench {name}", file=sys.stderr, bar_format="{desc} [{elapsed}]") as bar:
            result, panels, lines = globals()[f"_{name}"](
                lm, args, lambda text, bar=bar: bar.set_description_str(f"bench {text}")
            )
        result = {**result, "model": args.model, "quick": args.quick, "machine": common.machine(lm),
                                  "load_average_at_start": load_at_start,
                                  "seconds": time.perf_counter() - started}
        path = args.out / f"bench_{name}.json"
        path.write_text(json.dumps(result, indent=1))
        if callable(panels):  # a benchmark with its own figure
            panels(path.with_suffix(".png"))
        else:
            save_figure(
                path.with_suffix(".png"),
                panels,
                f"sinkstream bench {name}: {args.model}, {info['cpu']}, {info['torch_threads']} threads",
            )
        sys.stdout.write(
            f"\n## bench {name} ({result['seconds']:.0f} s)\n" + "\n".join(lines) + f"\nwrote {path} and .png\n"
        )
        sys.stdout.flush()
    return 0
