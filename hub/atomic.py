"""Writes a reader never sees half done: a temporary name beside the target, then a rename.

    write_atomically(path, text)            # a file, whole or not at all
    with replacing_folder(target) as tmp:   # a folder: fill tmp; when the block ends
        model.save_pretrained(tmp)          # without an error, tmp becomes target

Every writer gets a temporary name of its own (process id and a random part), so two
writers of one path never write into each other's temporary file: the last rename wins,
whole. The rename is ``os.replace`` on the same filesystem, the way huggingface_hub's
cache writes (STYLE.md 4).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temporary_sibling(path: Path) -> Path:
    """A name beside ``path`` that no other writer uses (hidden: a leading dot)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp")


def write_atomically(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (text as UTF-8) at ``path``: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@contextmanager
def replacing_folder(target: str | os.PathLike) -> Iterator[Path]:
    """A fresh temporary folder beside ``target`` to fill; when the block ends without an
    error it takes ``target``'s place (an earlier folder there is removed after the
    rename, never before), else it is removed. Created 0700, as ``mkdtemp`` makes it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = temporary_sibling(target)
            os.replace(target, old)  # a folder cannot be replaced in one rename
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
