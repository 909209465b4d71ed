"""Fixtures for the registry tests (helpers live in hubtools.py)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from hubtools import TAMPERED, write_lora


@pytest.fixture(autouse=True)
def restore_tampered_blobs():
    """Put back the OCI blobs a test damaged on the registry's disk (hubtools.overwrite)."""
    yield
    while TAMPERED:
        path, data = TAMPERED.popitem()
        path.write_bytes(data)


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


@pytest.fixture
def s3_registry_url(s3_server, monkeypatch, request) -> str:
    """A fresh s3:// registry (its own prefix) on the session's S3 server, with the
    environment pointing at it (LORABAY_S3_ENDPOINT and the AWS variables)."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return f"s3://{s3_server.bucket}/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def oci_registry_url(oci_server) -> str:
    """A fresh oci:// registry (its own repository) on the session's OCI registry."""
    return oci_server.url(f"lorabay/t{uuid.uuid4().hex[:12]}")


@pytest.fixture(
    params=[
        "file",
        pytest.param("s3", marks=pytest.mark.s3),
        pytest.param("oci", marks=pytest.mark.oci),
    ]
)
def store_url(request, tmp_path) -> str:
    """A fresh registry URL per test, for every store kind (the contract suite)."""
    if request.param == "file":
        return f"file://{tmp_path / 'registry'}"
    if request.param == "oci":
        return request.getfixturevalue("oci_registry_url")
    return request.getfixturevalue("s3_registry_url")
