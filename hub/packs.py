"""Packs: many small registry records read in one GET instead of one GET each.

``hub list`` of 1,000 adapters reads 1,000 manifests and up to 1,000 alias tables; on
S3 each is a GET (3 s here from a process that has none of them yet). So a reader that
had to fetch many records one by one writes what it read into one object,
``packs/<time-ns>-<random>.json``::

    {"objects": {"adapters/_/a/1.json": {"etag": "\"9b2c...\"", "data": "{...}"}, ...}}

and the next reader, on any machine, takes a record from a pack only when the LIST it
just made shows the same etag for that key (S3 lists each object's etag), else it GETs
it: a pack can be old, never stale. Where an etag is a plain MD5 (S3 and SeaweedFS for
objects put in one part) the data is checked against it; manifests are also checked
against their own digest by the caller. (A bucket whose etags are not the MD5 of the
content, SSE-KMS on AWS, fails that check: its packs are ignored and every record is
read by GET, correct but as slow as before.) The writer deletes the packs it merged, so
there are a few at most; losing a race (a pack deleted between LIST and GET) only
costs the GETs. Packs are for listing many records; ``resolve`` always reads the
record itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from lorabay.hub.store import ObjectInfo, Store

log = logging.getLogger("lorabay.hub")
PREFIX = "packs/"
WRITE_AFTER = 32  # records fetched one by one before a reader writes a pack
MERGE_AFTER = 4  # packs before a reader merges them even if it fetched little


def etag_holds(etag: str | None, data: bytes) -> bool:
    """Whether ``data`` can be the content with ``etag`` (checked where it is an MD5)."""
    if not etag:
        return False
    plain = etag.strip('"')
    if len(plain) == 32 and all(c in "0123456789abcdef" for c in plain):
        return hashlib.md5(data, usedforsecurity=False).hexdigest() == plain
    return True  # a multipart or server-specific etag: trusted as the LIST gave it


def read_packs(store: Store, packs: list[ObjectInfo], workers: int) -> dict[str, tuple[str, bytes]]:
    """Every record in ``packs``, newest pack last (so it wins): key -> (etag, data)."""
    packs = sorted(packs, key=lambda p: p.key)  # time-ns names: oldest first
    with ThreadPoolExecutor(max(1, min(workers, len(packs) or 1))) as pool:
        raws = list(pool.map(store.read, [p.key for p in packs]))
    records: dict[str, tuple[str, bytes]] = {}
    for info, raw in zip(packs, raws, strict=True):
        if raw is None:
            continue  # merged away meanwhile
        try:
            for key, record in json.loads(raw)["objects"].items():
                data = record["data"].encode()
                if etag_holds(record["etag"], data):
                    records[key] = (record["etag"], data)
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            log.warning("ignoring damaged pack %s: %s", info.key, error)
    return records


def read_many(
    store: Store, infos: list[ObjectInfo], workers: int
) -> tuple[dict[str, bytes], list[str]]:
    """The content of every listed key (absent ones left out), from packs where their etag
    still matches, else one GET each; and the keys that took a GET. Writes a pack when it
    had to GET many."""
    if not getattr(store, "remote", False) or not infos:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            raws = list(pool.map(store.read, [i.key for i in infos]))
        found = {i.key: raw for i, raw in zip(infos, raws, strict=True) if raw is not None}
        return found, list(found)
    try:
        packs = store.list(PREFIX)
        records = read_packs(store, packs, workers) if packs else {}
    except Exception as error:  # noqa: BLE001 - e.g. a policy that hides packs/: read by GET
        log.debug("not using packs: %s", error)
        packs, records = [], {}
    found: dict[str, bytes] = {}
    missing = []
    for info in infos:
        record = records.get(info.key)
        if record is not None and info.etag is not None and record[0] == info.etag:
            found[info.key] = record[1]
        else:
            missing.append(info.key)
    with ThreadPoolExecutor(max(1, min(workers, len(missing) or 1))) as pool:
        fetched = list(pool.map(store.read_tagged, missing))
    fetched_keys = []
    for key, tagged in zip(missing, fetched, strict=True):
        if tagged is not None:
            found[key] = tagged[0]
            records[key] = (tagged[1].strip('"'), tagged[0])
            fetched_keys.append(key)
    if len(fetched_keys) >= WRITE_AFTER or len(packs) > MERGE_AFTER:
        write_pack(store, records, packs)
    return found, fetched_keys


def write_pack(store: Store, records: dict[str, tuple[str, bytes]], merged: list[ObjectInfo]):
    """One pack with ``records``; then the packs it merged go. Failures only cost speed."""
    objects = {}
    for key, (etag, data) in records.items():
        try:
            objects[key] = {"etag": etag, "data": data.decode()}
        except UnicodeDecodeError:
            continue
    key = f"{PREFIX}{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json"
    try:
        store.create(key, json.dumps({"objects": objects}, separators=(",", ":")).encode())
        for old in merged:
            store.delete(old.key)
    except Exception as error:  # noqa: BLE001 - a pack is an optimisation, never a failure
        log.debug("could not write pack %s: %s", key, error)
