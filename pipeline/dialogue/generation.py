"""Generation settings for dialogue replies and the token picker that applies them.

Greedy by default: a 135M model rambles when sampled hot. Sampling (temperature > 0, optional nucleus
`top_p`) is deterministic given `seed`: every turn draws from its own generator seeded with
(`seed`, turn number), so a reply depends only on the cache, the settings and the turn number, never on
what ran earlier in the process. That is what makes a resumed conversation continue bit-exactly.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field


class GenerationSettings(BaseModel):
    """How replies are generated. Persisted inside conversation snapshots."""

    model_config = ConfigDict(extra="forbid")

    # Most tokens in one reply (the end-of-turn token included); a reply cut here is closed by the template.
    max_reply_tokens: int = Field(64, ge=1)
    # 0 = greedy (argmax). > 0 samples from softmax(logits / temperature).
    temperature: float = Field(0.0, ge=0.0)
    # Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1.0 = all).
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    # Seed of the per-turn generators when sampling (None: 0).
    seed: int | None = None
    # System prompt of the first turn; None keeps the chat template's default.
    system_prompt: str | None = None

    def generator(self, turn: int) -> torch.Generator | None:
        """The random generator for reply number `turn` (None when greedy)."""
        if self.temperature == 0.0:
            return None
        g = torch.Generator(device="cpu")
        g.manual_seed(((self.seed or 0) * 1_000_003 + turn) % (2**63))
        return g


def pick_token(logits: torch.Tensor, settings: GenerationSettings, generator: torch.Generator | None) -> int:
    """Choose the next token from float logits (vocab,): argmax, or a seeded draw with temperature/top-p."""
    if settings.temperature == 0.0 or generator is None:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / settings.temperature, dim=-1)  # (V,)
    if settings.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)  # (V,), (V,)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass strictly above each token
        sorted_p = torch.where(before < settings.top_p, sorted_p, torch.zeros_like(sorted_p))
        choice = int(torch.multinomial(sorted_p, 1, generator=generator))
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))
