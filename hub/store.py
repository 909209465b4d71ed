"""The small interface every registry store implements, and ``open_store(url)``.

The registry logic (versions, aliases, yanks, events, gc) is written once in
``registry.py`` against this protocol; a store only moves bytes under string keys
with these atomic primitives (an OCI registry has no conditional write: stores/oci.py
builds them from a claim protocol):

- ``create(key, data)``: create if absent (``O_EXCL``/link, or S3 ``If-None-Match: *``);
- ``swap(key, data, etag)``: replace only if the current etag matches (``None``: only
  if absent), else :class:`PreconditionFailed` (file lock + ``os.replace``, or S3
  ``If-Match``);
- ``put_file(key, source, sha256)``: write a blob once, verifying its bytes; a blob that is
  there already has its age refreshed (``touch``), so ``gc``'s grace period counts from the
  push that reuses it;
- ``delete(key, etag)``: with an etag, remove only that content (else
  :class:`PreconditionFailed`), so "un-yank" and releasing gc's lease are exact.

Keys (the same in every store)::

    lorabay-registry.json                     marker: this is a registry
    blobs/sha256/<hex>                        file contents, written once
    adapters/<ns or _>/<name>/<version>.json  immutable manifests
    adapters/<ns or _>/<name>/<version>.yanked   the yanked flag, beside the manifest
    aliases/<ns or _>/<name>.json             {alias: version}, moved by compare-and-swap
    adapters/<ns or _>/<name>/<version>.removed  tombstone of a removed version (`hub rm`):
                                              its number is never given out again
    adapters/<ns or _>/<name>/<version>.sig.<key id>  a signature of that version by one
                                              key (a sigstore bundle: hub/signing.py)
    events/<ns or _>/<name>/<time-ns>-<random>.json  append-only event log, one object per
                                              event, keyed by name (``hub log NAME`` lists one
                                              prefix); older registries wrote
                                              ``events/<time-ns>-<random>.json``
    leases/gc.json                            held by a running gc (upkeep.py: why pushes read it)
    packs/<time-ns>-<random>.json             copies of many records for one GET (packs.py)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from lorabay.hub.errors import ConfigError

MARKER = "lorabay-registry.json"
MARKER_CONTENT = b'{"format": "lorabay-registry", "layout": 1}\n'  # what initialize writes


def md5_etag(data: bytes) -> str:
    """The etag S3 gives an object put in one part, and the local store gives every record
    (an identity for compare-and-swap and pack checks, not a security digest)."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


class PreconditionFailed(Exception):
    """A conditional write lost to another writer (S3 412); the caller re-reads and retries."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float  # seconds since the epoch
    etag: str | None = None  # as the store's LIST gives it (S3), None where it gives none


class Store(Protocol):
    url: str

    def exists(self) -> bool:
        """Whether the registry marker is there (a registry was created here)."""

    def initialize(self) -> None:
        """Create the registry here if it is not there yet (idempotent)."""

    def read(self, key: str) -> bytes | None: ...

    def read_tagged(self, key: str) -> tuple[bytes, str] | None:
        """The content and its etag, or None when absent."""

    def create(self, key: str, data: bytes) -> bool:
        """Atomically create ``key``; False (and nothing written) when it exists."""

    def swap(self, key: str, data: bytes, etag: str | None) -> str:
        """Replace ``key`` if its etag is ``etag`` (None: if absent); return the new etag."""

    def delete(self, key: str, etag: str | None = None) -> None:
        """Remove ``key``; absent is fine. With ``etag``: only if its current etag is that
        one, else PreconditionFailed (also when it is absent)."""

    def list(self, prefix: str) -> list[ObjectInfo]:
        """Every key under ``prefix`` (a folder-like prefix ending in '/')."""

    def has(self, key: str) -> bool: ...

    def put_file(self, key: str, source: Path, sha256: str) -> bool:
        """Store ``source`` under ``key`` once, checking its sha256; False when it was there
        (then its age is refreshed, as by ``touch``)."""

    def touch(self, key: str) -> bool:
        """Make ``key``'s modification time (the ``mtime`` ``list`` reports) now, content
        unchanged; False when it is absent. gc spares blobs younger than its grace period,
        so a push reusing a blob refreshes it (S3: a copy onto itself)."""

    def read_chunks(self, key: str) -> Iterator[bytes]:
        """Stream ``key``'s content; raises FileNotFoundError when absent."""

    def read_range(self, key: str, offset: int, length: int) -> Iterator[bytes]:
        """Stream up to ``length`` bytes of ``key`` from ``offset`` (fewer past its end);
        a pull fetches each piece of a large file with it, several at once."""

    def list_temporary(self) -> list[ObjectInfo]:
        """Leftovers of interrupted writes (temporary files, unfinished uploads)."""

    def delete_temporary(self, key: str) -> None: ...


def open_store(url: str) -> Store:
    """A store for ``file://DIR`` (or a plain path), ``s3://BUCKET/PREFIX`` or
    ``oci://HOST[:PORT]/REPOSITORY`` (any OCI registry: stores/oci.py)."""
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        from lorabay.hub.stores.local import LocalStore

        path = url[len("file://") :] if parsed.scheme == "file" else url
        if not path:
            raise ConfigError(f"registry URL {url!r} names no folder", "use file:///abs/path")
        return LocalStore(Path(path).expanduser())
    if parsed.scheme == "s3":
        from lorabay.hub.stores.s3 import S3Store

        if not parsed.netloc:
            raise ConfigError(f"registry URL {url!r} names no bucket", "use s3://BUCKET/PREFIX")
        return S3Store(parsed.netloc, parsed.path.strip("/"))
    if parsed.scheme == "oci":
        from lorabay.hub.stores.oci import OCIStore

        return OCIStore(parsed.netloc, parsed.path.strip("/"))
    raise ConfigError(
        f"unsupported registry URL {url!r}",
        "use file:///path/to/registry, s3://bucket/prefix or oci://host[:port]/repository",
    )
