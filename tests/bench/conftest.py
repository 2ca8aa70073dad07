"""Fixtures for the harness tests: tiny random models (from tests.model.conftest), built once per session."""

from __future__ import annotations

import pytest

from model.loader import LoadedModel
from tests.model.conftest import build_tiny


@pytest.fixture(scope="session")
def tiny_lm():
    """Factory: tiny_lm('llama') -> LoadedModel with random weights, shared by every test of the session."""
    cache: dict[str, LoadedModel] = {}

    def make(name: str) -> LoadedModel:
        if name not in cache:
            cache[name] = build_tiny(name)
        return cache[name]

    return make


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a busy machine OpenMP threads stall waiting for a core."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
