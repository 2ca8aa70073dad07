"""Evaluation of the sink-token study: streaming perplexity through sinkstream's sink cache, attention share.

- `attention_share`: the paper's Figure 2/7 measurement. With eager attention on held-out windows, the average
  attention weight that queries in the second half of a window put on key positions 0..3, per layer
  (averaged over heads, queries and samples), next to what uniform attention would give.
- `streaming_table`: Table 3. Each model streams a held-out text through `model.sink_cache.SinkCache`
  (via `model.policies.score_ids`, i.e. `SinkModel.step`) with a fixed cache of W keys split as
  (sinks, window) = (0, W), (1, W-1), (2, W-2), (4, W-4), plus dense (no eviction). For the sink-token model
  the stream starts with the sink token, which is never scored; both models score the same targets
  (every held-out token after the first).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast

import structlog
import torch

from pipeline.evaluation import tables

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = structlog.get_logger(__name__)

FIRST_POSITIONS = 4
SINK_EPS = 0.3  # Gu et al. 2024's threshold for a sink head


@contextmanager
def _evaluating(model: torch.nn.Module, attention: str | None = None) -> Iterator[None]:
    """The one evaluation path of the study: the model in eval mode (and with `attention` as its attention
    implementation) inside the block, its training flag and attention implementation restored after."""
    was_training = model.training
    pretrained = cast("PreTrainedModel", model)  # an attention implementation exists on transformers models
    previous = pretrained.config._attn_implementation if attention is not None else None
    model.eval()
    if attention is not None:
        pretrained.set_attn_implementation(attention)
    try:
        yield
    finally:
        if previous is not None:
            pretrained.set_attn_implementation(previous)
        model.train(was_training)


@torch.no_grad()
def attention_share(model: PreTrainedModel, samples: torch.Tensor, sink_id: int | None) -> dict[str, Any]:
    """Attention weight on key positions 0..3 per layer, from queries in the second half of each window.

    `samples` (N, L) are text windows; with `sink_id` the sink token is prepended (position 0 is the sink).
    Returns {"share": [[layer][position]], "uniform": [position]}: `share[l][p]` is the mean over samples,
    heads and queries q >= T/2 of softmax weight on key p; `uniform[p]` is the same mean of 1/(q+1).
    """
    if sink_id is not None:
        samples = torch.cat([torch.full((samples.shape[0], 1), sink_id, dtype=samples.dtype), samples], dim=1)
    with _evaluating(model, attention="eager"):
        out = model(input_ids=samples, output_attentions=True, use_cache=False)
    length = samples.shape[1]
    lo = length // 2
    shares, per_head = [], []
    seeing = torch.arange(length, 0, -1, dtype=torch.float32)[:FIRST_POSITIONS]  # queries that see key k: T - k
    for att in out.attentions:  # (N, H, T, T) per layer
        first = att[:, :, lo:, :FIRST_POSITIONS].float()  # (N, H, T - lo, 4)
        shares.append([float(v) for v in first.mean(dim=(0, 1, 2))])
        # Gu et al. 2024's per-head score: mean over the queries that can see key k (every q >= k)
        per_head.append((att[:, :, :, :FIRST_POSITIONS].float().sum(dim=2) / seeing).mean(dim=0))  # (H, 4)
    heads = torch.stack(per_head)  # (layers, H, 4)
    q = torch.arange(lo, length, dtype=torch.float64)
    uniform = float((1.0 / (q + 1.0)).mean())
    return {
        "share": shares, "uniform": [uniform] * FIRST_POSITIONS, "queries_from": lo, "length": length,
        # per layer and head: mean attention on position 0 over all queries (the heat map)
        "head_first": [[float(v) for v in layer[:, 0]] for layer in heads],
        # Gu et al. 2024 (arXiv 2410.10781) Sink_k^eps: % of heads whose score on position k exceeds eps = 0.3
        "sink_rate": [float((heads[:, :, k] > SINK_EPS).float().mean()) * 100.0 for k in range(FIRST_POSITIONS)],
    }


def heldout_loss(model: torch.nn.Module, samples: torch.Tensor, sink_id: int | None) -> float:
    """Mean next-token NLL (nats) on held-out windows, scoring the same L-1 targets for both variants."""
    from pipeline.training.loop import lm_loss

    with _evaluating(model), torch.no_grad():
        return float(lm_loss(model, samples, sink_id))


def _perplexity(nlls: Sequence[float]) -> float:
    return math.exp(math.fsum(nlls) / len(nlls)) if nlls else float("nan")


def stream_perplexity(lm, ids: Sequence[int], sinks: int, cache: int | None, chunk: int,
                      sink_id: int | None) -> dict[str, Any]:
    """Stream `ids` through sinkstream's SinkCache with `sinks` sinks and `cache - sinks` window tokens.

    `cache=None` is dense (no eviction). With `sink_id` the stream is `[sink] + ids` and the prediction made
    at the sink token (of ids[0]) is dropped, so both variants score the targets ids[1:].
    """
    from model.policies import score_ids

    stream = ([sink_id] if sink_id is not None else []) + list(ids)
    offset = 1 if sink_id is not None else 0
    if cache is None:
        policy, s, w = "dense", 0, 1
    elif sinks == 0:
        policy, s, w = "window", 0, cache
    else:
        policy, s, w = "sink", sinks, cache - sinks
    nlls = [nll for i, _, nll in score_ids(lm, stream, policy, s, w, chunk=chunk) if i >= offset]
    return {
        "config": "dense" if cache is None else f"{sinks}+{cache - sinks}",
        "sinks": sinks if cache is not None else None,
        "window": (cache - sinks) if cache is not None else None,
        "targets": len(nlls),
        "mean_nll": math.fsum(nlls) / len(nlls) if nlls else float("nan"),
        "perplexity": _perplexity(nlls),
    }


def streaming_table(lm, streams: dict[str, list[int]], sinks: Sequence[int], cache: int, chunk: int,
                    sink_id: int | None, progress=None) -> list[dict[str, Any]]:
    """Table 3 rows for one model: every (sinks, cache - sinks) split and dense, on every held-out stream."""
    rows = []
    for kind, ids in streams.items():
        for s in list(sinks) + [None]:
            row = stream_perplexity(lm, ids, s or 0, None if s is None else cache, chunk, sink_id)
            row["stream"] = kind
            rows.append(row)
            log.info("pretrain.eval", stream=kind, config=row["config"], perplexity=round(row["perplexity"], 3))
            if progress is not None:
                progress(1)
    return rows


def markdown_table(results: dict[str, Any]) -> str:
    """The Table 3-shaped Markdown table: one row per (model, stream), one column per cache config, dense."""
    cache = results["config"]["eval_cache"]
    sinks = results["config"]["eval_sinks"]
    configs = [f"{s}+{cache - s}" for s in sinks] + ["dense"]
    table = []
    for variant, rows in results["streaming"].items():
        for kind in results["config"]["eval_kinds"]:
            by = {r["config"]: r["perplexity"] for r in rows if r["stream"] == kind}
            table.append([variant, kind, *(float(by[c]) if c in by else None for c in configs)])
    return tables.markdown_table(["model", "held-out stream", *configs], table)


def attention_table(results: dict[str, Any]) -> str:
    """Markdown: per model and layer, attention share on positions 0..3 (queries in the second half), uniform
    baseline, and Gu et al.'s sink rate (% of heads scoring > 0.3 on the position)."""
    rows: list[list[Any]] = []
    for variant, att in results["attention"].items():
        for layer, share in enumerate(att["share"]):
            rows.append([variant, layer, *(f"{v:.3f}" for v in share), f"{att['uniform'][0]:.3f}"])
        if "sink_rate" in att:
            rows.append([variant, f"heads > {SINK_EPS}", *(f"{v:.0f}%" for v in att["sink_rate"]), ""])
    return tables.markdown_table(["model", "layer", "pos 0", "pos 1", "pos 2", "pos 3", "uniform"], rows)


