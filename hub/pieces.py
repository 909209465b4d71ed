"""Piece digests: the sha256 of each 16 MiB piece of a large file, so it is checked on every core.

A file's sha256 is one sequential pass, about 1 GB/s a core with SHA-NI, slower than a
page-cache copy: a verified pull of one large weights file could never keep up with
``cp``. So each file over ``PIECE_BYTES`` also records the sha256 of every piece::

    {"path": "adapter_model.safetensors", "size": 67108864, "sha256": "<hex>",
     "pieces": {"size": 16777216, "sha256": ["<hex>", "<hex>", "<hex>", "<hex>"]}}

The pieces are part of the version digest (``manifest.digest_files``), so a pinned
``name@sha256:...`` still fixes every byte, and a pull checks the pieces in parallel
(and fetches them in parallel from S3, one ranged GET each) instead of the one long
sha256 pass. ``hub verify`` still re-hashes whole blobs against their ``sha256``.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable

PIECE_BYTES = 16 << 20
READ_STEP = 1 << 20

# Called with the number of bytes just read, hashed or copied (a bar's update).
Progress = Callable[[int], None]


def hash_workers() -> int:
    """Threads that hash at once: one per core (hashlib releases the GIL), at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def spans(size: int, piece: int | None = None) -> list[tuple[int, int]]:
    """``(offset, length)`` of each piece of a ``size``-byte file."""
    piece = piece or PIECE_BYTES
    return [(offset, min(piece, size - offset)) for offset in range(0, size, piece)]


def sha256_range(fd: int, offset: int, length: int) -> str:
    """The sha256 of ``length`` bytes at ``offset`` of the open file ``fd``."""
    digest = hashlib.sha256()
    end = offset + length
    while offset < end:
        chunk = os.pread(fd, min(READ_STEP, end - offset), offset)
        if not chunk:
            break  # shorter than expected: the digest will not match
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


def describe(size: int, digests: list[str]) -> dict | None:
    """The ``pieces`` record of a file (None for a file of one piece: its sha256 says it)."""
    piece = PIECE_BYTES
    return {"size": piece, "sha256": digests} if size > piece else None


def check(entry: dict) -> None:
    """Raise ValueError when ``entry``'s pieces do not fit its size."""
    pieces = entry.get("pieces")
    if pieces is None:
        return
    if not isinstance(pieces, dict) or set(pieces) != {"size", "sha256"}:
        raise ValueError(f"{entry.get('path')}: pieces must be {{size, sha256}}")
    size, digests = pieces["size"], pieces["sha256"]
    if not isinstance(size, int) or size <= 0 or not isinstance(digests, list):
        raise ValueError(f"{entry.get('path')}: malformed pieces")
    if len(digests) != len(spans(int(entry["size"]), size)):
        raise ValueError(f"{entry.get('path')}: {len(digests)} pieces for {entry['size']} bytes")
    if not all(isinstance(d, str) and len(d) == 64 for d in digests):
        raise ValueError(f"{entry.get('path')}: a piece digest is not 64 hex digits")


def shared_progress(progress: Progress | None) -> Progress | None:
    """``progress`` made safe to call from several threads (tqdm's update is not)."""
    if progress is None:
        return None
    lock = threading.Lock()

    def update(count: int) -> None:
        with lock:
            progress(count)

    return update
