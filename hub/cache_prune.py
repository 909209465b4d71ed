"""Looking at and pruning the pull cache (``lorabay hub cache ls|prune``).

Each folder ``<digest-hex>/`` is one verified adapter; ``manifests/<store>/`` holds this
machine's copies of a remote store's manifests. Pruning takes a folder's use lock
exclusively without waiting (cache.py), so a folder any process holds is skipped, never
removed, and removes the rest least recently used first until the budget holds.

    scan = scan_cache(cache_dir())                       # what is there, oldest use first
    report = prune_cache(cache_dir(), budget=20 << 30)   # or digests=[...], or budget=0
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from lorabay.hub.cache import LOCKS, META, discard, hold, use_file
from lorabay.hub.errors import AdapterNotFound, ConfigError
from lorabay.hub.settings import cache_budget

MANIFESTS = "manifests"  # copies of remote manifests (registry.py), one folder per store
HEX_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class CachedAdapter:
    """One verified folder in the cache."""

    digest: str  # "sha256:<hex>"
    path: Path
    size: int
    last_used: float  # seconds since the epoch
    in_use: bool  # some process holds it (a pull, a gateway's loaded adapter)
    ref: str | None = None  # what it was last fetched as, and from where
    registry: str | None = None

    def to_dict(self) -> dict:
        return {**self.__dict__, "path": str(self.path)}


@dataclass
class ManifestCopies:
    """This machine's copies of one remote store's manifests (registry.py keeps them)."""

    path: Path
    files: int
    size: int
    last_used: float

    def to_dict(self) -> dict:
        return {**self.__dict__, "path": str(self.path)}


@dataclass
class CacheScan:
    folder: Path
    adapters: list[CachedAdapter] = field(default_factory=list)  # least recently used first
    manifests: list[ManifestCopies] = field(default_factory=list)
    budget: int | None = None

    @property
    def total(self) -> int:
        return sum(a.size for a in self.adapters) + sum(m.size for m in self.manifests)

    def to_dict(self) -> dict:
        return {
            "folder": str(self.folder),
            "budget": self.budget,
            "total": self.total,
            "adapters": [a.to_dict() for a in self.adapters],
            "manifests": [m.to_dict() for m in self.manifests],
        }


@dataclass
class PruneReport:
    removed: list[CachedAdapter] = field(default_factory=list)
    in_use: list[CachedAdapter] = field(default_factory=list)  # chosen, but held: kept
    manifests: list[ManifestCopies] = field(default_factory=list)
    freed: int = 0
    total: int = 0  # what the cache holds afterwards
    dry_run: bool = False

    def to_dict(self) -> dict:
        return {
            "removed": [a.to_dict() for a in self.removed],
            "in_use": [a.to_dict() for a in self.in_use],
            "manifests": [m.to_dict() for m in self.manifests],
            "freed": self.freed,
            "total": self.total,
            "dry_run": self.dry_run,
        }


def folder_bytes(folder: Path) -> tuple[int, int, float]:
    """(bytes, files, newest mtime) under ``folder``."""
    size = files = 0
    newest = 0.0
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                info = os.lstat(os.path.join(root, name))
            except FileNotFoundError:
                continue
            size, files, newest = size + info.st_size, files + 1, max(newest, info.st_mtime)
    return size, files, newest


def is_in_use(cache: Path, digest_hex: str) -> bool:
    fd = hold(cache, digest_hex, exclusive=True)
    if fd is None:
        return True
    os.close(fd)
    return False


def scan_cache(cache: Path) -> CacheScan:
    """Every adapter folder (least recently used first) and the manifest copies."""
    scan = CacheScan(cache, budget=cache_budget())
    if not cache.is_dir():
        return scan
    for entry in sorted(os.scandir(cache), key=lambda e: e.name):
        if not entry.is_dir(follow_symlinks=False) or not HEX_RE.match(entry.name):
            continue
        size, _, newest = folder_bytes(Path(entry.path))
        try:
            last_used = os.stat(use_file(cache, entry.name)).st_mtime
        except FileNotFoundError:
            last_used = newest or entry.stat().st_mtime
        source = read_source(cache, entry.name)
        scan.adapters.append(
            CachedAdapter(
                digest=f"sha256:{entry.name}",
                path=Path(entry.path),
                size=size,
                last_used=last_used,
                in_use=is_in_use(cache, entry.name),
                ref=source.get("ref"),
                registry=source.get("registry"),
            )
        )
    scan.adapters.sort(key=lambda a: a.last_used)
    manifests = cache / MANIFESTS
    if manifests.is_dir():
        for entry in sorted(os.scandir(manifests), key=lambda e: e.name):
            if entry.is_dir(follow_symlinks=False):
                size, files, newest = folder_bytes(Path(entry.path))
                scan.manifests.append(ManifestCopies(Path(entry.path), files, size, newest))
        scan.manifests.sort(key=lambda m: m.last_used)
    return scan


def read_source(cache: Path, digest_hex: str) -> dict:
    try:
        record = json.loads((cache / META / f"{digest_hex}.json").read_text())
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


def pick(scan: CacheScan, digests: Iterable[str]) -> list[CachedAdapter]:
    """The cached adapters named by ``digests`` (``sha256:<hex>``, the hex, or a prefix of
    it of 8 characters or more)."""
    chosen = []
    for text in digests:
        wanted = text.removeprefix("sha256:").lower()
        if len(wanted) < 8 or not re.fullmatch(r"[0-9a-f]+", wanted):
            raise ConfigError(
                f"{text!r} is not a digest", "give sha256:HEX or 8 or more of its hex digits"
            )
        found = [a for a in scan.adapters if a.digest[len("sha256:") :].startswith(wanted)]
        if not found:
            raise AdapterNotFound(text, "run `lorabay hub cache ls` to see what is cached")
        if len(found) > 1:
            raise ConfigError(f"{text!r} names {len(found)} cached adapters", "give more digits")
        chosen += [a for a in found if a not in chosen]
    return chosen


def prune_cache(
    cache: Path,
    *,
    budget: int | None = None,
    digests: Iterable[str] = (),
    dry_run: bool = False,
) -> PruneReport:
    """Remove the folders ``digests`` names, else the least recently used ones until the
    cache holds at most ``budget`` bytes (then manifest copies, if it still does not), and
    leftovers of killed pulls. A folder any process holds is never removed."""
    scan = scan_cache(cache)
    report = PruneReport(dry_run=dry_run)
    total = scan.total
    digests = list(digests)
    chosen = pick(scan, digests) if digests else list(scan.adapters)
    for adapter in chosen:
        if not digests and (budget is None or total <= budget):
            break
        hex_ = adapter.digest[len("sha256:") :]
        fd = None if adapter.in_use else hold(cache, hex_, exclusive=True)
        if fd is None:
            report.in_use.append(adapter)
            continue
        try:
            if not dry_run:
                discard(adapter.path)
                for leftover in (
                    cache / META / f"{hex_}.json",
                    cache / LOCKS / f"{hex_}.lock",
                    use_file(cache, hex_),  # last, while held: see hold()
                ):
                    leftover.unlink(missing_ok=True)
        finally:
            os.close(fd)
        report.removed.append(adapter)
        report.freed += adapter.size
        total -= adapter.size
    if not digests and budget is not None:
        for copies in scan.manifests:
            if total <= budget:
                break
            if not dry_run:
                discard(copies.path)
            report.manifests.append(copies)
            report.freed += copies.size
            total -= copies.size
    if not dry_run:
        remove_leftovers(cache)
    report.total = total
    return report


def remove_leftovers(cache: Path) -> None:
    """Folders a killed pull (``.tmp-<hex>-*``) or a killed removal (``.trash-*``) left."""
    if not cache.is_dir():
        return
    for entry in os.scandir(cache):
        if entry.name.startswith(".trash-"):
            shutil.rmtree(entry.path, ignore_errors=True)
        elif entry.name.startswith(".tmp-"):
            hex_ = entry.name[len(".tmp-") :].split("-", 1)[0]
            fd = hold(cache, hex_, exclusive=True) if HEX_RE.match(hex_) else None
            if fd is not None:  # nobody is pulling that adapter: the folder is dead
                try:
                    shutil.rmtree(entry.path, ignore_errors=True)
                finally:
                    os.close(fd)


def discard_unused(cache: Path, digest_hex: str) -> bool:
    """Remove one adapter's folder unless some process holds it (``hub rm``)."""
    if not (cache / digest_hex).is_dir():
        return False
    return bool(prune_cache(cache, digests=[digest_hex]).removed)
