"""Snapshot and restore of a SinkCache to bytes: safetensors tensors plus a JSON header. No pickle.

Layout: one safetensors blob. Tensors `k.{layer}` / `v.{layer}` hold each layer's [sinks | window] keys
and values, trimmed to what the next step keeps; callers may add their own tensors (`x.{name}`, e.g. the
last logits of a stream). The safetensors metadata entry `sinkstream` is a JSON header:

    {"format": 1, "fingerprint": ..., "model_type": ..., "sinks": S, "window": W, "max_chunk": C,
     "dtype": "torch.float32", "seen": tokens seen, "base": frame offset, "crc32c": {...}, "extra": {...}}

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
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from model.loader import LoadedModel
from model.sink_cache import SinkCache

FORMAT_VERSION = 1


class SnapshotError(ValueError):
    """A snapshot cannot be restored: wrong model, wrong format, or damaged bytes."""


def _checksum(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    return {name: crc32c.crc32c(t.contiguous().view(torch.uint8).numpy()) for name, t in sorted(tensors.items())}


def dump_cache(
    cache: SinkCache, extra: dict[str, Any] | None = None, tensors: dict[str, torch.Tensor] | None = None
) -> bytes:
    """Serialise `cache` (plus JSON-able `extra` and named `tensors`) to bytes."""
    if cache.plan is not None:
        raise RuntimeError("cannot snapshot a SinkCache in the middle of a forward pass")
    out: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(cache.layers):
        if layer.keys is None:
            continue
        k, v = layer.trimmed()
        out[f"k.{i}"] = k.detach().to("cpu").contiguous()
        out[f"v.{i}"] = v.detach().to("cpu").contiguous()
    for name, t in (tensors or {}).items():
        out[f"x.{name}"] = t.detach().to("cpu").contiguous()
    header = {
        "format": FORMAT_VERSION,
        "fingerprint": cache.lm.fingerprint,
        "model_type": cache.lm.arch.model_type,
        "sinks": cache.sinks,
        "window": cache.window,
        "max_chunk": cache.max_chunk,
        "dtype": str(cache.lm.dtype),
        "seen": cache.seen,
        "base": cache.base,
        "crc32c": _checksum(out),
        "extra": extra or {},
    }
    return st_save(out, metadata={"sinkstream": json.dumps(header)})


def read_header(blob: bytes) -> dict[str, Any]:
    """The JSON header of a snapshot, without loading its tensors."""
    if len(blob) < 8:
        raise SnapshotError(f"expected a sinkstream snapshot (safetensors), got {len(blob)} bytes")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > len(blob) - 8:
        raise SnapshotError(f"snapshot is truncated: header says {n} bytes, only {len(blob) - 8} follow")
    try:
        meta = json.loads(blob[8 : 8 + n]).get("__metadata__", {})
        return json.loads(meta["sinkstream"])
    except (ValueError, KeyError, AttributeError) as exc:
        raise SnapshotError(f"expected a sinkstream snapshot header, got unreadable metadata ({exc})") from exc


def load_cache(lm: LoadedModel, blob: bytes) -> tuple[SinkCache, dict[str, Any], dict[str, torch.Tensor]]:
    """Restore a cache for `lm` from `dump_cache` bytes; returns (cache, extra, tensors)."""
    header = read_header(blob)
    if header.get("format") != FORMAT_VERSION:
        raise SnapshotError(f"expected snapshot format {FORMAT_VERSION}, got {header.get('format')!r}")
    for key, have in (("fingerprint", lm.fingerprint), ("dtype", str(lm.dtype))):
        if header.get(key) != have:
            raise SnapshotError(
                f"snapshot {key} mismatch: this model has {have!r}, the snapshot was taken with {header.get(key)!r}"
            )
    try:
        tensors = st_load(blob)
    except Exception as exc:  # safetensors raises its own error types
        raise SnapshotError(f"snapshot tensors are unreadable: {exc}") from exc
    if _checksum(tensors) != {k: int(v) for k, v in header["crc32c"].items()}:
        raise SnapshotError("snapshot is corrupt: crc32c of its tensors does not match the header")
    cache = SinkCache(lm, sinks=header["sinks"], window=header["window"], max_chunk=header["max_chunk"])
    cache.seen, cache.base = header["seen"], header["base"]
    for i, layer in enumerate(cache.layers):
        if f"k.{i}" in tensors:
            k = tensors[f"k.{i}"].to(lm.device)
            v = tensors[f"v.{i}"].to(lm.device)
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v
    extra_tensors = {name[2:]: t.to(lm.device) for name, t in tensors.items() if name.startswith("x.")}
    return cache, header.get("extra", {}), extra_tensors
