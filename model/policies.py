"""Scoring a token sequence under a cache policy: per-token negative log-likelihoods.

Policies (Xiao et al. 2023, Figure 1):

- `sink`: StreamingLLM, `sinks` attention sinks + the `window` most recent tokens.
- `window`: window attention, the `window` most recent tokens only (sinks = 0).
- `dense`: no eviction at all; only as long as the model's positions allow.
- `recompute`: sliding window with re-computation, the paper's quality baseline. Every target is predicted
  by a fresh forward pass over the `sinks + window` tokens before it (the same number of keys the `sink`
  cache holds), so it is O(span) work per token. `stride` scores every k-th target only.

Every record is `(i, target, nll)` with `nll = -log p(ids[i+1] | ids[..i])` in nats.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from model.loader import LoadedModel
from model.stepper import SinkModel

POLICIES = ("sink", "window", "dense", "recompute")
# Tokens per batched forward pass of the recompute baseline (bounds its memory).
_RECOMPUTE_TOKENS = 8192


def policy_cache_shape(policy: str, sinks: int, window: int) -> tuple[int, int | None]:
    """(sinks, window) that the streaming cache of a policy uses."""
    if policy == "sink":
        return sinks, window
    if policy == "window":
        return 0, window
    if policy == "dense":
        return 0, None
    raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")


def score_ids(
    lm: LoadedModel,
    ids: Sequence[int],
    policy: str,
    sinks: int = 4,
    window: int = 1020,
    chunk: int = 1,
    stride: int = 1,
    progress: Callable[[int], None] | None = None,
) -> Iterator[tuple[int, int, float]]:
    """Yield (i, ids[i+1], nll) for i = 0, stride, 2*stride, ... < len(ids) - 1, in order.

    `chunk` is the number of tokens per forward pass (streaming policies) or of windows per batched forward
    pass (`recompute`); results do not depend on it beyond float rounding. `progress(n)` is called with the
    number of tokens consumed since the last call.
    """
    if stride < 1 or chunk < 1:
        raise ValueError(f"expected stride >= 1 and chunk >= 1, got stride={stride}, chunk={chunk}")
    if len(ids) < 2:
        return
    if policy == "recompute":
        yield from _recompute(lm, ids, sinks + window, chunk, stride, progress)
        return
    s, w = policy_cache_shape(policy, sinks, window)
    if w is None and lm.arch.max_positions is not None and len(ids) > lm.arch.max_positions:
        raise ValueError(
            f"dense policy needs all {len(ids)} tokens in context, but the model accepts "
            f"{lm.arch.max_positions} positions; use sink, window or recompute"
        )
    runner = SinkModel(lm)
    cache = runner.new_cache(s, w, max_chunk=chunk)
    ids_t = torch.as_tensor(ids, dtype=torch.long)
    n = ids_t.numel()
    for start in range(0, n - 1, chunk):
        piece = ids_t[start : min(start + chunk, n - 1)]
        logits = runner.step(cache, piece)
        targets = ids_t[start + 1 : start + 1 + piece.numel()].to(logits.device)
        nll = -torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]
        for j, value in enumerate(nll.tolist()):
            i = start + j
            if i % stride == 0:
                yield i, int(targets[j]), value
        if progress:
            progress(piece.numel())


@torch.inference_mode()
def _recompute(lm, ids, span, batch, stride, progress) -> Iterator[tuple[int, int, float]]:
    ids_t = torch.as_tensor(ids, dtype=torch.long, device=lm.device)
    n = ids_t.numel()
    targets = list(range(0, n - 1, stride))
    # Targets whose whole prefix fits in the span: one causal pass over the first `span` tokens gives them all.
    head = [i for i in targets if i < span]
    if head:
        logits = lm.model(input_ids=ids_t[None, : min(span, n - 1)]).logits[0].float()
        for i in head:
            yield i, int(ids_t[i + 1]), float(-torch.log_softmax(logits[i], -1)[ids_t[i + 1]])
        if progress:
            progress(len(head) * stride)
    tail = [i for i in targets if i >= span]
    per_pass = max(1, min(batch, _RECOMPUTE_TOKENS // span))
    for k in range(0, len(tail), per_pass):
        group = tail[k : k + per_pass]
        windows = torch.stack([ids_t[i - span + 1 : i + 1] for i in group])  # (B, span)
        logits = lm.model(input_ids=windows, logits_to_keep=1).logits[:, -1].float()  # (B, V)
        logprobs = torch.log_softmax(logits, -1)
        for row, i in enumerate(group):
            yield i, int(ids_t[i + 1]), float(-logprobs[row, ids_t[i + 1]])
        if progress:
            progress(len(group) * stride)


def summarize(nlls: Sequence[float], seconds: float, tokens: int) -> dict[str, float]:
    """Tokens scored, mean NLL, perplexity = exp(mean NLL), milliseconds per consumed token."""
    t = torch.tensor(list(nlls), dtype=torch.float64)
    mean = float(t.mean()) if t.numel() else float("nan")
    return {
        "tokens": int(t.numel()),
        "mean_nll": mean,
        "perplexity": float(torch.exp(torch.tensor(mean))),
        "ms_per_token": 1000.0 * seconds / max(tokens, 1),
    }
