"""Relative rotations derived from the model's own rotary embedding module.

sinkstream never re-implements RoPE. It asks the model's rotary module for cos/sin at *offsets* (which may be
negative) and applies them the way transformers' `apply_rotary_pos_emb` does (rotate-half convention, the
first `rotary_dims` channels only). Because RoPE rotations compose (R(a) R(b) = R(a + b)), rotating an
already-rotated key by R(-d) moves it d positions back, for every frequency schedule that only changes
`inv_freq`: default, linear, Llama-3, YaRN, LongRoPE, and dynamic NTK below its original length. Schedules
that scale cos/sin by an attention factor (YaRN's mscale) report it as `attention_scaling`; it is divided
out so a relative rotation stays a pure rotation. Partial rotary (GPT-NeoX/Pythia `rotary_pct`) follows from
the width of the cos/sin the module returns.
"""

from __future__ import annotations

import torch
from torch import nn


def find_rotary(model: nn.Module) -> nn.Module:
    """The model-level rotary embedding module (`...rotary_emb`), or ValueError if there is not exactly one."""
    found = [
        m for name, m in model.named_modules() if name.endswith("rotary_emb") and name.count(".") <= 2
    ]
    if len(found) != 1:
        raise ValueError(
            f"expected exactly one model-level rotary embedding module named '*rotary_emb', found {len(found)} "
            f"in {type(model).__name__}"
        )
    return found[0]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Rotation:
    """Computes and applies relative RoPE rotations for one model."""

    def __init__(self, model: nn.Module):
        self.module = find_rotary(model)
        self.scaling = float(getattr(self.module, "attention_scaling", 1.0) or 1.0)
        probe = torch.zeros(1, dtype=torch.float32, device=self._device())
        cos, _ = self.module(probe, torch.zeros(1, 1, dtype=torch.long, device=probe.device))
        # Most rotary modules return cos/sin duplicated over both halves (2 * len(inv_freq) channels); gpt-oss
        # returns one value per frequency and rotates the two halves with it. Same rotation, half the width:
        # duplicate it so that `apply` (rotate-half over the first `dims` channels) stays one code path.
        inv_freq = getattr(self.module, "inv_freq", None)
        self.duplicate = inv_freq is not None and cos.shape[-1] == inv_freq.numel()
        self.dims = cos.shape[-1] * (2 if self.duplicate else 1)
        self._memo: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def _device(self) -> torch.device:
        buffers = list(self.module.buffers())
        return buffers[0].device if buffers else torch.device("cpu")

    @torch.no_grad()
    def cos_sin(self, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of shape (N, rotary_dims) in float32 for integer offsets (N,), attention factor removed."""
        probe = torch.zeros(1, dtype=torch.float32, device=offsets.device)
        cos, sin = self.module(probe, offsets.view(1, -1))  # (1, N, rotary_dims) or (1, N, rotary_dims / 2)
        if self.duplicate:
            cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)  # (1, N, rotary_dims)
        return cos[0].float() / self.scaling, sin[0].float() / self.scaling

    def cos_sin_at(self, offset: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (1, rotary_dims) of one integer offset, memoised (decode steps reuse a bounded set)."""
        key = (offset, str(device))
        hit = self._memo.get(key)
        if hit is None:
            if len(self._memo) > 65536:
                self._memo.clear()
            hit = self._memo[key] = self.cos_sin(torch.tensor([offset], device=device))
        return hit

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate the first `cos.shape[-1]` channels of x (..., T, D) by per-row cos/sin (T, rotary_dims).

        Computed in float32 and cast back, so repeated re-rotation in bf16/fp16 does not compound rounding.
        Never in place: callers rely on old tensors staying valid (rollback keeps references to them).
        """
        rot = cos.shape[-1]
        x32 = x.float()
        x_rot = x32[..., :rot]
        out = x_rot * cos + rotate_half(x_rot) * sin
        if rot < x.shape[-1]:
            out = torch.cat((out, x32[..., rot:]), dim=-1)
        return out.to(x.dtype)
