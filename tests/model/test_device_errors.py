"""Which device errors the service may survive (out of memory) and which end the process (everything else)."""

from __future__ import annotations

import pytest
import torch

from model.device_errors import DeviceFailure, fatal_device_error, raise_if_fatal
from model.snapshot import SnapshotError


@pytest.mark.parametrize("exc", [
    torch.AcceleratorError("CUDA error: an illegal memory access was encountered"),
    RuntimeError("CUDA error: device-side assert triggered\nCompile with `TORCH_USE_CUDA_DSA`"),
    RuntimeError("CUDA error: unspecified launch failure"),
    RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx( handle, opa, opb, ...)`"),
    RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"),
    RuntimeError("HIP error: an illegal memory access was encountered"),
])
def test_device_failures_are_fatal(exc):
    assert fatal_device_error(exc)
    with pytest.raises(DeviceFailure) as info:
        raise_if_fatal(exc)
    assert info.value.__cause__ is exc and not isinstance(info.value, Exception)  # passes `except Exception`


@pytest.mark.parametrize("exc", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("CUDA error: out of memory"),
    torch.AcceleratorError("CUDA error: out of memory"),
    RuntimeError("injected failure of the model step"),
    ValueError("chunk length must be in 1..64, got 65"),
    IndexError("index out of range in self"),
])
def test_out_of_memory_and_ordinary_errors_are_not(exc):
    assert not fatal_device_error(exc)
    raise_if_fatal(exc)  # returns: the caller isolates the failure


def test_a_wrapped_device_failure_is_still_fatal():
    """Restoring a snapshot onto a dead device surfaces as SnapshotError; the cause decides."""
    try:
        try:
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
        except RuntimeError as inner:
            raise SnapshotError(f"snapshot session fields: {inner}") from inner
    except SnapshotError as outer:
        assert fatal_device_error(outer)
