"""gc racing pushes that reuse blobs: every committed version stays whole (upkeep.py).

Each round leaves the weights of the next push behind as an unreferenced blob (what a
killed push, or a ``hub rm``, leaves), then pushes content using it while a gc with no
grace period runs in a loop in another thread: gc sees the blob as garbage exactly while
the push reuses it. Afterwards a fresh cache pulls every version and ``verify`` finds
nothing missing.
"""

import threading

import pytest
from hubtools import write_lora

from lorabay.hub import Registry
from lorabay.hub.cache import blob_key

ROUNDS = 24
JUNK = 12  # garbage blobs per round: gc spends a while deleting, the window a push meets


def leave_junk(reg, tmp_path, round_: int) -> None:
    """Unreferenced blobs for gc to delete (sorted by digest, so ours falls among them)."""
    import hashlib

    for i in range(JUNK):
        path = tmp_path / f"junk-{round_}-{i}"
        path.write_bytes(f"junk {round_} {i}".encode())
        sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        reg.store.put_file(blob_key(sha256), path, sha256)


def run_gc_loop(registry_url: str, stop: threading.Event, errors: list, runs: list) -> None:
    reg = Registry.open(registry_url)
    while not stop.is_set():
        try:
            runs.append(reg.gc(grace_seconds=0))
        except Exception as error:  # noqa: BLE001 - reported by the test
            errors.append(error)
            return


def weights_of(folder) -> tuple[str, object]:
    import hashlib

    path = folder / "adapter_model.safetensors"
    return hashlib.sha256(path.read_bytes()).hexdigest(), path


def check_every_version_pulls(registry_url, lorabay_home, monkeypatch, tmp_path) -> list:
    monkeypatch.setenv("LORABAY_HOME", str(tmp_path / "fresh-home"))  # nothing cached
    reg = Registry.open(registry_url)
    manifests = reg.list(include_yanked=True)
    for manifest in manifests:
        folder = reg.pull(manifest)
        assert {p.name for p in folder.iterdir()} == {f["path"] for f in manifest.files}
    assert reg.verify() == []
    return manifests


@pytest.mark.slow
def test_gc_racing_pushes_of_reused_blobs_loses_nothing(
    store_url, tmp_path, lorabay_home, monkeypatch
):
    reg = Registry.open(store_url)
    reg.push(write_lora(tmp_path / "first", seed=0), "seed")  # the registry exists
    stop, errors, runs = threading.Event(), [], []
    gc = threading.Thread(target=run_gc_loop, args=(store_url, stop, errors, runs))
    gc.start()
    try:
        for round_ in range(ROUNDS):
            folder = write_lora(tmp_path / f"r{round_}", seed=1000 + round_)
            sha256, weights = weights_of(folder)
            # Left behind, unreferenced: gc may take it at any moment from now on.
            reg.store.put_file(blob_key(sha256), weights, sha256)
            leave_junk(reg, tmp_path, round_)
            # One push of it (a second one would upload the blob again, healing a loss).
            reg.push(folder, f"team/race-{round_ % 3}")
            assert not errors, errors
    finally:
        stop.set()
        gc.join(timeout=120)
    assert not errors, errors
    assert len(runs) >= 2, "gc never ran alongside the pushes"
    assert sum(len(r.blobs) for r in runs) >= JUNK, "gc removed nothing: no race was run"
    manifests = check_every_version_pulls(store_url, lorabay_home, monkeypatch, tmp_path)
    assert len(manifests) == 1 + ROUNDS


@pytest.mark.slow
def test_gc_racing_pushes_and_removals_loses_nothing(
    store_url, tmp_path, lorabay_home, monkeypatch
):
    """Versions removed while others with the same content are pushed: the removal makes
    their blobs garbage just as the next push takes them again."""
    reg = Registry.open(store_url)
    pool = [write_lora(tmp_path / f"pool{i}", seed=2000 + i) for i in range(3)]
    stop, errors, runs = threading.Event(), [], []
    gc = threading.Thread(target=run_gc_loop, args=(store_url, stop, errors, runs))
    try:
        reg.push(pool[0], "team/churn")
        gc.start()
        for round_ in range(ROUNDS):
            folder = pool[round_ % len(pool)]
            live = reg.list("team/churn")
            for manifest in live:  # drop every version, so the content is garbage now...
                reg.remove(manifest.ref, drop_aliases=True)
            leave_junk(reg, tmp_path, round_)
            reg.push(folder, "team/churn")  # ... and reused at once
            reg.push(folder, f"team/keep-{round_}")
            assert not errors, errors
    finally:
        stop.set()
        if gc.is_alive():
            gc.join(timeout=120)
    assert not errors, errors
    assert len(runs) >= 2, "gc never ran alongside the pushes"
    manifests = check_every_version_pulls(store_url, lorabay_home, monkeypatch, tmp_path)
    assert [m.ref for m in manifests if m.name == "team/churn"] == [f"team/churn:{ROUNDS + 1}"]


def test_a_file_renamed_while_the_local_store_lists_is_left_out(tmp_path, monkeypatch):
    """A push renames its temporaries into place while gc lists the store: a file that
    scandir saw and that is gone by its stat is not there any more, not an error (CI saw
    gc fail with FileNotFoundError in the race above)."""
    import os

    from lorabay.hub.stores import local

    reg = Registry.open(f"file://{tmp_path / 'registry'}")
    reg.push(write_lora(tmp_path / "a", seed=1), "a")
    blobs = {info.key for info in reg.store.list("blobs/sha256/")}
    gone = sorted(blobs)[0]
    real_scandir = os.scandir

    def scandir_then_rename(folder):
        entries = list(real_scandir(folder))
        for entry in entries:
            if entry.path.endswith(gone):
                os.rename(entry.path, tmp_path / "moved")  # after the scan, before the stat
        return iter(entries)

    monkeypatch.setattr(local.os, "scandir", scandir_then_rename)
    assert {info.key for info in reg.store.list("blobs/sha256/")} == blobs - {gone}
