"""Snapshot and restore of a SinkCache to bytes: safetensors tensors plus a JSON header. No pickle.

Layout: one safetensors blob. Tensors `k.{layer}` / `v.{layer}` hold each layer's [sinks | window] keys
and values, trimmed to what the next step keeps; callers may add their own tensors (`x.{name}`, e.g. the
last logits of a stream). The safetensors metadata entry `sinkstream` is a JSON header, the pydantic model
`SnapshotHeader`:

    {"format": 1, "fingerprint": ..., "model_type": ..., "sinks": S, "window": W, "max_chunk": C,
     "dtype": "torch.float32", "seen": tokens seen, "base": frame offset, "crc32c": {...}, "extra": {...},
     "adapter": LoRA adapter fingerprint (only when `model.adapter` is set)}

Restore is bit-exact: continuing after restore gives the same logits, bit for bit, as never stopping.
A snapshot from another model, dtype or format, or with damaged bytes, raises `SnapshotError` saying what
was expected and what arrived.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import crc32c
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from model.loader import LoadedModel
from model.sink_cache import SinkCache

FORMAT_VERSION = 1


class SnapshotError(ValueError):
    """A snapshot cannot be restored: wrong model, wrong format, or damaged bytes."""


class SnapshotHeader(BaseModel):
    """The JSON header of a snapshot (format 1). Unknown keys are refused: a header this code does not fully
    understand must not be restored as if it did."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: int
    # `LoadedModel.fingerprint` of the model that took the snapshot (weights + dtype).
    fingerprint: str
    model_type: str
    sinks: int = Field(ge=0)
    window: int = Field(ge=1)
    max_chunk: int = Field(ge=1)
    # `str(torch.dtype)` of the cache tensors, e.g. "torch.float32".
    dtype: str
    # Tokens the stream has seen in total, and the frame offset of the cache's first position.
    seen: int = Field(ge=0)
    base: int
    # crc32c of each tensor's bytes, by tensor name.
    crc32c: dict[str, int]
    # The caller's JSON-able state (e.g. a stream session's counters).
    extra: dict[str, Any] = Field(default_factory=dict)
    # crc32c of this header's own JSON with this field set to 0: a flipped bit in a number (seen, a session's
    # next_offset, ...) is refused like a flipped bit in a tensor.
    header_crc32c: int = 0
    # `LoadedModel.adapter`: the LoRA adapter merged into the weights (`model.adapter`), absent without one. Only
    # for the message: the fingerprint already covers it. Left out of the JSON when None, so the headers (and
    # their checksums) of snapshots taken before adapters existed stay exactly as they were.
    adapter: str | None = None

    def own_checksum(self) -> int:
        zeroed = self.model_copy(update={"header_crc32c": 0})
        return crc32c.crc32c(zeroed.model_dump_json(exclude=self.unset_adapter()).encode())

    def unset_adapter(self) -> set[str] | None:
        """What the JSON leaves out: `adapter` when there is none (bytes as before adapters existed)."""
        return {"adapter"} if self.adapter is None else None


