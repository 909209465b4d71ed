"""The pull cache: verified adapter folders at ``$LORABAY_HOME/cache/<digest-hex>/``.

A pull fetches every file of a manifest into a temporary folder beside the cache,
checking each file's sha256 (or, for a large file, each piece's: pieces.py) while it
streams, several files and pieces at once, and renames the folder
into place only when all of them match, under a per-digest file lock: concurrent
pulls of one adapter fetch it once, and a reader never sees half a folder. A
cached folder is re-hashed on every pull; one that was changed is moved away and
fetched again.

Bounded, and safe to bound while in use. Whoever uses a folder holds a shared
``flock`` on ``.locks/<hex>.use`` (a :class:`CacheLease`: a pull while it runs, the
gateway for as long as the engine has the adapter loaded, since vLLM may read the
folder again later). Pruning takes that lock exclusively without waiting, so it skips
every folder any process holds, and removes the others least recently used first
(the lock file's mtime, set at each hold and release) until the cache fits its budget:
``LORABAY_CACHE_BUDGET`` after every fetch, or ``lorabay hub cache prune``. The kernel
drops the locks of a process that dies, so a killed gateway pins nothing. A holder
checks, once locked, that the lock file it holds is still the one at that path (a
pruner removes it while holding it exclusively), so the two can never miss each other.
``.meta/<hex>.json`` remembers what a folder was pulled as, for ``hub cache ls``.

    with pull_into_cache(store, manifest, cache, stats) as lease:   # held until the block ends
        use(lease.path)

Looking and pruning (``hub cache ls|prune``) are in cache_prune.py.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from lorabay.hub import faults, pieces
from lorabay.hub.atomic import write_atomically
from lorabay.hub.content import check_relative_path, sha256_file
from lorabay.hub.errors import ConfigError, DigestMismatch, InvalidAdapter, MissingBlob
from lorabay.hub.manifest import Manifest
from lorabay.hub.pieces import Progress
from lorabay.hub.settings import cache_budget

log = logging.getLogger("lorabay.hub")
LOCKS = ".locks"  # <hex>.use: held by users (shared) and pruners (exclusive); <hex>.lock: fetch
META = ".meta"  # <hex>.json: the reference and registry a folder was pulled from


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


# -- holding folders --------------------------------------------------------------------


def use_file(cache: Path, digest_hex: str) -> Path:
    return cache / LOCKS / f"{digest_hex}.use"


def hold(cache: Path, digest_hex: str, exclusive: bool = False) -> int | None:
    """An open descriptor holding ``digest_hex``'s use lock: shared (waits out a pruner, which
    holds it only while it removes the folder), or exclusive without waiting (None when any
    process uses the folder)."""
    path = use_file(cache, digest_hex)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB if exclusive else fcntl.LOCK_SH)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            return fd
        os.close(fd)  # a pruner removed this lock file after we opened it
        if exclusive:
            return None  # ... and the folder with it


def mark_used(cache: Path, digest_hex: str) -> None:
    try:
        os.utime(use_file(cache, digest_hex))
    except FileNotFoundError:
        pass


class CacheLease:
    """A held cache folder: no prune in any process removes ``path`` until ``release()``
    (or the end of a ``with`` block, or this process's end). ``os.fspath(lease)`` is the path."""

    def __init__(self, cache: Path, digest_hex: str, fd: int):
        self.cache = cache
        self.digest_hex = digest_hex
        self.path = cache / digest_hex
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            mark_used(self.cache, self.digest_hex)  # last used: now
            os.close(fd)

    def __enter__(self) -> CacheLease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"CacheLease({str(self.path)!r}, held={self.held})"

    def __del__(self) -> None:  # a lease dropped without release must not pin the folder
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            os.close(fd)


def pull_into_cache(
    store,
    manifest: Manifest,
    cache: Path,
    stats: PullStats,
    progress: Progress | None = None,
    registry_url: str | None = None,
) -> CacheLease:
    """The verified folder for ``manifest`` in ``cache``, fetched at most once at a time,
    held for the caller (release the lease when done with the folder). After a fetch, the
    cache is pruned to ``LORABAY_CACHE_BUDGET``."""
    fd = hold(cache, manifest.digest_hex)  # from here on no prune removes the folder
    try:
        fetched = fill_folder(store, manifest, cache, stats, progress)
        mark_used(cache, manifest.digest_hex)
    except BaseException:
        os.close(fd)
        raise
    lease = CacheLease(cache, manifest.digest_hex, fd)
    if fetched:
        note_source(cache, manifest, registry_url)
        enforce_budget(cache)
    return lease


def fill_folder(
    store, manifest: Manifest, cache: Path, stats: PullStats, progress: Progress | None
) -> bool:
    """Make ``cache/<hex>`` hold exactly ``manifest``'s verified files; whether it fetched."""
    final = cache / manifest.digest_hex
    with FileLock(cache / LOCKS / f"{manifest.digest_hex}.lock"):
        if final.is_dir():
            damage = find_damage(final, manifest)
            if damage is None:
                stats.cache_hits += 1
                return False
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
        return True


def note_source(cache: Path, manifest: Manifest, registry_url: str | None) -> None:
    """Remember what ``manifest``'s folder was pulled as (``hub cache ls`` shows it)."""
    record = {"ref": manifest.ref, "registry": registry_url, "size": manifest.size}
    try:
        write_atomically(cache / META / f"{manifest.digest_hex}.json", json.dumps(record))
    except OSError as error:
        log.debug("could not note where %s came from: %s", manifest.ref, error)


def enforce_budget(cache: Path) -> None:
    """Prune to ``LORABAY_CACHE_BUDGET`` (if set); a failure never fails the pull."""
    from lorabay.hub.cache_prune import prune_cache

    budget = cache_budget()
    if budget is None:
        return
    try:
        report = prune_cache(cache, budget=budget)
    except (OSError, ConfigError) as error:
        log.warning("could not prune the cache to its budget: %s", error)
        return
    if report.total > budget:
        log.warning(
            "the pull cache holds %d bytes, over its budget of %d: what is left is in use",
            report.total,
            budget,
        )


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
