"""Registry upkeep: ``verify`` (re-hash what is stored) and ``gc`` (remove what nothing uses).

Both read every manifest; ``gc`` refuses to run past a damaged one, since the blobs it
references could not be told from garbage.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from lorabay.hub import pieces
from lorabay.hub.cache import blob_key
from lorabay.hub.errors import LorabayError
from lorabay.hub.keys import manifest_key

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Problem:
    """One thing ``verify`` found wrong."""

    kind: str  # "mismatch" | "missing" | "damaged"
    where: str  # the adapter file, or the store key of a damaged record
    refs: tuple[str, ...] = ()  # the versions that use it
    expected: str | None = None
    actual: str | None = None
    message: str = ""

    def to_dict(self) -> dict:
        return {**self.__dict__, "refs": list(self.refs)}


@dataclass
class GcReport:
    blobs: list[str] = field(default_factory=list)  # "sha256:<hex>" removed (or to remove)
    bytes: int = 0
    temporary: list[str] = field(default_factory=list)
    dry_run: bool = False

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def verify_registry(
    registry, ref: str | None = None, progress: Progress | None = None
) -> list[Problem]:
    """Re-hash the stored blobs (of ``ref``, or all); every mismatch, missing blob and
    damaged manifest."""
    problems: list[Problem] = []
    if ref is not None:
        named = registry.resolve(ref)
        manifests = [registry.read_stored_manifest(named.name, named.version)]
    else:
        manifests = []
        if not registry.is_readable():
            return []
        for name, state in sorted(registry.version_table(None).items()):
            for version in state.versions:
                try:
                    manifests.append(registry.read_stored_manifest(name, version))
                except LorabayError as error:
                    where = manifest_key(name, version)
                    problems.append(Problem("damaged", where, (), message=str(error)))
    users: dict[str, list[tuple[str, str]]] = {}
    for manifest in manifests:
        for entry in manifest.files:
            users.setdefault(entry["sha256"], []).append((manifest.ref, entry["path"]))
    progress = pieces.shared_progress(progress)

    def check(item: tuple[str, list[tuple[str, str]]]) -> Problem | None:
        sha256, uses = item
        refs = tuple(sorted({r for r, _ in uses}))
        where = ", ".join(sorted({p for _, p in uses}))
        digest = hashlib.sha256()
        try:
            for chunk in registry.store.read_chunks(blob_key(sha256)):
                digest.update(chunk)
                if progress:
                    progress(len(chunk))
        except FileNotFoundError:
            message = f"{where} ({', '.join(refs)}): blob sha256:{sha256} is missing"
            return Problem("missing", where, refs, f"sha256:{sha256}", None, message)
        if digest.hexdigest() == sha256:
            return None
        actual = f"sha256:{digest.hexdigest()}"
        message = (
            f"{where} ({', '.join(refs)}): expected sha256:{sha256}, stored content is {actual}"
        )
        return Problem("mismatch", where, refs, f"sha256:{sha256}", actual, message)

    # Blobs are checked at once: one per core, or as many as the store reads at once (S3).
    workers = max(pieces.hash_workers(), getattr(registry.store, "concurrent_reads", 1))
    with ThreadPoolExecutor(workers) as pool:
        problems += [p for p in pool.map(check, sorted(users.items())) if p is not None]
    return problems


def collect_garbage(registry, grace_seconds: float, dry_run: bool = False) -> GcReport:
    """Remove blobs no manifest references and leftovers of interrupted writes, when
    older than ``grace_seconds`` (so a push in flight keeps its fresh blobs)."""
    report = GcReport(dry_run=dry_run)
    if not registry.is_readable():
        return report
    # Every manifest, yanked ones too (read in bulk: packs on S3); a damaged one raises and
    # aborts gc, since its blobs could not be told from garbage.
    referenced = {f["sha256"] for m in registry.list(include_yanked=True) for f in m.files}
    cutoff = time.time() - grace_seconds
    for info in registry.store.list("blobs/sha256/"):
        sha256 = info.key.rsplit("/", 1)[1]
        if sha256 in referenced or info.mtime > cutoff:
            continue
        report.blobs.append(f"sha256:{sha256}")
        report.bytes += info.size
        if not dry_run:
            registry.store.delete(info.key)
    for info in registry.store.list_temporary():
        if info.mtime <= cutoff:
            report.temporary.append(info.key)
            if not dry_run:
                registry.store.delete_temporary(info.key)
    return report