def _checksum(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    return {name: crc32c.crc32c(t.contiguous().view(torch.uint8).numpy().data) for name, t in sorted(tensors.items())}


def dump_cache(
    cache: SinkCache, extra: dict[str, Any] | None = None, tensors: dict[str, torch.Tensor] | None = None
) -> bytes:
    """Serialise `cache` (plus JSON-able `extra` and named `tensors`) to bytes."""
    if cache.plan is not None:
        raise RuntimeError("cannot snapshot a SinkCache in the middle of a forward pass")
    out: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(cache.sink_layers()):
        if layer.keys is None:
            continue
        k, v = layer.trimmed()
        out[f"k.{i}"] = k.detach().to("cpu").contiguous()
        out[f"v.{i}"] = v.detach().to("cpu").contiguous()
    for name, t in (tensors or {}).items():
        out[f"x.{name}"] = t.detach().to("cpu").contiguous()
    header = SnapshotHeader(
        format=FORMAT_VERSION,
        fingerprint=cache.lm.fingerprint,
        model_type=cache.lm.arch.model_type,
        sinks=cache.sinks,
        window=cache.window,
        max_chunk=cache.max_chunk,
        dtype=str(cache.lm.dtype),
        seen=cache.seen,
        base=cache.base,
        crc32c=_checksum(out),
        extra=extra or {},
        adapter=cache.lm.adapter,
    )
    header = header.model_copy(update={"header_crc32c": header.own_checksum()})
    return st_save(out, metadata={"sinkstream": header.model_dump_json(exclude=header.unset_adapter())})


def read_header(blob: bytes) -> dict[str, Any]:
    """The JSON header of a snapshot as a dict (see `parse_header` for the typed one)."""
    return parse_header(blob).model_dump()


def parse_header(blob: bytes) -> SnapshotHeader:
    """The `SnapshotHeader` of a snapshot, without loading its tensors; `SnapshotError` when it is unreadable,
    of another format, or not a valid header (naming the field, what was expected and what arrived)."""
    if len(blob) < 8:
        raise SnapshotError(f"expected a sinkstream snapshot (safetensors), got {len(blob)} bytes")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > len(blob) - 8:
        raise SnapshotError(f"snapshot is truncated: header says {n} bytes, only {len(blob) - 8} follow")
    try:
        meta = json.loads(blob[8 : 8 + n]).get("__metadata__", {})
        raw = json.loads(meta["sinkstream"])
    except (ValueError, KeyError, AttributeError) as exc:
        raise SnapshotError(f"expected a sinkstream snapshot header, got unreadable metadata ({exc})") from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_VERSION:
        got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise SnapshotError(f"expected snapshot format {FORMAT_VERSION}, got {got!r}")
    try:
        header = SnapshotHeader.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        field = ".".join(str(x) for x in first["loc"])
        raise SnapshotError(
            f"snapshot header field {field!r}: {first['msg']}; got {first.get('input')!r}"
        ) from exc
    if header.own_checksum() != header.header_crc32c:
        raise SnapshotError("snapshot is corrupt: crc32c of its header does not match (a number in it was changed)")
    return header


def _adapter_name(fingerprint: str | None) -> str:
    return f"LoRA adapter {fingerprint}" if fingerprint else "no adapter"


def load_cache(lm: LoadedModel, blob: bytes) -> tuple[SinkCache, dict[str, Any], dict[str, torch.Tensor]]:
    """Restore a cache for `lm` from `dump_cache` bytes; returns (cache, extra, tensors)."""
    header = parse_header(blob)
    # dtype and adapter first: the fingerprint covers both, and a bf16 snapshot offered to an fp32 model, or one
    # taken under another LoRA adapter (`model.adapter`), says so
    if header.dtype == str(lm.dtype) and header.adapter != lm.adapter:
        raise SnapshotError(
            f"snapshot adapter mismatch: this model runs with {_adapter_name(lm.adapter)} (model.adapter), "
            f"the snapshot was taken with {_adapter_name(header.adapter)}"
        )
    for key, have in (("dtype", str(lm.dtype)), ("fingerprint", lm.fingerprint)):
        if getattr(header, key) != have:
            raise SnapshotError(
                f"snapshot {key} mismatch: this model has {have!r}, "
                f"the snapshot was taken with {getattr(header, key)!r}"
            )
    try:
        tensors = st_load(blob)
    except Exception as exc:  # safetensors raises its own error types
        raise SnapshotError(f"snapshot tensors are unreadable: {exc}") from exc
    if _checksum(tensors) != header.crc32c:
        raise SnapshotError("snapshot is corrupt: crc32c of its tensors does not match the header")
    try:
        cache = SinkCache(lm, sinks=header.sinks, window=header.window, max_chunk=header.max_chunk)
    except ValueError as exc:  # a geometry this model cannot hold
        raise SnapshotError(f"snapshot geometry refused: {exc}") from exc
    cache.seen, cache.base = header.seen, header.base
    for i, layer in enumerate(cache.sink_layers()):
        if f"k.{i}" in tensors:
            k = tensors[f"k.{i}"].to(lm.device)
            v = tensors[f"v.{i}"].to(lm.device)
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v
    extra_tensors = {name[2:]: t.to(lm.device) for name, t in tensors.items() if name.startswith("x.")}
    return cache, dict(header.extra), extra_tensors
