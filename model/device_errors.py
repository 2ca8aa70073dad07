"""Which accelerator errors a process can survive, and the one it cannot.

A failed forward pass on a GPU is one of two kinds:

- **Out of memory** (`torch.OutOfMemoryError`, or an allocator message saying "out of memory"): nothing is
  broken; the caller may retry with a smaller batch (`pipeline.service.batcher` does).
- **Anything else the device reports** (`torch.AcceleratorError`, or a `RuntimeError` with a CUDA/HIP driver,
  cuBLAS or cuDNN message: an illegal memory access, a device-side assert, a launch failure, ...): the CUDA
  context is poisoned for the whole process, every later call fails, and memory that any stream's state lives
  in may have been overwritten. Nothing on the device can be trusted; the only safe move is to stop without
  writing any checkpoint and let the orchestrator restart the process, which resumes from the last
  checkpoint (exact resume makes that invisible in the output).

`fatal_device_error(exc)` tells the second kind apart (it walks `__cause__` / `__context__`, so a wrapped error
counts too); `raise_if_fatal(exc)` turns it into `DeviceFailure`, a `BaseException` like `KeyboardInterrupt`:
the `except Exception` handlers that isolate ordinary failures (one stream, one record, one snapshot) let it
through to the top.
"""

from __future__ import annotations

import torch

# Driver and library messages that mean the device (context) failed, not the input.
_FATAL_MARKERS = (
    "cuda error",
    "hip error",
    "device-side assert",
    "illegal memory access",
    "illegal instruction",
    "misaligned address",
    "unspecified launch failure",
    "cublas_status",
    "cudnn_status",
    "cudnn error",
    "nccl error",
    "cuda driver error",
    "ecc error",
)


class DeviceFailure(BaseException):
    """The accelerator failed in a way this process cannot recover from; exit and restart from a checkpoint."""


def _chain(exc: BaseException):
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]


def _out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def fatal_device_error(exc: BaseException) -> bool:
    """True when `exc` (or an error it was raised from) is an accelerator failure other than out of memory."""
    for e in _chain(exc):
        if isinstance(e, DeviceFailure):
            return True
        if _out_of_memory(e):
            continue
        if isinstance(e, torch.AcceleratorError):
            return True
        if isinstance(e, RuntimeError) and any(marker in str(e).lower() for marker in _FATAL_MARKERS):
            return True
    return False


def raise_if_fatal(exc: BaseException) -> None:
    """Re-raise an unrecoverable accelerator failure as `DeviceFailure`; return for anything else."""
    if isinstance(exc, DeviceFailure):
        raise exc
    if fatal_device_error(exc):
        raise DeviceFailure(f"the accelerator failed: {type(exc).__name__}: {exc}") from exc
