"""The model step: feed tokens of one stream through the shared model into that stream's own SinkCache.

The model is shared and stateless; every bit of stream state lives in the `SinkCache` a session owns (as
with HF's `past_key_values` or gpt-fast's `input_pos`). `SinkModel` only knows how to run a forward pass
against such a cache, score tokens, and generate with rollback.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from model.loader import LoadedModel
from model.sink_cache import SinkCache


class SinkModel:
    """Runs a LoadedModel over per-stream sink caches."""

    def __init__(self, lm: LoadedModel):
        self.lm = lm
        self.model = lm.model
        self.device = lm.device
        self._accepts_positions = lm.arch.positions != "alibi"

    def new_cache(self, sinks: int = 4, window: int | None = 1020, max_chunk: int = 256) -> SinkCache:
        return SinkCache(self.lm, sinks=sinks, window=window, max_chunk=max_chunk)

    @torch.inference_mode()
    def step(self, cache: SinkCache, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Feed `ids` (any length) into `cache`; return float32 logits (len(ids), vocab).

        The tokens are split into forward passes of at most `cache.max_chunk`; for architectures with exact
        chunking the result does not depend on how they are split. If a forward pass raises, the cache is
        rolled back to its state before this call and the exception propagates.
        """
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device).view(-1)
        before = cache.state()
        outputs = []
        try:
            for start in range(0, ids.numel(), cache.max_chunk):
                outputs.append(self._forward(cache, ids[start : start + cache.max_chunk]))
        except BaseException:
            cache.abort()
            cache.restore(before)
            raise
        if not outputs:
            return torch.empty(0, self.model.config.get_text_config().vocab_size)
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    def _forward(self, cache: SinkCache, chunk: torch.Tensor) -> torch.Tensor:
        plan = cache.begin(chunk.numel(), self.device)
        kwargs: dict[str, Any] = {}
        if self._accepts_positions:
            kwargs["position_ids"] = plan.position_ids[None]
        if plan.attention is not None:
            kwargs["sink_plan"] = plan.attention
        out = self.model(input_ids=chunk[None], past_key_values=cache, use_cache=True, **kwargs)
        cache.end()
        return out.logits[0].float()

    @torch.inference_mode()
    def nll(self, cache: SinkCache, ids: Sequence[int], prev_logits: torch.Tensor | None = None):
        """Feed ids; return (nll, last_logits): nll[j] = -log p(ids[j] | everything before it) in nats.

        `prev_logits` (vocab,) are the logits after the token before `ids[0]`; without them `nll[0]` is NaN
        (the first token of a stream has no prediction). `last_logits` (vocab,) predict the next, unseen token
        (None when `ids` is empty).

        Memory is bounded by one forward pass: each chunk's logits are reduced to NLLs before the next chunk
        runs, so a record of any length never holds a (tokens, vocab) tensor. The per-chunk split is the one
        `step` makes, so the values equal scoring `step(cache, ids)` in one piece (the softmax is per row).
        If a forward pass raises, the cache is rolled back as in `step`.
        """
        ids_t = torch.as_tensor(ids, dtype=torch.long, device=self.device).view(-1)
        out = torch.full((ids_t.numel(),), float("nan"))
        last = prev_logits
        before = cache.state()
        try:
            for start in range(0, ids_t.numel(), cache.max_chunk):
                piece = ids_t[start : start + cache.max_chunk]
                logits = self._forward(cache, piece)  # (C, vocab) float32
                if last is not None:  # the token before the chunk predicts its first token
                    out[start] = -torch.log_softmax(last.float(), -1)[piece[0]].cpu()
                if piece.numel() > 1:
                    logprobs = torch.log_softmax(logits[:-1], dim=-1)  # (C - 1, vocab)
                    out[start + 1 : start + piece.numel()] = -logprobs.gather(1, piece[1:, None])[:, 0].cpu()
                last = logits[-1]
        except BaseException:
            cache.abort()
            cache.restore(before)
            raise
        return out, (None if last is prev_logits else last)

    @torch.inference_mode()
    def generate(
        self,
        cache: SinkCache,
        prompt: Sequence[int],
        max_new_tokens: int,
        stop: Callable[[int], bool] | None = None,
    ) -> list[int]:
        """Greedy continuation of the stream + prompt, then the cache is returned to its exact prior state.

        Generated text never pollutes the stream's context: after the call, the cache's tensors and counters
        are the very objects it had before (updates never write in place).
        """
        state = cache.state()
        generated: list[int] = []
        try:
            logits = self.step(cache, list(prompt))
            for _ in range(max_new_tokens):
                token = int(logits[-1].argmax())
                generated.append(token)
                if stop is not None and stop(token):
                    break
                logits = self.step(cache, [token])
        finally:
            cache.restore(state)
        return generated
