"""bf16 linear layers on CPU whose rows do not depend on the call: the batch invariance of the bf16 path.

The pooled step packs many streams into one forward, so a stream's results are exact only if each row of a
linear layer comes out bit-identical whatever else shares the call (`pipeline/service/backend.py`, "Batch
invariance"). In float32 that holds from 16 rows on (the backend pads). In bfloat16 on a CPU with AMX it does
not hold for any padding: measured on one torch thread (torch 2.13, oneDNN 3.12 `brg_matmul:avx10_1_512_amx`,
the five SmolLM2 shapes), calls of 1-32 rows give every row the same bits, while calls of 33 to some hundreds of
rows (a range that depends on the shape: 33-575 for 576x576, up to 1,500 for 576x1536, 33-256 for the 49,152-wide
head) round a few rows differently; which rows is data dependent (about one row in 25).

So on such a CPU every bf16 linear layer runs its rows in calls of at most `BLOCK_ROWS` = 32 rows
(`RowStableLinear`), on weights reordered once for oneDNN (`torch.ops.mkldnn._reorder_linear_weight`), so the
split costs the per-call overhead only, not a weight reorder per call. Measured beside it (1,024 rows, one
thread, loaded 2-core machine): the five shapes in 32-row blocks take about 2x the time of one plain bf16 call
and about 0.4x of float32. `tests/service/test_backend_invariance.py` checks the property on the machine that
runs the suite. Converted weights stay float32 on disk; the cast happens at load.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

BLOCK_ROWS = 32  # rows per oneDNN call; 1..32 rows are row-invariant (module docstring)


def _packed_ops_available() -> bool:
    """oneDNN's prepacked linear (what torch's inductor uses on CPU), where this torch has it for bf16."""
    mkldnn = torch.ops.mkldnn
    try:
        return (hasattr(mkldnn, "_reorder_linear_weight") and hasattr(mkldnn, "_linear_pointwise")
                and bool(mkldnn._is_mkldnn_bf16_supported()))
    except (AttributeError, RuntimeError):
        return False


class RowStableLinear(nn.Module):
    """A bf16 `nn.Linear` (same weight and bias objects) that computes in calls of at most `block` rows."""

    def __init__(self, inner: nn.Linear, block: int = BLOCK_ROWS):
        super().__init__()
        self.in_features, self.out_features = inner.in_features, inner.out_features
        self.weight, self.bias = inner.weight, inner.bias  # shared Parameters: tied weights stay tied
        self.block = block
        self.packed: torch.Tensor | None = None
        if inner.weight.dtype == torch.bfloat16 and _packed_ops_available():
            with torch.no_grad():
                self.packed = torch.ops.mkldnn._reorder_linear_weight(inner.weight.detach(), block)

    def _call(self, rows: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        return nn.functional.linear(rows, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        m = flat.shape[0]
        if m <= self.block:
            out = self._call(flat)
        else:
            out = torch.cat([self._call(flat[i : i + self.block]) for i in range(0, m, self.block)])
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, block={self.block}"


def needs_row_blocks(device: torch.device, dtype: torch.dtype) -> bool:
    """bf16 on a CPU: the oneDNN kernels are row-invariant only in calls of at most BLOCK_ROWS rows."""
    return device.type == "cpu" and dtype == torch.bfloat16


def make_rows_stable(model: nn.Module, block: int = BLOCK_ROWS) -> int:
    """Replace every `nn.Linear` in `model` (the output head included) by a `RowStableLinear`; returns how many."""
    targets = [(name, mod) for name, mod in model.named_modules() if type(mod) is nn.Linear]
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, RowStableLinear(mod, block))
    return len(targets)


def rows_stable(model: nn.Module) -> bool:
    """Every linear layer of `model` is a `RowStableLinear` (and there is one): its rows come out the same in a
    call of any row count, one row included, so a forward needs no padding for batch invariance."""
    linears = [m for m in model.modules() if isinstance(m, (nn.Linear, RowStableLinear))]
    return bool(linears) and all(isinstance(m, RowStableLinear) for m in linears)


def _swap_to_plain(model: nn.Module) -> list[tuple[nn.Module, str, RowStableLinear]]:
    """Replace every `RowStableLinear` of `model` by a plain `nn.Linear` on the same Parameters; returns
    (parent, attribute, the RowStableLinear) for each."""
    swapped = []
    for name, mod in list(model.named_modules()):
        if isinstance(mod, RowStableLinear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            plain = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None,
                              device="meta", dtype=mod.weight.dtype)
            plain.weight, plain.bias = mod.weight, mod.bias
            setattr(parent, child, plain)
            swapped.append((parent, child, mod))
    return swapped


def make_rows_plain(model: nn.Module) -> int:
    """Undo `make_rows_stable` for good (same Parameters, the reordered copies dropped), e.g. before the weights
    change (an adapter merged in); returns how many layers."""
    return len(_swap_to_plain(model))


@contextmanager
def plain_linears(model: nn.Module) -> Iterator[None]:
    """Inside: every `RowStableLinear` of `model` is a plain `nn.Linear` again (one oneDNN call per forward, no
    row blocks), e.g. for the raw transformers baseline of a benchmark; restored after."""
    swapped = _swap_to_plain(model)
    try:
        yield
    finally:
        for parent, child, mod in swapped:
            setattr(parent, child, mod)
