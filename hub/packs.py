"""Packs: many small registry records read in one GET instead of one GET each.

``hub list`` of 1,000 adapters reads 1,000 manifests and up to 1,000 alias tables; on
S3 each is a GET (5 s here). So every record written to a remote store is also put in
a pack, ``packs/<time-ns>-<random>.json``::

    {"objects": {"adapters/_/a/1.json": {"etag": "9b2c...", "data": "{...}"}, ...}}

A push or an alias move writes a small pack of what it wrote; a reader that still had
to GET many records writes a pack of those. After writing, the writer merges the packs
of a size tier once four or more share it (as a log-structured merge tree does):
a registry of n records keeps O(log n) packs (3 to 5 after 1,000 pushes here) and each
record is rewritten O(log n) times in all, so a push pays two or three small requests
more and the first ``hub list`` anywhere reads the packs in one round of GETs.

A reader takes a record from a pack only when the LIST it just made shows the same
etag for that key (S3 lists each object's etag), else it GETs it: a pack can be old,
never stale. Where an etag is a plain MD5 (S3 and SeaweedFS for objects put in one
part) the data is checked against it; manifests are also checked against their own
digest by the caller. (A bucket whose etags are not the MD5 of the content, SSE-KMS on
AWS, never matches: every record is read by GET, correct but as slow as without packs.)
Merges race harmlessly: writers merging the same packs at once name the result after
its inputs, so only the first creates it. Packs are for listing many records;
``resolve`` always reads the record itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

from lorabay.hub.store import ObjectInfo, Store, md5_etag

log = logging.getLogger("lorabay.hub")
PREFIX = "packs/"
WRITE_AFTER = 32  # records a reader fetched one by one before it writes a pack of them
FANOUT = 4  # packs of one size tier merged into one
TIER_BYTES = 16 << 10  # packs up to this size are all in the smallest tier
TIDY_AFTER = 16  # packs a reader finds before it merges them (writers left them behind)

Records = dict[str, tuple[str, bytes]]  # key -> (etag, data)
_merging = threading.Lock()


def etag_holds(etag: str | None, data: bytes) -> bool:
    """Whether ``data`` can be the content with ``etag`` (checked where it is an MD5)."""
    if not etag:
        return False
    plain = etag.strip('"')
    if len(plain) == 32 and all(c in "0123456789abcdef" for c in plain):
        return md5_etag(data) == plain
    return True  # a multipart or server-specific etag: trusted as the LIST gave it


class PackCache:
    """Packs already read by this process, parsed and checked: key -> [(record key, etag,
    data)]. A pack is never rewritten under its key (created once, then only deleted), so
    a long-lived Registry (the gateway's ``/v1/models``) GETs only the packs new since."""

    def __init__(self):
        self._packs: dict[str, list[tuple[str, str, bytes]]] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> list[tuple[str, str, bytes]] | None:
        with self._lock:
            return self._packs.get(key)

    def put(self, key: str, records: list[tuple[str, str, bytes]]) -> None:
        with self._lock:
            self._packs[key] = records

    def keep_only(self, keys: set[str]) -> None:
        with self._lock:
            for gone in [key for key in self._packs if key not in keys]:
                del self._packs[gone]


def parse_pack(key: str, raw: bytes) -> list[tuple[str, str, bytes]]:
    """The records of one pack whose data fits their etag (none from a damaged pack)."""
    try:
        records = []
        for record_key, record in json.loads(raw)["objects"].items():
            data = record["data"].encode()
            if etag_holds(record["etag"], data):
                records.append((record_key, record["etag"], data))
        return records
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        log.warning("ignoring damaged pack %s: %s", key, error)
        return []


def read_packs(
    store: Store, packs: list[ObjectInfo], workers: int, cache: PackCache | None = None
) -> dict[str, dict[str, bytes]]:
    """Every record in ``packs``: key -> {etag: data}, each version a pack holds; packs in
    ``cache`` are not read again."""
    cache = cache or PackCache()
    packs = sorted(packs, key=lambda p: p.key)  # time-ns names: oldest first
    unread = [p.key for p in packs if cache.get(p.key) is None]
    with ThreadPoolExecutor(max(1, min(workers, len(unread) or 1))) as pool:
        raws = list(pool.map(store.read, unread))
    for key, raw in zip(unread, raws, strict=True):
        if raw is not None:  # None: merged away meanwhile
            cache.put(key, parse_pack(key, raw))
    cache.keep_only({p.key for p in packs})
    records: dict[str, dict[str, bytes]] = {}
    for pack in packs:
        for key, etag, data in cache.get(pack.key) or ():
            versions = records.setdefault(key, {})
            versions.pop(etag, None)  # re-inserted: the newest comes last
            versions[etag] = data
    return records


def read_many(
    store: Store, infos: list[ObjectInfo], workers: int, cache: PackCache | None = None
) -> tuple[dict[str, bytes], list[str]]:
    """The content of every listed key (absent ones left out), from packs where their etag
    still matches, else one GET each; and the keys that took a GET. Packs what it had to
    GET when that was many."""
    if not getattr(store, "remote", False) or not infos:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            raws = list(pool.map(store.read, [i.key for i in infos]))
        found = {i.key: raw for i, raw in zip(infos, raws, strict=True) if raw is not None}
        return found, list(found)
    try:
        packs = store.list(PREFIX)
        records = read_packs(store, packs, workers, cache) if packs else {}
    except Exception as error:  # noqa: BLE001 - e.g. a policy that hides packs/: read by GET
        log.debug("not using packs: %s", error)
        packs, records = [], {}
    found: dict[str, bytes] = {}
    missing = []
    for info in infos:
        data = records.get(info.key, {}).get(info.etag) if info.etag else None
        if data is not None:
            found[info.key] = data
        else:
            missing.append(info.key)
    with ThreadPoolExecutor(max(1, min(workers, len(missing) or 1))) as pool:
        fetched = list(pool.map(store.read_tagged, missing))
    new: Records = {}
    for key, tagged in zip(missing, fetched, strict=True):
        if tagged is not None:
            found[key] = tagged[0]
            new[key] = (tagged[1].strip('"'), tagged[0])
    if len(new) >= WRITE_AFTER or len(packs) > TIDY_AFTER:
        add(store, new if len(new) >= WRITE_AFTER else None, workers)
    return found, list(new)


def note(store: Store, written: Mapping[str, bytes]) -> None:
    """Pack records just written to a remote store (a push's manifest, an alias table)."""
    if getattr(store, "remote", False) and written:
        records = {key: (md5_etag(data), data) for key, data in written.items()}
        add(store, records, getattr(store, "concurrent_reads", 1))


def add(store: Store, records: Records | None, workers: int) -> None:
    """Write ``records`` (if any) as a new pack, then merge where a size tier is full
    (unless another thread of this process is merging: it will see this pack). Failures
    only cost speed: they are logged, never raised."""
    try:
        if records:
            key = f"{PREFIX}{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json"
            write_pack(store, records, key)
        if _merging.acquire(blocking=False):
            try:
                compact(store, workers)
            finally:
                _merging.release()
    except Exception as error:  # noqa: BLE001 - a pack is an optimisation, never a failure
        log.debug("could not update packs: %s", error)


def tier(size: int) -> int:
    return int(math.log(max(size, TIER_BYTES) / TIER_BYTES, FANOUT))


def compact(store: Store, workers: int) -> None:
    """Merge the packs of each size tier that holds ``FANOUT`` or more into one, smallest
    tier first (a merged pack may fill the next tier: up to a few rounds)."""
    for _ in range(8):
        tiers: dict[int, list[ObjectInfo]] = {}
        for info in store.list(PREFIX):
            tiers.setdefault(tier(info.size), []).append(info)
        full = [group for _, group in sorted(tiers.items()) if len(group) >= FANOUT]
        if not full:
            return
        group = sorted(full[0], key=lambda p: p.key)  # all of the tier: writers may outpace us
        # Named after its inputs (and their newest stamp, so a pack written meanwhile still
        # reads as newer): writers that merge the same group at once make one pack, not
        # several copies that would fill the next tier.
        newest = group[-1].key[len(PREFIX) :].split("-")[0]
        name = hashlib.sha256("".join(p.key for p in group).encode()).hexdigest()[:8]
        key = f"{PREFIX}{newest}-{name}.json"
        if not store.has(key):
            merged: Records = {}
            for record_key, versions in read_packs(store, group, workers).items():
                merged[record_key] = list(versions.items())[-1]  # the newest pack's version
            write_pack(store, merged, key)
        for old in group:
            store.delete(old.key)


def write_pack(store: Store, records: Records, key: str) -> None:
    objects = {}
    for record_key, (etag, data) in records.items():
        try:
            objects[record_key] = {"etag": etag, "data": data.decode()}
        except UnicodeDecodeError:
            continue
    store.create(key, json.dumps({"objects": objects}, separators=(",", ":")).encode())


def forget(store: Store, keys) -> int:
    """Rewrite the packs that still hold any of ``keys`` (manifests of removed versions)
    without them; returns how many were rewritten. Readers never take such a record (the
    LIST no longer shows its key), so this only stops a removed version's description and
    labels from lingering in packs. A merge racing with it may copy a record back into a
    new pack; the next gc drops it again. Failures only cost that: logged, never raised."""
    keys = set(keys)
    if not keys or not getattr(store, "remote", False):
        return 0
    rewritten = 0
    try:
        for info in store.list(PREFIX):
            raw = store.read(info.key)
            try:
                objects = json.loads(raw)["objects"] if raw is not None else {}
            except (ValueError, KeyError, TypeError):
                continue
            if not keys & set(objects):
                continue
            kept = {key: record for key, record in objects.items() if key not in keys}
            # The same time stamp, so the copy sorts where the original did (newest wins).
            stamp = info.key[len(PREFIX) :].split("-")[0]
            suffix = hashlib.sha256(info.key.encode()).hexdigest()[:8]
            if kept:
                data = json.dumps({"objects": kept}, separators=(",", ":")).encode()
                store.create(f"{PREFIX}{stamp}-{suffix}.json", data)
            store.delete(info.key)
            rewritten += 1
    except Exception as error:  # noqa: BLE001 - a pack is an optimisation, never a failure
        log.debug("could not rewrite packs: %s", error)
    return rewritten
