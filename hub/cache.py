"""The pull cache: verified adapter folders at ``$LORABAY_HOME/cache/<digest-hex>/``.

A pull fetches every file of a manifest into a temporary folder beside the cache,
checking each file's sha256 (or, for a large file, each piece's: pieces.py) while it
streams, several files and pieces at once, and renames the folder
into place only when all of them match, under a per-digest file lock: concurrent
pulls of one adapter fetch it once, and a reader never sees half a folder. A
cached folder is re-hashed on every pull; one that was changed is moved away and
fetched again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock
from lorabay.hub import faults, pieces
from lorabay.hub.content import check_relative_path, sha256_file
from lorabay.hub.errors import DigestMismatch, InvalidAdapter, MissingBlob
from lorabay.hub.manifest import Manifest

log = logging.getLogger("lorabay.hub")
Progress = Callable[[int], None]


def blob_key(sha256: str) -> str:
    return f"blobs/sha256/{sha256}"


@dataclass
class PullStats:
    """What pulls did in this process (the concurrency tests count fetches with it)."""

    fetched: int = 0
    cache_hits: int = 0
    refetched: int = 0


def find_damage(folder: Path, manifest: Manifest) -> str | None:
    """Why ``folder`` is not exactly ``manifest``'s files, or None when it is."""
    expected = {f["path"]: f for f in manifest.files}
    present = {
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink()
    }
    extra = sorted(present - set(expected))
    if extra:
        return f"{extra[0]} is not in the manifest"
    for path, entry in expected.items():
        file = folder / path
        if file.is_symlink() or not file.is_file():
            return f"{path} is missing"
        if file.stat().st_size != entry["size"]:
            return f"{path} has {file.stat().st_size} bytes, the manifest says {entry['size']}"
        if not content_matches(file, entry):
            return f"{path} does not match sha256:{entry['sha256']}"
    return None


def content_matches(file: Path, entry: dict) -> bool:
    """Whether ``file`` holds ``entry``'s bytes: its pieces hashed on every core, else its sha256."""
    if entry.get("pieces") is None:
        return sha256_file(file) == entry["sha256"]
    expected = entry["pieces"]["sha256"]
    spans = pieces.spans(entry["size"], entry["pieces"]["size"])
    with open(file, "rb", buffering=0) as handle, ThreadPoolExecutor(pieces.hash_workers()) as pool:
        actual = pool.map(lambda span: pieces.sha256_range(handle.fileno(), *span), spans)
        return list(actual) == expected


def fetch_file(store, entry: dict, dest: Path, progress: Progress | None) -> None:
    """Fetch one blob into ``dest``, checking its sha256 on the bytes as they are written."""
    try:
        chunks = store.read_chunks(blob_key(entry["sha256"]))
        with open(dest, "wb") as out:
            actual = stream_range(chunks, out.fileno(), 0, progress)
    except FileNotFoundError:
        raise MissingBlob(entry["path"], "sha256:" + entry["sha256"]) from None
    if actual != entry["sha256"]:
        raise DigestMismatch(entry["path"], "sha256:" + entry["sha256"], "sha256:" + actual)


def fetch_piece(store, entry: dict, index: int, out: int, progress: Progress | None) -> None:
    """Fetch piece ``index`` of ``entry``'s blob into the open file ``out`` and check it
    (a ranged read: from a file, or one ranged GET from S3)."""
    offset, length = pieces.spans(entry["size"], entry["pieces"]["size"])[index]
    try:
        chunks = store.read_range(blob_key(entry["sha256"]), offset, length)
        actual = stream_range(chunks, out, offset, progress)
    except FileNotFoundError:
        raise MissingBlob(entry["path"], "sha256:" + entry["sha256"]) from None
    expected = entry["pieces"]["sha256"][index]
    if actual != expected:
        where = f"{entry['path']} (bytes {offset}-{offset + length - 1})"
        raise DigestMismatch(where, "sha256:" + expected, "sha256:" + actual)


def stream_range(chunks, out: int, offset: int, progress: Progress | None) -> str:
    """Write ``chunks`` into the open file ``out`` from ``offset``; their sha256.

    Each chunk is hashed and then written from the same buffer, so the digest covers
    exactly the bytes the cache will serve, and each byte crosses memory once while it
    is still in the CPU's cache (a kernel copy followed by a hash of the copy read it
    twice: 0.4x of ``cp`` against 0.6x this way, bench/hub_bench.py)."""
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
        os.pwrite(out, chunk, offset)
        offset += len(chunk)
        if progress:
            progress(len(chunk))
    return digest.hexdigest()


def fetch_folder(store, manifest: Manifest, dest: Path, progress: Progress | None) -> None:
    """Fetch every file (and every piece of a large one) at once: one thread per core for a
    local store, where hashing is the work, and the store's ``concurrent_reads`` for S3."""
    progress = pieces.shared_progress(progress)
    workers = max(pieces.hash_workers(), getattr(store, "concurrent_reads", 1))
    targets, opened, jobs = [], [], []
    pool = ThreadPoolExecutor(workers)
    try:
        for entry in manifest.files:
            path = check_relative_path(entry["path"], f"manifest {manifest.ref}")
            target = dest / path
            target.parent.mkdir(parents=True, exist_ok=True)
            targets.append(target)
            if entry.get("pieces") is None:
                jobs.append(pool.submit(fetch_file, store, entry, target, progress))
                continue
            out = os.open(target, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            opened.append(out)
            os.ftruncate(out, entry["size"])
            for index in range(len(entry["pieces"]["sha256"])):
                jobs.append(pool.submit(fetch_piece, store, entry, index, out, progress))
        for job in jobs:
            job.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # after a failure: drop what is queued
        for out in opened:
            os.close(out)
    for target in targets:
        os.chmod(target, 0o444)  # the cache is read-only by intent
        faults.checkpoint("pull:file-fetched")


def discard(folder: Path) -> None:
    """Move ``folder`` out of sight first (one rename), then delete it."""
    aside = folder.parent / f".trash-{uuid.uuid4().hex}"
    try:
        os.rename(folder, aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def pull_into_cache(
    store,
    manifest: Manifest,
    cache: Path,
    stats: PullStats,
    progress: Progress | None = None,
) -> Path:
    """The verified folder for ``manifest`` in ``cache``, fetched at most once at a time."""
    final = cache / manifest.digest_hex
    (cache / ".locks").mkdir(parents=True, exist_ok=True)
    with FileLock(cache / ".locks" / f"{manifest.digest_hex}.lock"):
        if final.is_dir():
            damage = find_damage(final, manifest)
            if damage is None:
                stats.cache_hits += 1
                return final
            log.warning("cached %s was changed (%s); fetching it again", manifest.ref, damage)
            discard(final)
            stats.refetched += 1
        tmp = cache / f".tmp-{manifest.digest_hex}-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            fetch_folder(store, manifest, tmp, progress)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        stats.fetched += 1
        return final


def copy_out(source: Path, to: Path) -> Path:
    """Copy a verified cache folder to ``to`` (absent or empty) via a temporary sibling."""
    to = to.expanduser().absolute()
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise InvalidAdapter(str(to), "exists and is not an empty folder", "pick another --to")
    to.parent.mkdir(parents=True, exist_ok=True)
    tmp = to.parent / f".{to.name}.tmp-{uuid.uuid4().hex}"
    try:
        shutil.copytree(source, tmp, copy_function=shutil.copyfile)
        if to.exists():
            to.rmdir()
        os.rename(tmp, to)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return to
