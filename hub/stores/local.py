"""The ``file://DIR`` store: the same guarantees as S3 from POSIX primitives.

- create-if-absent: write a temporary file, then ``os.link`` it to the key (fails
  with EEXIST when the key exists), so a reader sees all of it or nothing;
- compare-and-swap: under a per-key file lock (``filelock``: an ``flock`` that the
  kernel drops when the holder dies, so a SIGKILLed writer blocks nobody), compare
  the content's md5 with the expected etag, then ``os.replace``;
- temporary files live in ``DIR/.tmp`` (same filesystem, so link and replace are
  atomic); ``gc`` removes the ones an interrupted writer left.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from filelock import FileLock

from lorabay.hub import faults
from lorabay.hub.errors import InvalidAdapter, RegistryUnavailable
from lorabay.hub.store import MARKER, MARKER_CONTENT, ObjectInfo, PreconditionFailed, md5_etag

CHUNK = 1 << 20
_TMP = ".tmp"
_LOCKS = ".locks"


class LocalStore:
    def __init__(self, root: Path):
        self.root = root.absolute()
        self.url = f"file://{self.root}"
        self._exists = False

    # -- the registry itself --------------------------------------------------------
    def exists(self) -> bool:
        if not self._exists:
            self._exists = (self.root / MARKER).is_file()
        return self._exists

    def check_reachable(self) -> None:
        """Refuse a path that cannot hold a registry (a file, or a folder of something else)."""
        if self.root.exists() and not self.root.is_dir():
            raise RegistryUnavailable(self.url, f"{self.root} is a file, not a folder")
        # Our own entries alone mean another process is creating the registry right now.
        ours = {_TMP, _LOCKS, MARKER, "adapters", "aliases", "blobs", "events", "leases"}
        if self.root.is_dir() and not self.exists() and set(os.listdir(self.root)) - ours:
            raise RegistryUnavailable(
                self.url, f"{self.root} is a non-empty folder that is not a lorabay registry"
            )

    def initialize(self) -> None:
        if self.exists():
            return
        self.check_reachable()
        try:
            for sub in (_TMP, _LOCKS):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise RegistryUnavailable(self.url, f"cannot create {self.root}: {error}") from None
        self.create(MARKER, MARKER_CONTENT)
        self._exists = True

    # -- small objects ---------------------------------------------------------------
    def _path(self, key: str) -> Path:
        return self.root / key

    @contextlib.contextmanager
    def _temporary(self) -> Iterator[tuple[Path, BinaryIO]]:
        """A new temporary file, open for writing and ``flock``ed by this writer until the
        block ends (then it is removed): gc takes only temporaries nobody holds, so even
        ``gc --grace 0`` never pulls one from under a live write. Should gc remove it
        between the open and the lock, the inode no longer matches: take another."""
        while True:
            tmp = self.root / _TMP / f"{os.getpid()}-{uuid.uuid4().hex}"
            handle = open(tmp, "xb")  # noqa: SIM115 - closed below
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                current = os.stat(tmp).st_ino == os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            handle.close()
        try:
            yield tmp, handle
        finally:
            tmp.unlink(missing_ok=True)
            handle.close()

    @contextlib.contextmanager
    def _write_temporary(self, data: bytes) -> Iterator[Path]:
        with self._temporary() as (tmp, handle):
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())  # small records: make them durable, not only atomic
            yield tmp

    def read(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def read_tagged(self, key: str) -> tuple[bytes, str] | None:
        data = self.read(key)
        return None if data is None else (data, md5_etag(data))

    def has(self, key: str) -> bool:
        return self._path(key).is_file()

    def create(self, key: str, data: bytes) -> bool:
        final = self._path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        with self._write_temporary(data) as tmp:
            try:
                os.link(tmp, final)
                return True
            except FileExistsError:
                return False

    def _lock(self, key: str) -> FileLock:
        name = hashlib.sha1(key.encode(), usedforsecurity=False).hexdigest()
        return FileLock(self.root / _LOCKS / f"{name}.lock", timeout=60)

    def swap(self, key: str, data: bytes, etag: str | None) -> str:
        final = self._path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        with self._lock(key):
            current = self.read_tagged(key)
            if (current[1] if current else None) != etag:
                raise PreconditionFailed(key)
            with self._write_temporary(data) as tmp:
                faults.checkpoint("local:swap-locked")
                os.replace(tmp, final)
        return md5_etag(data)

    def delete(self, key: str, etag: str | None = None) -> None:
        if etag is None:
            self._path(key).unlink(missing_ok=True)
            return
        with self._lock(key):  # the same lock swap takes: compare, then unlink
            current = self.read_tagged(key)
            if current is None or current[1] != etag:
                raise PreconditionFailed(key)
            self._path(key).unlink()

    def list(self, prefix: str) -> list[ObjectInfo]:
        found: list[ObjectInfo] = []
        start = self._path(prefix.rstrip("/"))

        def walk(folder: Path, rel: str) -> None:
            try:
                entries = list(os.scandir(folder))
            except (FileNotFoundError, NotADirectoryError):
                return
            for entry in entries:
                key = f"{rel}/{entry.name}" if rel else entry.name
                if entry.is_dir(follow_symlinks=False):
                    walk(Path(entry.path), key)
                elif entry.is_file(follow_symlinks=False):
                    try:
                        info = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:  # renamed or removed since the scan: gone
                        continue
                    found.append(ObjectInfo(key, info.st_size, info.st_mtime))

        walk(start, prefix.rstrip("/"))
        return found

    # -- blobs -----------------------------------------------------------------------
    def put_file(self, key: str, source: Path, sha256: str) -> bool:
        final = self._path(key)
        if self.touch(key):  # there already: refresh its age for gc's grace period
            return False
        final.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with self._temporary() as (tmp, dst):
            with open(source, "rb", buffering=0) as src:
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
            dst.flush()
            faults.checkpoint("local:blob-written")
            if digest.hexdigest() != sha256:
                raise InvalidAdapter(
                    str(source),
                    "changed while it was being pushed",
                    "push again once nothing writes to the folder",
                )
            try:
                os.link(tmp, final)
            except FileExistsError:
                return False
            except OSError as error:  # a filesystem without hard links
                if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV):
                    raise
                os.replace(tmp, final)
            return True

    def touch(self, key: str) -> bool:
        try:
            os.utime(self._path(key))
            return True
        except (FileNotFoundError, NotADirectoryError):
            return False

    def read_chunks(self, key: str) -> Iterator[bytes]:
        return self.read_range(key, 0, None)

    def read_range(self, key: str, offset: int, length: int | None) -> Iterator[bytes]:
        with open(self._path(key), "rb", buffering=0) as handle:
            end = None if length is None else offset + length
            while end is None or offset < end:
                step = CHUNK if end is None else min(CHUNK, end - offset)
                if not (chunk := os.pread(handle.fileno(), step, offset)):
                    return
                yield chunk
                offset += len(chunk)

    def local_path(self, key: str) -> Path:
        """Where ``key`` lies on disk (the tests damage blobs through it)."""
        return self._path(key)

    # -- leftovers -------------------------------------------------------------------
    def list_temporary(self) -> list[ObjectInfo]:
        """Temporaries no live writer holds (see ``_temporary``)."""
        return [info for info in self.list(_TMP + "/") if not self._held(info.key)]

    def _held(self, key: str) -> bool:
        try:
            fd = os.open(self._path(key), os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, IsADirectoryError):
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def delete_temporary(self, key: str) -> None:
        path = self._path(key)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
