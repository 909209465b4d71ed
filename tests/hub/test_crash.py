"""Guarantee 2: a push killed with SIGKILL at any point leaves no visible version and no
lock that blocks the next push; ``gc`` later removes what it left.

The kills are real SIGKILLs, sent by the process to itself at named points
(``LORABAY_FAULT``, see lorabay/hub/faults.py), plus kills at random moments.
"""

import random
import signal
import subprocess
import sys
import time

import pytest
from hubtools import WORKER, run_worker, write_lora

from lorabay.hub import AdapterNotFound, Registry

KILLED = -signal.SIGKILL


def leftovers(reg) -> tuple[list[str], list[str]]:
    referenced = {f["sha256"] for m in reg.list(include_yanked=True) for f in m.files}
    blobs = [
        i.key for i in reg.store.list("blobs/sha256/") if i.key.rsplit("/", 1)[1] not in referenced
    ]
    return blobs, [i.key for i in reg.store.list_temporary()]


S3 = pytest.mark.s3
OCI = pytest.mark.oci


@pytest.mark.parametrize(
    "store_url, fault",
    [
        ("file", "push:blob"),
        ("file", "local:blob-written"),
        ("file", "push:blobs"),
        pytest.param("s3", "push:blob", marks=S3),
        pytest.param("s3", "s3:part-uploaded", marks=S3),
        pytest.param("s3", "push:blobs", marks=S3),
        pytest.param("oci", "push:blob", marks=OCI),
        pytest.param("oci", "push:blobs", marks=OCI),
    ],
    indirect=["store_url"],
)
def test_killed_push_leaves_nothing_visible(store_url, tmp_path, fault, monkeypatch):
    # Small parts so the S3 push goes up in several parts and dies after the first.
    monkeypatch.setenv("LORABAY_S3_MULTIPART_BYTES", str(5 << 20))
    reg = Registry.open(store_url)
    reg.push(write_lora(tmp_path / "first", seed=1), "a")  # the registry exists already
    folder = write_lora(tmp_path / "big", seed=2, pad_bytes=12 << 20)
    done = run_worker(["push", store_url, str(folder), "a"], LORABAY_FAULT=fault)
    assert done.returncode == KILLED, done.stderr[-2000:]

    fresh = Registry.open(store_url)
    assert [m.ref for m in fresh.list(include_yanked=True)] == ["a:1"]
    with pytest.raises(AdapterNotFound):
        fresh.resolve("a:2")
    assert [e["event"] for e in fresh.events("a")] == ["pushed"]
    blobs, temporary = leftovers(fresh)
    assert blobs or temporary or fault == "push:blob", (
        "the kill happened after nothing was written?"
    )

    # The next push is not blocked (and gets version 2).
    started = time.monotonic()
    assert fresh.push(folder, "a").manifest.version == 2
    assert time.monotonic() - started < 30

    # gc (no grace) removes everything the dead push left that nobody references.
    fresh.gc(grace_seconds=0)
    assert leftovers(fresh) == ([], [])
    assert fresh.verify() == []


def test_killed_after_the_manifest_leaves_a_complete_version(store_url, tmp_path):
    folder = write_lora(tmp_path / "a", seed=3)
    done = run_worker(["push", store_url, str(folder), "a"], LORABAY_FAULT="push:manifest")
    assert done.returncode == KILLED
    # The manifest is the commit point: once it exists, the version is whole.
    fresh = Registry.open(store_url)
    assert fresh.resolve("a").version == 1 and fresh.verify() == []
    assert fresh.pull("a").is_dir()
    assert fresh.push(folder, "a").manifest.version == 1  # identical content: nothing new


def test_killed_while_holding_the_alias_lock(tmp_path, registry_url):
    reg = Registry.open(registry_url)
    reg.push(write_lora(tmp_path / "a", seed=1), "a")
    reg.push(write_lora(tmp_path / "b", seed=2), "a")
    reg.set_alias("a", "prod", 1)
    done = run_worker(["alias", registry_url, "a", "prod", "2"], LORABAY_FAULT="local:swap-locked")
    assert done.returncode == KILLED
    assert reg.aliases("a") == {"prod": 1}  # nothing half written
    started = time.monotonic()
    reg.set_alias("a", "prod", 2)  # the kernel dropped the dead holder's lock
    assert time.monotonic() - started < 5 and reg.aliases("a") == {"prod": 2}
    reg.gc(grace_seconds=0)
    assert leftovers(reg) == ([], [])


def test_killed_pull_blocks_no_one_and_leaves_no_folder(store_url, tmp_path, lorabay_home):
    reg = Registry.open(store_url)
    m = reg.push(write_lora(tmp_path / "a", seed=4), "a").manifest
    done = run_worker(["pull", store_url, "a"], LORABAY_FAULT="pull:file-fetched")
    assert done.returncode == KILLED
    assert not (lorabay_home / "cache" / m.digest_hex).exists()
    assert reg.pull("a") == lorabay_home / "cache" / m.digest_hex


@pytest.mark.slow
def test_kills_at_random_moments(registry_url, tmp_path):
    """Kill pushes of a 24 MiB adapter at random instants; the registry always stays whole."""
    reg = Registry.open(registry_url)
    reg.push(write_lora(tmp_path / "seed", seed=0), "a")
    rng = random.Random(7)
    for attempt in range(6):
        folder = write_lora(tmp_path / f"big{attempt}", seed=10 + attempt, pad_bytes=24 << 20)
        process = subprocess.Popen(
            [sys.executable, str(WORKER), "push", registry_url, str(folder), "a"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0.2, 1.2))
        process.send_signal(signal.SIGKILL)
        process.wait()
        fresh = Registry.open(registry_url)
        assert fresh.verify() == []  # every visible version is complete
        versions = [m.version for m in fresh.list()]
        assert versions == list(range(1, len(versions) + 1))
    fresh.push(write_lora(tmp_path / "after", seed=99), "a")
    fresh.gc(grace_seconds=0)
    assert leftovers(fresh) == ([], [])