def plot_attention(results: dict[str, Any], path) -> None:
    """Bar chart: per layer, attention share on positions 0..3 for both models (final weights), uniform line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(results["attention"])
    fig, axes = plt.subplots(1, len(variants), figsize=(5.5 * len(variants), 3.6), sharey=True, squeeze=False)
    for ax, variant in zip(axes[0], variants):
        att = results["attention"][variant]
        layers = len(att["share"])
        width = 0.8 / FIRST_POSITIONS
        for p in range(FIRST_POSITIONS):
            xs = [layer + (p - (FIRST_POSITIONS - 1) / 2) * width for layer in range(layers)]
            label = f"position {p}" + (" (sink token)" if variant == "sink" and p == 0 else "")
            ax.bar(xs, [att["share"][layer][p] for layer in range(layers)], width, label=label)
        ax.axhline(att["uniform"][0], color="k", linestyle="--", linewidth=1, label="uniform attention")
        ax.set_xticks(range(layers), [f"layer {i}" for i in range(layers)])
        ax.set_title(f"{variant}: attention on the first tokens")
        ax.set_ylabel(f"mean weight (queries {att['queries_from']}..{att['length'] - 1})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training(results: dict[str, Any], path) -> None:
    """During training: share on position 0 (mean over layers, and the max layer) and held-out loss per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    for variant, probes in results["training"].items():
        steps = [p["step"] for p in probes]
        mean0 = [sum(layer[0] for layer in p["attention"]["share"]) / len(p["attention"]["share"]) for p in probes]
        max0 = [max(layer[0] for layer in p["attention"]["share"]) for p in probes]
        line = ax1.plot(steps, mean0, marker="o", label=f"{variant}: mean over layers")[0]
        ax1.plot(
            steps, max0, marker="x", linestyle=":", color=line.get_color(), label=f"{variant}: most sink-heavy layer"
        )
        ax2.plot(steps, [p["heldout_loss"] for p in probes], marker="o", label=variant)
    if results["training"]:
        first = next(iter(results["training"].values()))
        if first:
            ax1.axhline(first[-1]["attention"]["uniform"][0], color="k", linestyle="--", linewidth=1, label="uniform")
    ax1.set_xlabel("training step")
    ax1.set_ylabel("attention weight on position 0")
    ax1.set_title("first-token attention share during training")
    ax1.legend(fontsize=7)
    ax2.set_xlabel("training step")
    ax2.set_ylabel("held-out loss (nats/token)")
    ax2.set_title("held-out loss")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_perplexity(results: dict[str, Any], path) -> None:
    """Grouped bars: streaming perplexity per cache split for both models, one panel per held-out stream."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = results["config"]["eval_kinds"]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 3.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        variants = list(results["streaming"])
        configs = [r["config"] for r in results["streaming"][variants[0]] if r["stream"] == kind]
        width = 0.8 / len(variants)
        for k, variant in enumerate(variants):
            by = {r["config"]: r["perplexity"] for r in results["streaming"][variant] if r["stream"] == kind}
            xs = [i + (k - (len(variants) - 1) / 2) * width for i in range(len(configs))]
            ax.bar(xs, [by[c] for c in configs], width, label=variant)
        ax.set_xticks(range(len(configs)), configs)
        ax.set_yscale("log")
        ax.set_xlabel("sinks + window")
        ax.set_ylabel("perplexity (log scale)")
        ax.set_title(f"held-out {kind}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_heads(results: dict[str, Any], path) -> None:
    """Heat map per model: mean attention each (layer, head) puts on position 0, over all queries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(results["attention"])
    fig, axes = plt.subplots(1, len(variants), figsize=(4.2 * len(variants), 3.2), squeeze=False)
    for ax, variant in zip(axes[0], variants):
        grid = results["attention"][variant]["head_first"]  # (layers, heads)
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=8)
        ax.set_xticks(range(len(grid[0])), [f"head {j}" for j in range(len(grid[0]))])
        ax.set_yticks(range(len(grid)), [f"layer {i}" for i in range(len(grid))])
        what = "the sink token" if variant == "sink" else "the first token"
        ax.set_title(f"{variant}: attention on {what}", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
