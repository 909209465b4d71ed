"""Fixtures for the registry tests (helpers live in hubtools.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hubtools import write_lora


@pytest.fixture
def lora(tmp_path):
    """Factory: ``lora(seed=1, r=4)`` -> a fresh adapter folder under tmp_path."""
    count = [0]

    def make(**kwargs) -> Path:
        count[0] += 1
        return write_lora(tmp_path / f"adapter-{count[0]}", **kwargs)

    return make


@pytest.fixture
def registry_url(tmp_path) -> str:
    return f"file://{tmp_path / 'registry'}"


@pytest.fixture(params=["file"])
def store_url(request, tmp_path) -> str:
    """A fresh registry URL per test, for every store kind (the contract suite)."""
    if request.param == "file":
        return f"file://{tmp_path / 'registry'}"
    return request.getfixturevalue("s3_registry_url")
