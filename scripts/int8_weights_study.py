"""int8 weights on a CPU (issue 20, optional item 5): a measurement, not a feature. sinkstream does not ship it.

    PYTHONPATH=. .venv/bin/python scripts/int8_weights_study.py [--rounds 4] [--steps 15]

1. Fidelity: SmolLM2's 210 decoder-layer linear weights quantized to int8, symmetric, one scale per output row
   (the head and embeddings stay as they are), run in float32 through the sink cache (4 sinks, window 128, chunks
   of 64) on the attention_sinks oracle's 1,200 tokens: mean and max |dNLL| and perplexity against the oracle,
   beside the unquantized float32 model.
2. Decode: one stream at 1,024 tokens of context (HDFS log), one token a step through `PoolBackend`, bf16
   activations; the same layers as oneDNN bf16 linears (what the service runs) and as int8 weight-only products
   (`torch._weight_int8pack_mm`, which reads half the bytes), alternating by round in one process.

One thread (decode is bound by reading the weights; run nothing beside it). Prints a few lines.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from model.loader import load_model
from model.policies import score_ids
from model.row_stable import RowStableLinear
from pipeline.service.backend import PoolBackend

ORACLE = Path(__file__).resolve().parents[1].parent / "shared" / "oracle"
LOG = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "loghub" / "HDFS_2k.log"


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) -> int8 (out, in) and float32 scales (out,): symmetric, one scale per output row."""
    w = weight.float()
    scale = w.abs().amax(1).clamp(min=1e-12) / 127
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


class Int8Linear(nn.Module):
    """int8 weight-only linear (bf16 activations): `torch._weight_int8pack_mm`, no bias (SmolLM2 has none)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.wq, scale = quantize_rows(inner.weight.data)
        self.scale = scale.to(torch.bfloat16)
        self.out_features = inner.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # (M, in)
        return torch._weight_int8pack_mm(flat, self.wq, self.scale).reshape(*x.shape[:-1], self.out_features)


def layer_linears(model: nn.Module):
    """(parent, attribute name, module) of every linear inside the decoder layers (not the head)."""
    for name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            if ".layers." in f".{name}." and isinstance(child, (nn.Linear, RowStableLinear)):
                yield parent, child_name, child


def fidelity() -> None:
    ids = json.loads((ORACLE / "gpl3_smollm2_ids.json").read_text())
    ref = torch.tensor(json.loads((ORACLE / "gpl3_attention_sinks_s4_w128.json").read_text())["nll"])
    lm = load_model("smollm2-135m", device="cpu", dtype="float32", threads=1)

    def report(label: str) -> None:
        nll = torch.tensor([n for _, _, n in score_ids(lm, ids, "sink", 4, 128, chunk=64)])
        d = (nll - ref).abs()
        print(f"{label}: mean |dNLL| {d.mean():.4f}, max {d.max():.4f}, perplexity {nll.mean().exp():.3f} "
              f"(oracle {ref.mean().exp():.3f})")

    report("float32")
    count = 0
    for _, _, linear in layer_linears(lm.model):
        wq, scale = quantize_rows(linear.weight.data)
        linear.weight.data = (wq.float() * scale[:, None]).to(linear.weight.dtype)
        count += 1
    report(f"float32, {count} layer weights int8")


def decode(rounds: int, steps: int) -> None:
    lm = load_model("smollm2-135m", device="cpu", dtype="bfloat16", threads=1)
    swaps = [(parent, name, linear, Int8Linear(linear)) for parent, name, linear in layer_linears(lm.model)]
    ids = lm.tokenizer.encode(LOG.read_text())[: 1024 + 2 * rounds * steps]
    backend = PoolBackend(lm, sinks=4, window=1020, chunk=64, resident=2)
    slot = backend.new()
    times: dict[str, list[float]] = {"bf16 (oneDNN)": [], "int8 weight-only": []}
    with torch.inference_mode():
        for a in range(0, 1024, 64):
            backend.step([slot], [ids[a : a + 64]], [None])
        i = 1024
        for _ in range(rounds):
            for k, kind in enumerate(times):
                for parent, name, bf16, int8 in swaps:
                    setattr(parent, name, int8 if k else bf16)
                step = []
                for _ in range(steps):
                    t = time.perf_counter()
                    backend.step([slot], [[ids[i]]], [None])
                    step.append(time.perf_counter() - t)
                    i += 1
                times[kind].append(1000 * statistics.median(step))
    for kind, ms in times.items():
        print(f"decode at 1,024 context, {kind}: ms/token by round " + " ".join(f"{m:.1f}" for m in ms))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4, help="decode rounds, the two kinds alternating")
    parser.add_argument("--steps", type=int, default=15, help="decode steps per round (the median is kept)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    fidelity()
    decode(args.rounds, args.steps)


if __name__ == "__main__":
    main()
