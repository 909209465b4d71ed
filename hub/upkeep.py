"""Registry upkeep: ``verify`` (re-hash what is stored) and ``gc`` (remove what nothing uses).

Both read every manifest; ``gc`` refuses to run past a damaged one, since the blobs it
references could not be told from garbage.

Why gc never takes a blob a committed version needs, whatever pushes do meanwhile
---------------------------------------------------------------------------------
A blob is garbage when no manifest names it. Reading every manifest and then deleting
is not atomic: a push P may reuse a blob B that is unreferenced right now (left by a
killed push, or by a version ``hub rm`` removed), write its manifest M after gc read the
manifests, and look at B before gc deletes it. So the protocol has a second party:

gc, while it runs, holds a lease, the record ``leases/gc.json`` (created if absent;
taken over by compare-and-swap only once it has expired). It

1. lists the blobs, then reads every manifest (the references R);
2. publishes, by compare-and-swap on the lease, the phase ``deleting`` and the set D it
   will delete: the blobs older than the grace period, not in R, and not *spared* (below);
3. deletes D, and nothing else, each delete only while the lease is surely its own
   (renewed by a thread every ``LEASE_SECONDS / 4``, stopped when a renewal fails);
4. deletes the lease.

A push P, after creating its manifest M (the commit point) and before it returns:

a. reads the lease. No lease (or one expired by more than ``CLOCK_SLACK``): go to c.
   Phase ``marking``: add its blobs to the lease's ``spare`` list by compare-and-swap
   (re-read and retry on a conflict), then go to c. Phase ``deleting``: if D holds none
   of its blobs go to c, else wait until that lease is gone, then go to c;
b. (nothing else: a push never waits for a gc that will not delete its blobs);
c. checks that each of its blobs exists, and puts back any that does not.

Take any gc G and any blob B of a committed version P; G deletes B only if B is in D.

- P saw no lease at time t (after M). Either G took its lease after t, so G read the
  manifests after M existed and B is in R; or G's lease ended before t, so every delete
  of G came before P's check c, which sees B missing and puts it back.
- P added B to ``spare`` while G was marking. Both that write and G's publication of D
  are compare-and-swaps of one record: if P's came first, G built D from a record with B
  spared; if G's came first, P's failed and P re-read the lease in ``deleting``.
- P saw ``deleting`` with B not in D: G never deletes B.
- P saw B in D: P waits for G's lease to go, so G's deletes came first, and c puts B back.

A gc that dies mid-run stops deleting with it; its lease expires after
``LEASE_SECONDS`` and is then ignored by pushes (after ``CLOCK_SLACK`` more) and taken
over by the next gc. The one assumption: the machines' clocks, plus the time a delete
request takes to land, stay within ``CLOCK_SLACK`` + ``LEASE_SECONDS / 2``: a gc deletes
only while at least half its lease is left. No grace period is needed for safety
(``gc(grace_seconds=0)`` is safe); it spares blobs of pushes in flight a re-upload, and
a push that reuses a blob refreshes its age (``Store.touch``) for that reason.

``gc`` also finishes removals a killed ``hub rm`` left half done, moves events written by
older lorabay (``events/<time>-<id>.json``) under their name, and rewrites packs that
still hold manifests of removed versions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from lorabay.hub import faults, packs, pieces
from lorabay.hub.cache import blob_key
from lorabay.hub.errors import Conflict, LorabayError
from lorabay.hub.keys import manifest_key
from lorabay.hub.pieces import Progress
from lorabay.hub.store import PreconditionFailed, Store

log = logging.getLogger("lorabay.hub")

LEASE_KEY = "leases/gc.json"
LEASE_SECONDS = 120.0
CLOCK_SLACK = 60.0  # how far two machines' clocks (plus a request in flight) may disagree
WAIT_STEP = 0.05  # a push waiting for a gc that is deleting its blobs polls this often


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
    spared: list[str] = field(default_factory=list)  # unreferenced, but a push took them
    dry_run: bool = False

    def to_dict(self) -> dict:
        return dict(self.__dict__)


# -- the lease ------------------------------------------------------------------------


def read_lease(store: Store) -> tuple[dict, str] | None:
    """The lease record and its etag; None when absent. A damaged one reads as expired."""
    tagged = store.read_tagged(LEASE_KEY)
    if tagged is None:
        return None
    try:
        record = json.loads(tagged[0])
        if not isinstance(record, dict):
            raise ValueError("not an object")
        record["expires"] = float(record["expires"])
        record.setdefault("spare", [])
        record.setdefault("deleting", [])
    except (ValueError, KeyError, TypeError):
        record = {"expires": 0.0, "phase": "damaged", "spare": [], "deleting": []}
    return record, tagged[1]


def lease_expired(record: dict) -> bool:
    return time.time() > record["expires"] + CLOCK_SLACK


def encode(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True).encode()


class LeaseLost(Conflict):
    def __init__(self):
        super().__init__(
            "gc lost its lease (another gc took it over, or the store was unreachable too "
            "long) and stopped deleting",
            "run `lorabay hub gc` again",
        )


class GcLease:
    """The lease one gc holds while it runs (see the module docstring)."""

    def __init__(self, store: Store, record: dict, etag: str, written_at: float):
        self.store = store
        self.record = record
        self.etag = etag
        self.deadline = written_at + LEASE_SECONDS  # time.monotonic() of expiry, ours
        self.lost = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew_loop, daemon=True)
        self._renewer.start()

    @classmethod
    def acquire(cls, store: Store, who: str) -> GcLease:
        record = {
            "holder": uuid.uuid4().hex,
            "by": who,
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "phase": "marking",
            "spare": [],
            "deleting": [],
        }
        started = time.monotonic()
        record["expires"] = time.time() + LEASE_SECONDS
        current = read_lease(store)
        try:
            if current is None:
                etag = store.swap(LEASE_KEY, encode(record), None)
            elif lease_expired(current[0]):
                etag = store.swap(LEASE_KEY, encode(record), current[1])
            else:
                raise lease_held(current[0])
        except PreconditionFailed:
            again = read_lease(store)
            raise lease_held(again[0] if again else current[0] if current else {}) from None
        return cls(store, record, etag, started)

    def _write(self, change: Callable[[dict], None]) -> None:
        """Re-read the lease, check it is still ours, apply ``change``, compare-and-swap."""
        with self._lock:
            for _ in range(200):
                if self.lost:
                    raise LeaseLost()
                current = read_lease(self.store)
                if current is None or current[0].get("holder") != self.record["holder"]:
                    self.lost = True
                    raise LeaseLost()
                record = dict(current[0])
                change(record)
                started = time.monotonic()
                record["expires"] = time.time() + LEASE_SECONDS
                try:
                    self.etag = self.store.swap(LEASE_KEY, encode(record), current[1])
                except PreconditionFailed:
                    continue  # a push spared blobs meanwhile: read it again
                self.record, self.deadline = record, started + LEASE_SECONDS
                return
            raise LeaseLost()

    def _renew_loop(self) -> None:
        while not self._stop.wait(LEASE_SECONDS / 4):
            try:
                self._write(lambda record: None)
            except LorabayError as error:
                log.warning("gc could not renew its lease: %s", error)
                self.lost = True
                return
            except Exception as error:  # noqa: BLE001 - a store failure: stop deleting
                log.warning("gc could not renew its lease: %s", error)

    def publish(self, candidates: Iterable[str]) -> tuple[set[str], set[str]]:
        """Enter the deleting phase: the set gc will delete (candidates not spared by a
        push meanwhile) and the spared ones."""
        chosen: dict[str, set[str]] = {}

        def change(record: dict) -> None:
            spare = set(record.get("spare", []))
            chosen["delete"] = set(candidates) - spare
            chosen["spared"] = set(candidates) & spare
            record["phase"] = "deleting"
            record["deleting"] = sorted(chosen["delete"])

        self._write(change)
        return chosen["delete"], chosen["spared"]

    def check(self) -> None:
        """Raise LeaseLost unless at least half the lease is surely left (before a delete)."""
        if self.lost or self.deadline - time.monotonic() < LEASE_SECONDS / 2:
            self.lost = True
            raise LeaseLost()

    def release(self) -> None:
        self._stop.set()
        self._renewer.join()
        with self._lock:
            try:
                self.store.delete(LEASE_KEY, self.etag)
            except PreconditionFailed:
                pass  # taken over after it expired: not ours to delete
            except Exception as error:  # noqa: BLE001 - it expires by itself
                log.warning("could not release the gc lease: %s", error)


def lease_held(record: dict) -> Conflict:
    return Conflict(
        f"another gc is running (by {record.get('by', '?')}, since {record.get('started', '?')})",
        f"wait for it to finish; a lease left by a killed gc expires within "
        f"{int(LEASE_SECONDS + CLOCK_SLACK)} s",
    )


def protect_blobs(store: Store, files: list[tuple[str, Path]]) -> None:
    """A push's part of the protocol, after its manifest exists: make sure no running gc
    takes ``files`` (``(sha256, source)`` each), then put back any blob that is gone."""
    mine = {sha256 for sha256, _ in files}
    while True:  # ends: a live gc ends its lease, a dead one's expires
        current = read_lease(store)
        if current is None or lease_expired(current[0]):
            break
        record, etag = current
        if record.get("phase") == "marking":
            spared = {**record, "spare": sorted(set(record.get("spare", [])) | mine)}
            try:
                store.swap(LEASE_KEY, encode(spared), etag)
                break
            except PreconditionFailed:
                continue  # the gc renewed or moved on meanwhile: read it again
        if not mine & set(record.get("deleting", [])):
            break
        time.sleep(WAIT_STEP)  # that gc deletes one of our blobs: let it finish first
    faults.checkpoint("push:protected")
    for sha256, source in files:
        if not store.has(blob_key(sha256)):
            log.info("a gc took blob sha256:%s meanwhile; putting it back", sha256)
            store.put_file(blob_key(sha256), source, sha256)


# -- verify -----------------------------------------------------------------------------


def verify_registry(
    registry, ref: str | None = None, progress: Progress | None = None
) -> list[Problem]:
    """Re-hash the stored blobs (of ``ref``, or all); every mismatch, missing blob and
    damaged manifest (and, for the whole registry, every damaged event)."""
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
        for key, error in registry.damaged_events():
            problems.append(Problem("damaged", key, (), message=str(error)))
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


# -- gc ---------------------------------------------------------------------------------


def collect_garbage(registry, grace_seconds: float, dry_run: bool = False) -> GcReport:
    """Remove blobs no manifest references and leftovers of interrupted writes, when
    older than ``grace_seconds``; safe against concurrent pushes (module docstring)."""
    report = GcReport(dry_run=dry_run)
    if not registry.is_readable():
        return report
    store = registry.store
    from lorabay.hub.events import current_user

    lease = None if dry_run else GcLease.acquire(store, current_user())
    try:
        cutoff = time.time() - grace_seconds
        blobs = {i.key.rsplit("/", 1)[1]: i for i in store.list("blobs/sha256/")}
        faults.checkpoint("gc:listed")
        # Every manifest, yanked ones too (read in bulk: packs on S3); a damaged one raises
        # and aborts gc, since its blobs could not be told from garbage.
        referenced = {f["sha256"] for m in registry.list(include_yanked=True) for f in m.files}
        candidates = {s for s, i in blobs.items() if s not in referenced and i.mtime <= cutoff}
        faults.checkpoint("gc:marked")
        doomed, spared = lease.publish(candidates) if lease else (candidates, set())
        report.spared = sorted(f"sha256:{s}" for s in spared)
        for sha256 in sorted(doomed):
            report.blobs.append(f"sha256:{sha256}")
            report.bytes += blobs[sha256].size
            if lease:
                lease.check()
                store.delete(blob_key(sha256))
                faults.checkpoint("gc:deleted")
        for info in store.list_temporary():
            if info.mtime <= cutoff:
                report.temporary.append(info.key)
                if not dry_run:
                    store.delete_temporary(info.key)
        if not dry_run:
            move_legacy_events(store)
            packs.forget(store, finish_removals(store))
    finally:
        if lease:
            lease.release()
    return report


def finish_removals(store: Store) -> list[str]:
    """Delete what a killed ``hub rm`` left beside its tombstone (the manifest, the yanked
    flag: the tombstone already hides them); the manifest keys of every removed version."""
    listed = {info.key for info in store.list("adapters/")}
    removed = []
    for key in sorted(listed):
        if key.endswith(".removed"):
            stem = key.removesuffix(".removed")
            removed.append(f"{stem}.json")
            for leftover in (f"{stem}.json", f"{stem}.yanked"):
                if leftover in listed:
                    store.delete(leftover)
    return removed


def move_legacy_events(store: Store) -> int:
    """Events older lorabay wrote at ``events/<time>-<id>.json`` go under their name
    (``events/<ns>/<name>/``), where ``hub log NAME`` finds them; returns how many."""
    from lorabay.hub.keys import event_prefix
    from lorabay.hub.reference import validate_name

    moved = 0
    for info in store.list("events/"):
        if info.key.count("/") != 1:
            continue
        raw = store.read(info.key)
        if raw is None:
            continue
        try:
            name = validate_name(json.loads(raw)["name"])
            target = event_prefix(name) + info.key.rsplit("/", 1)[1]
        except (ValueError, KeyError, TypeError, LorabayError):
            log.warning("leaving event %s where it is: it names no adapter", info.key)
            continue
        store.create(target, raw)
        store.delete(info.key)
        moved += 1
    return moved
