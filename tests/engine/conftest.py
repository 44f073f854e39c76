"""Fixtures for the engine tests (the tiny Llama and its adapters are in tests/conftest.py)."""

from __future__ import annotations

import pytest

from support.engine import load_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    """The real default model's tokenizer (the tiny Llama shares its vocabulary)."""
    return load_tokenizer()
