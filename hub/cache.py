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
import queue
import shutil
import threading
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
COPY_STEP = 4 << 20  # bytes the copying thread moves before the hashing side follows
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
    """Copy one blob to ``dest`` and check that ``dest`` holds exactly the manifest's bytes."""
    key = blob_key(entry["sha256"])
    try:
        if hasattr(store, "local_path"):
            actual = copy_local_verified(store.local_path(key), dest, progress)
        else:
            actual = stream_verified(store.read_chunks(key), dest, progress)
    except FileNotFoundError:
        raise MissingBlob(entry["path"], "sha256:" + entry["sha256"]) from None
    if actual != entry["sha256"]:
        raise DigestMismatch(entry["path"], "sha256:" + entry["sha256"], "sha256:" + actual)


def fetch_piece(store, entry: dict, index: int, out: int, progress: Progress | None) -> None:
    """Fetch piece ``index`` of ``entry``'s blob into the open file ``out`` and check it.

    From a local store the piece is copied in the kernel and hashed from the cache file (the
    bytes it will serve); from S3 it is one ranged GET, hashed as it streams in."""
    offset, length = pieces.spans(entry["size"], entry["pieces"]["size"])[index]
    key = blob_key(entry["sha256"])
    try:
        if hasattr(store, "local_path"):
            with open(store.local_path(key), "rb", buffering=0) as src:
                copy_range(src.fileno(), out, offset, length)
            actual = pieces.sha256_range(out, offset, length, progress, mapped=True)
        else:
            actual = stream_range(store.read_range(key, offset, length), out, offset, progress)
    except FileNotFoundError:
        raise MissingBlob(entry["path"], "sha256:" + entry["sha256"]) from None
    expected = entry["pieces"]["sha256"][index]
    if actual != expected:
        where = f"{entry['path']} (bytes {offset}-{offset + length - 1})"
        raise DigestMismatch(where, "sha256:" + expected, "sha256:" + actual)


def stream_range(chunks, out: int, offset: int, progress: Progress | None) -> str:
    """Write ``chunks`` into the open file ``out`` from ``offset``; their sha256."""
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
        os.pwrite(out, chunk, offset)
        offset += len(chunk)
        if progress:
            progress(len(chunk))
    return digest.hexdigest()


def stream_verified(chunks, dest: Path, progress: Progress | None) -> str:
    with open(dest, "wb") as out:
        return stream_range(chunks, out.fileno(), 0, progress)


def copy_range(src: int, dst: int, offset: int, length: int, landed: Progress | None = None):
    """Copy ``length`` bytes at ``offset`` between open files, in the kernel where it can;
    ``landed(end)`` after each step. Stops early at the source's end."""
    end = offset + length
    while offset < end:
        count = min(COPY_STEP, end - offset)
        try:
            done = os.copy_file_range(src, dst, count, offset, offset)
        except OSError:  # no in-kernel copy here (old kernel, odd filesystem)
            done = os.pwrite(dst, os.pread(src, count, offset), offset)
        if done == 0:
            break
        offset += done
        if landed:
            landed(offset)


def copy_local_verified(source: Path, dest: Path, progress: Progress | None) -> str:
    """Copy in the kernel (``copy_file_range``) on a thread while this one hashes what has
    landed in ``dest``, chunk by chunk behind it. The two overlap (both release the GIL),
    so a pull costs about one sha256 pass rather than a copy plus a hash, and the hash
    covers the bytes the cache will serve, not the ones it was copied from."""
    results: queue.Queue = queue.Queue()
    with open(source, "rb") as src, open(dest, "wb") as out, open(dest, "rb") as back:
        size = os.fstat(src.fileno()).st_size

        def copy() -> None:
            try:
                copy_range(src.fileno(), out.fileno(), 0, size, results.put)
                results.put(None)
            except BaseException as error:  # handed to the hashing side, raised there
                results.put(error)

        worker = threading.Thread(target=copy, name="lorabay-copy", daemon=True)
        worker.start()
        digest = hashlib.sha256()
        hashed = 0
        while (item := results.get()) is not None:
            if isinstance(item, BaseException):
                worker.join()
                raise item
            while hashed < item:
                chunk = os.pread(back.fileno(), min(1 << 20, item - hashed), hashed)
                digest.update(chunk)
                hashed += len(chunk)
                if progress:
                    progress(len(chunk))
        worker.join()
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
