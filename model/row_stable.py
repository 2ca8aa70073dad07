"""bf16 linear layers on CPU whose rows do not depend on the call: the batch invariance of the bf16 path.

The pooled step packs many streams into one forward, so a stream's results are exact only if each row of a
linear layer comes out bit-identical whatever else shares the call (`pipeline/service/backend.py`, "Batch
invariance"). In float32 that holds from 16 rows on (the backend pads). In bfloat16 on a CPU with AMX it does
not hold for every row count: measured with torch 2.13, oneDNN 3.12 (`brg_matmul:avx10_1_512_amx`) and the five
SmolLM2 shapes, a call of 1-32 rows gives every row the bits it gets alone (the *canonical* bits), and so does a
call of many rows, but calls in between round some elements differently (oneDNN blocks the reduction another
way). Which row counts are canonical depends on the shape and the thread count: on one thread every call of at
least `out_features` rows (the 49,152-wide head: at least 353 rows); on two threads an irregular set
(576x576: 288, 317-320, 576-800, 829-832, 1,151 on, ...). So nothing here assumes a rule:

- every call of at most `BLOCK_ROWS` = 32 rows is canonical on every CPU and thread count measured
  (`tests/service/test_backend_invariance.py` checks it on the machine that runs the suite);
- `calibrate` finds, per layer shape and thread count, the smallest multiple of 32 rows (up to `MAX_BIG_ROWS`)
  whose calls give the canonical bits, by probing: inputs built so that any other reduction order shows
  (`probe_inputs`: a large value and its negation in two columns with equal weights, so the running sums pass
  through a large magnitude and the order of the additions decides the low bits; about 0.5% of the output
  elements differ under a non-canonical call, against 0.01% for Gaussian inputs), two probes per candidate;
- with `all_sizes` (every layer but the vocabulary-wide head), `calibrate` goes on to verify every row count from
  `big` to `MAX_BIG_ROWS` in steps of `SIZE_STEP` = 64 on one probe each (`BlockPlan.sizes`; one thread on this
  Xeon: all of them; a few seconds more per bf16 load);
- `RowStableLinear` pads a call of `m` rows with zero rows to the next verified size and makes one call (a
  view of its first `m` output rows, no concatenation); above the largest size it calls that size while more
  rows remain, then pads the rest; a rest under `big` is padded to `big` when that is cheaper than its 32-row
  blocks (`pad_from`), else runs in blocks. Only verified row counts ever reach the kernel, so any row count,
  any position and any other rows give the canonical bits. Under a thread count other than the calibrated one,
  a layer runs in 32-row blocks only (canonical too, just slower). The head gets logits slices of exactly its
  `big` rows (`head_slice_rows`), one verified call each;
- calls of fewer than `big` rows can be split by output columns (session 13): a call on a slice of `cols`
  output rows of the weight (reordered once more, per slice) gives the same bits as those columns of the whole
  call, and on one thread it is canonical from about `cols` rows on, where the whole layer needs `big` (for
  576x1536, 192 against 1,536 rows: a call of 33-1,535 rows ran in 32-row blocks or was padded to 1,536). For a
  layer with `big` >= `SPLIT_MIN_BIG` (768) `calibrate` tries `cols` = the widest multiple of 32 up to
  `SPLIT_COLS` (192) that divides `out_features`, verifies the split calls of every row count from `cols` up
  to `big` in steps of 64 against the canonical rows, and keeps those timed 5% faster than the layer's call
  without the split (`BlockPlan.col_sizes`); a call of m rows then pads to the next of them (less than 64 rows
  away) and makes one call per slice. SmolLM2's gate and up projections (576x1536), one thread: 448 rows in
  1.1-2.0 ms split against 1.8-3.4 ms in blocks; a packed forward of 224-448 rows about 1.1x faster (noisy),
  none slower. The price is a third copy of those weights (SmolLM2: 106 MB in bf16), hence the `big` floor;
- plans are kept on disk by machine (`machine_fingerprint`: torch build and CPU), shape, dtype and thread count
  (`calibrate(plans=...)`, `model.loader.plans_home()`): the next start reads them after a spot check, about a
  second of the few a full calibration takes (SmolLM2-135M, one thread: 7.0 -> 4.1 s from a fresh interpreter
  to a loaded bf16 model, 2026-12-06).

Measured on one thread (2026-12-06): 32-row blocks cost about 2.5x the time per row of one large call on the
transformer layers' shapes and 1.3x on the head; at 3,615 rows (64 streams of one log line) the seven linears
of a layer take 38.6 ms as `big`-row calls, blocks and a concatenation, 22.4 ms as one padded call. The weights
are reordered once for oneDNN (`torch.ops.mkldnn._reorder_linear_weight`), so a split costs the per-call
overhead only. Converted weights stay float32 on disk; the cast happens at load.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog
import torch
from torch import nn

log = structlog.get_logger(__name__)

BLOCK_ROWS = 32  # rows per small oneDNN call; 1..32 rows are canonical (module docstring)
MAX_BIG_ROWS = 4096  # the largest row count `calibrate` tries
SIZE_STEP = 64  # step between the single-call row counts `calibrate` verifies above `big`
SPLIT_COLS = 192  # widest column block `calibrate` tries for calls under `big` rows (`BlockPlan.cols`)
SPLIT_MIN_BIG = 4 * SPLIT_COLS  # layers with a smaller `big` get no split: padding to it wastes little (module doc)


def _packed_ops_available() -> bool:
    """oneDNN's prepacked linear (what torch's inductor uses on CPU), where this torch has it for bf16."""
    mkldnn = torch.ops.mkldnn
    try:
        return (hasattr(mkldnn, "_reorder_linear_weight") and hasattr(mkldnn, "_linear_pointwise")
                and bool(mkldnn._is_mkldnn_bf16_supported()))
    except (AttributeError, RuntimeError):
        return False


@dataclass(frozen=True)
class BlockPlan:
    """How a layer shape splits its rows under `threads` torch threads (`calibrate`)."""

    big: int | None  # a row count whose calls are canonical (a multiple of BLOCK_ROWS), None: 32-row blocks only
    pad_from: int  # a remainder of at least this many rows is padded to `big` (cheaper than its blocks)
    threads: int  # the torch thread count the plan was measured under
    # Every row count from `big` up to `MAX_BIG_ROWS` in steps of `SIZE_STEP` whose calls were verified canonical
    # (ascending, `big` first): a call of m rows is padded to the next of these and made in one call. Empty for
    # a layer calibrated with `all_sizes=False` (the output head), which calls `big` rows at a time.
    sizes: tuple[int, ...] = ()
    # Calls of fewer than `big` rows split by output columns (session 13): `cols` output columns a call, each
    # call on its own reordered slice of the weight. Such a call is canonical from about `cols` rows on (one
    # thread), far below `big` for a wide layer (576x1536: 192 against 1,536). `col_sizes`: the row counts under
    # `big` whose split calls were verified canonical AND timed faster than what the layer does without them
    # (blocks, or padding to `big`); empty: no split (None `cols`).
    cols: int | None = None
    col_sizes: tuple[int, ...] = ()

    def col_size_for(self, rows: int) -> int | None:
        """The verified split size a call of `rows` (< `big`) pads to: the smallest of `col_sizes` >= `rows`,
        if it is less than `SIZE_STEP` rows away (a farther one was not timed against this row count)."""
        i = bisect.bisect_left(self.col_sizes, rows)
        if i < len(self.col_sizes) and self.col_sizes[i] - rows < SIZE_STEP:
            return self.col_sizes[i]
        return None

    @property
    def calls(self) -> tuple[int, ...]:
        """The verified row counts above `block` a call may have: `sizes`, or just `big` (none without it)."""
        return self.sizes or (() if self.big is None else (self.big,))

    def size_for(self, rows: int) -> int | None:
        """The smallest verified row count >= `rows`, None above the largest."""
        calls = self.calls
        i = bisect.bisect_left(calls, rows)
        return calls[i] if i < len(calls) else None


class RowStableLinear(nn.Module):
    """A bf16 `nn.Linear` (same weight and bias objects) whose rows come out canonical: it calls the kernel only
    with verified row counts, `plan.sizes` / `plan.big` or at most `block` rows (module docstring)."""

    def __init__(self, inner: nn.Linear, block: int = BLOCK_ROWS, plan: BlockPlan | None = None):
        super().__init__()
        self.in_features, self.out_features = inner.in_features, inner.out_features
        self.weight, self.bias = inner.weight, inner.bias  # shared Parameters: tied weights stay tied
        self.block = block
        self.plan = plan
        self.packed: torch.Tensor | None = None
        self.col_parts: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # (reordered slice, bias slice)
        if inner.weight.dtype == torch.bfloat16 and _packed_ops_available():
            with torch.no_grad():
                self.packed = torch.ops.mkldnn._reorder_linear_weight(inner.weight.detach(), block)
            if plan is not None and plan.cols is not None and plan.col_sizes:
                self.set_cols(plan.cols)

    @torch.no_grad()
    def set_cols(self, cols: int) -> None:
        """Reorder the weight once more, as slices of `cols` output rows for the split calls (`BlockPlan.cols`)."""
        if self.out_features % cols:
            raise ValueError(f"cols must divide out_features={self.out_features}, got {cols}")
        weight = self.weight.detach()
        self.col_parts = [
            (torch.ops.mkldnn._reorder_linear_weight(weight[c : c + cols].contiguous(), self.block),
             None if self.bias is None else self.bias.detach()[c : c + cols].contiguous())
            for c in range(0, self.out_features, cols)
        ]

    def _call_part(self, rows: torch.Tensor, part: int) -> torch.Tensor:
        packed, bias = self.col_parts[part]
        return torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")

    def _split(self, rows: torch.Tensor, size: int) -> torch.Tensor:
        """`rows` (m, in) padded with zero rows to `size`, one call per column slice; the first m rows (m, out)."""
        full = _zero_padded(rows, size)  # (size, in)
        return torch.cat([self._call_part(full, i) for i in range(len(self.col_parts))], dim=1)[: rows.shape[0]]

    def _call(self, rows: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        return nn.functional.linear(rows, self.weight, self.bias)

    def _padded(self, rows: torch.Tensor, size: int) -> torch.Tensor:
        """`rows` (m, in) and zero rows up to `size`, one call; the first m output rows (a view, no copy)."""
        return self._call(_zero_padded(rows, size))[: rows.shape[0]]

    def _pieces(self, flat: torch.Tensor) -> Iterator[torch.Tensor]:
        """The outputs of `flat` (m, in) in order, each from a verified call: calls of the largest verified
        size (or `big`) while more rows remain than it, then the rest split by output columns where a verified
        split size is timed faster (`col_sizes`), else padded to a verified size when that is cheaper than its
        blocks (`pad_from`), else in blocks."""
        m, a = flat.shape[0], 0
        plan = self.plan
        if plan is not None and plan.big is not None and plan.threads == torch.get_num_threads():
            top = plan.calls[-1]
            while m - a > top:
                yield self._call(flat[a : a + top])
                a += top
            rest = m - a
            size = plan.col_size_for(rest) if self.col_parts and self.block < rest < plan.big else None
            if size is not None:  # split by output columns: verified and timed faster for this row count
                yield self._split(flat[a:], size)
                return
            if rest > self.block and (rest >= plan.big or rest >= plan.pad_from):
                yield self._padded(flat[a:], plan.size_for(rest) or top)  # rest <= top: a size exists
                return
        for i in range(a, m, self.block):
            yield self._call(flat[i : i + self.block])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # (M, in)
        if flat.shape[0] <= self.block:
            out = self._call(flat)
        else:
            pieces = list(self._pieces(flat))
            out = pieces[0] if len(pieces) == 1 else torch.cat(pieces)  # (M, out)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        big = self.plan.big if self.plan else None
        cols = self.plan.cols if self.plan and self.col_parts else None
        return (f"in_features={self.in_features}, out_features={self.out_features}, block={self.block}, big={big}, "
                f"cols={cols}")


def _zero_padded(rows: torch.Tensor, size: int) -> torch.Tensor:
    """`rows` (m, in) followed by zero rows up to `size` rows (itself when m >= size)."""
    m = rows.shape[0]
    return rows if m >= size else torch.cat([rows, rows.new_zeros(size - m, rows.shape[1])])  # (size, in)


def probe_inputs(rows: int, in_features: int, out_features: int, seed: int,
                 dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (rows, in) and weights (out, in) on which a reduction in another order changes output bits: 16
    pairs of weight columns are equal, and each row holds +4096 and -4096 in one such pair, so the running sums
    carry a large value for part of the reduction and the small terms' rounding depends on the order."""
    g = torch.Generator().manual_seed(seed)
    pairs = min(16, in_features // 2)
    weight = torch.randn(out_features, in_features, generator=g)
    pos = torch.randperm(in_features, generator=g)[: 2 * pairs].view(pairs, 2)  # (pairs, 2) column indices
    weight[:, pos[:, 1]] = weight[:, pos[:, 0]]
    x = torch.randn(rows, in_features, generator=g)
    pick = torch.randint(0, pairs, (rows,), generator=g)
    r = torch.arange(rows)
    x[r, pos[pick, 0]] = 4096.0
    x[r, pos[pick, 1]] = -4096.0
    return x.to(dtype), weight.to(dtype)


_PLANS: dict[tuple, BlockPlan] = {}  # calibrations of this process, by `calibrate`'s arguments and thread count


def _best_of(fn: Callable[[], object], repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


@functools.cache
def machine_fingerprint() -> str:
    """What a calibrated plan depends on besides its layer shape and thread count: this torch build (version,
    oneDNN and build flags: `torch._C._show_config()`, the CPU capability it dispatches to) and this CPU (vendor,
    model, flags, cache sizes). Plans stored under another fingerprint are never read."""
    h = hashlib.sha256(torch.__version__.encode())
    for describe in (getattr(torch._C, "_show_config", None), torch.backends.cpu.get_cpu_capability):
        h.update(str(describe() if describe is not None else "").encode())
    try:
        first_cpu = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:  # not Linux: what the platform says of the processor
        first_cpu = f"model name: {platform.machine()} {platform.processor()}"
    wanted = ("vendor_id", "cpu family", "model", "stepping", "flags")
    h.update("\n".join(line for line in first_cpu.splitlines() if line.startswith(wanted)).encode())
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        for name in ("level", "type", "size"):
            try:
                h.update((index / name).read_bytes())
            except OSError:
                pass
    return h.hexdigest()[:16]


def _plan_file(plans: Path, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, threads: int,
               block: int, max_rows: int, all_sizes: bool) -> Path:
    name = (f"{in_features}x{out_features}-{'bias' if bias else 'nobias'}-{str(dtype).replace('torch.', '')}"
            f"-t{threads}-b{block}-m{max_rows}-{'sizes' if all_sizes else 'big'}.json")
    return plans / machine_fingerprint() / name


def _read_plan(path: Path, threads: int, block: int, max_rows: int, all_sizes: bool) -> BlockPlan | None:
    """A stored plan, or None when there is none or it is not a plan these arguments could have produced."""
    try:
        doc = json.loads(path.read_text())
        big, pad_from, sizes = doc["big"], int(doc["pad_from"]), tuple(int(r) for r in doc["sizes"])
        cols, col_sizes = doc["cols"], tuple(int(r) for r in doc["col_sizes"])  # a plan from before the split: None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if doc.get("threads") != threads:
        return None
    if big is None:
        return BlockPlan(None, pad_from, threads) if not sizes and cols is None and not col_sizes else None
    if not (isinstance(big, int) and big % block == 0 and 2 * block <= big <= max_rows):
        return None
    if sizes and (not all_sizes or sizes[0] != big or list(sizes) != sorted(set(sizes)) or sizes[-1] > max_rows
                  or any((r - big) % SIZE_STEP for r in sizes)):
        return None
    if (cols is None) != (not col_sizes):
        return None
    if cols is not None and not (isinstance(cols, int) and cols % block == 0 and 0 < cols < big
                                 and big >= SPLIT_MIN_BIG and all_sizes
                                 and list(col_sizes) == sorted(set(col_sizes)) and col_sizes[0] >= cols
                                 and col_sizes[-1] < big and not any((r - cols) % SIZE_STEP for r in col_sizes)):
        return None
    return BlockPlan(big, pad_from, threads, sizes, cols, col_sizes)


def _store_plan(path: Path, plan: BlockPlan) -> None:
    """Write `plan` atomically (a reader sees the old file or the new one); a folder that cannot be written is
    logged and skipped: the next process calibrates again."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(plan)))
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("row blocks not stored", folder=str(path.parent), error=f"{type(exc).__name__}: {exc}")


@torch.inference_mode()
def calibrate(in_features: int, out_features: int, bias: bool, dtype: torch.dtype = torch.bfloat16,
              block: int = BLOCK_ROWS, max_rows: int = MAX_BIG_ROWS, all_sizes: bool = True,
              plans: Path | None = None) -> BlockPlan:
    """The `BlockPlan` of a layer shape under the current thread count: the smallest multiple of `block` rows
    (from 2 * block to `max_rows`) whose calls give the canonical bits on two probes (`probe_inputs`), the
    remainder from which padding to it is cheaper than blocks (timed here; it changes speed, never bits), and
    with `all_sizes` every row count from there to `max_rows` in steps of `SIZE_STEP` verified on one probe.

    With `plans` (a folder), a plan measured before on this machine (`machine_fingerprint`), shape, dtype and
    thread count is read from it instead, after a spot check (`big` on both probes, the largest size on one:
    a fraction of the search); a plan that fails it, or a file that is not a plan, is measured again and
    replaced. A measured plan is stored there."""
    threads = torch.get_num_threads()
    key = (in_features, out_features, bias, dtype, threads, block, max_rows, all_sizes)
    if key in _PLANS:
        return _PLANS[key]
    started = time.perf_counter()
    x, weight = probe_inputs(2 * max_rows, in_features, out_features, seed=0, dtype=dtype)
    inner = nn.Linear(in_features, out_features, bias=bias, device="meta", dtype=dtype)
    inner.weight = nn.Parameter(weight, requires_grad=False)
    if bias:
        inner.bias = nn.Parameter(torch.randn(out_features, generator=torch.Generator().manual_seed(1)).to(dtype),
                                  requires_grad=False)
    lin = RowStableLinear(inner, block)
    probes = [x[:max_rows], x[max_rows:]]  # two probes on the same weights
    canonical: list[list[torch.Tensor]] = [[], []]  # per probe, its canonical rows in blocks, grown as needed
    joined: list[torch.Tensor] = [torch.empty(0), torch.empty(0)]  # per probe, those blocks concatenated

    def is_canonical(rows: int, count: int = 2, split: bool = False) -> bool:
        """Calls of `rows` rows (split by columns with `split`) give the canonical rows on `count` probes."""
        call = (lambda r: lin._split(r, rows)) if split else lin._call
        for i in range(count):
            blocks, probe = canonical[i], probes[i]
            if len(blocks) * block < rows:
                while len(blocks) * block < rows:
                    blocks.append(lin._call(probe[len(blocks) * block : (len(blocks) + 1) * block]))
                joined[i] = torch.cat(blocks)  # once per growth, not once per candidate
            if not torch.equal(call(probe[:rows]), joined[i][:rows]):
                return False
        return True

    path = _plan_file(plans, in_features, out_features, bias, dtype, threads, block, max_rows, all_sizes) \
        if plans is not None else None
    stored = _read_plan(path, threads, block, max_rows, all_sizes) if path is not None else None
    if stored is not None and stored.cols is not None:
        lin.set_cols(stored.cols)
    if stored is not None and (stored.big is None or (is_canonical(stored.big) and (
            not stored.sizes or is_canonical(stored.sizes[-1], 1)) and (
            not stored.col_sizes or is_canonical(stored.col_sizes[-1], 1, split=True)))):
        plan, source = stored, "stored"
    else:
        if stored is not None:
            log.warning("row blocks: the stored plan failed its check, measuring again", file=str(path))
        plan, source = _search(lin, x, is_canonical, block, max_rows, all_sizes, threads), "measured"
        if path is not None:
            _store_plan(path, plan)
    _PLANS[key] = plan
    log.info("row blocks calibrated", shape=f"{in_features}x{out_features}", big=plan.big, pad_from=plan.pad_from,
             sizes=len(plan.sizes), largest=plan.sizes[-1] if plan.sizes else plan.big, cols=plan.cols,
             col_sizes=len(plan.col_sizes), threads=threads,
             source=source, ms=round((time.perf_counter() - started) * 1e3, 1))
    return plan


def _search(lin: RowStableLinear, x: torch.Tensor, is_canonical: Callable[..., bool], block: int, max_rows: int,
            all_sizes: bool, threads: int) -> BlockPlan:
    """`calibrate`'s measurement: the first canonical multiple of `block`, the padding threshold, the sizes."""
    big = next((rows for rows in range(2 * block, max_rows + 1, block) if is_canonical(rows)), None)
    pad_from = max_rows + 1
    sizes: tuple[int, ...] = ()
    if big is not None:
        t_big = _best_of(lambda: lin._call(x[:big]))
        t_blocks = _best_of(lambda: [lin._call(x[i : i + block]) for i in range(0, big, block)])
        per_block = t_blocks / (big // block)
        pad_from = block * int(t_big / per_block) + 1  # from here, ceil(rest / block) blocks cost more than a big call
        if all_sizes:
            # One probe each: a call that is not canonical changes thousands of a probe's elements (about 0.5%).
            sizes = (big, *(rows for rows in range(big + SIZE_STEP, max_rows + 1, SIZE_STEP) if is_canonical(rows, 1)))
    cols = _split_width(lin.out_features, block)
    if not all_sizes or big is None or big < SPLIT_MIN_BIG or cols is None or lin.packed is None:
        return BlockPlan(big, pad_from, threads, sizes)
    lin.set_cols(cols)
    col_sizes: list[int] = []
    for rows in range(cols, big, SIZE_STEP):
        if not is_canonical(rows, 2 if not col_sizes else 1, split=True):
            continue
        if _split_is_faster(lin, x[:rows], big, pad_from, block):
            col_sizes.append(rows)
    if not col_sizes:
        return BlockPlan(big, pad_from, threads, sizes)
    return BlockPlan(big, pad_from, threads, sizes, cols, tuple(col_sizes))


def _split_is_faster(lin: RowStableLinear, probe: torch.Tensor, big: int, pad_from: int, block: int) -> bool:
    """A split call of `probe`'s rows beats, by 5%, what the layer does without it: pad to `big` from `pad_from`
    rows on, else 32-row blocks (timed; speed only, never bits)."""
    rows = probe.shape[0]
    if rows >= pad_from:
        t_plain = _best_of(lambda: lin._padded(probe, big))
    else:
        t_plain = _best_of(lambda: [lin._call(probe[i : i + block]) for i in range(0, rows, block)])
    return _best_of(lambda: lin._split(probe, rows)) < 0.95 * t_plain


def _split_width(out_features: int, block: int) -> int | None:
    """The column block width tried for a layer: the widest multiple of `block` up to `SPLIT_COLS` that divides
    `out_features` and leaves at least two slices; None when there is none."""
    for cols in range(SPLIT_COLS - SPLIT_COLS % block, block - 1, -block):
        if out_features % cols == 0 and out_features // cols >= 2:
            return cols
    return None


def needs_row_blocks(device: torch.device, dtype: torch.dtype) -> bool:
    """bf16 on a CPU: the oneDNN kernels are canonical only for some row counts (module docstring)."""
    return device.type == "cpu" and dtype == torch.bfloat16


def make_rows_stable(model: nn.Module, block: int = BLOCK_ROWS, big_calls: bool = True,
                     plans: Path | None = None) -> int:
    """Replace every `nn.Linear` in `model` (the output head included) by a `RowStableLinear`, with a calibrated
    `BlockPlan` per shape unless `big_calls` is False (then 32-row blocks only), read from or stored in the
    folder `plans` when given (`calibrate`); returns how many layers."""
    targets = [(name, mod) for name, mod in model.named_modules() if type(mod) is nn.Linear]
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    for name, mod in targets:
        # The vocabulary-wide head is called on logits slices of its `big` rows (`head_slice_rows`): no sizes.
        plan = (calibrate(mod.in_features, mod.out_features, mod.bias is not None, mod.weight.dtype, block,
                          all_sizes=mod is not head, plans=plans) if big_calls else None)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, RowStableLinear(mod, block, plan))
    return len(targets)


def head_slice_rows(head: nn.Module, rows: int) -> int:
    """Rows per logits slice through `head`: its calibrated `big` for a `RowStableLinear` with one (each slice is
    then a single verified call, no concatenation of its output), else `rows`."""
    if isinstance(head, RowStableLinear) and head.plan is not None and head.plan.big is not None:
        return head.plan.big
    return rows


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
