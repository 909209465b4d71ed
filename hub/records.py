"""How the registry reads its small records: manifests in three tiers, many records at once
through packs, and the records it wrote put into a pack.

A manifest is immutable and checked against its own name, version and digest whenever it
is read, so a copy of it never goes stale. Where one is found, first to last:

1. this process's memory (a long-lived Registry, the gateway's, reads each once);
2. this machine's copy of a remote store's manifest,
   ``$LORABAY_HOME/cache/manifests/<store id>/<key>``: a fresh process skips one GET per
   version (``hub list`` of 1,000 on S3);
3. the store: one GET, or for many at once the packs (``packs.read_many``: a few GETs)
   and a GET for each record no pack holds.

A copy is only as good as the version it describes: where the version may have been
removed (``hub rm``), the registry checks the store still has the manifest before it uses
one (``Registry._existing_manifest``) and drops the copies of one that is gone
(:meth:`ManifestRecords.forget`). Records this registry writes (a manifest, an alias
table) are noted and, when the operation ends, written as one small pack
(:meth:`ManifestRecords.pack_written`), so the next listing anywhere finds them without a
GET each.

    records = ManifestRecords(store)
    manifest = records.get("team/a", 3)                      # None when there is none
    manifests = records.many([("team/a", 1), ("team/a", 2)])
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Mapping
from pathlib import Path

from lorabay.hub import packs
from lorabay.hub.atomic import write_atomically
from lorabay.hub.errors import DamagedRecord
from lorabay.hub.keys import manifest_key
from lorabay.hub.manifest import Manifest
from lorabay.hub.settings import cache_dir
from lorabay.hub.store import ObjectInfo, Store

log = logging.getLogger("lorabay.hub")
BATCH_AFTER = 4  # manifests missing from memory and this machine before packs are read


def save_copy(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all; a failure only costs speed."""
    try:
        write_atomically(path, data)
    except OSError as error:
        log.debug("could not keep a copy of %s: %s", path, error)


class ManifestRecords:
    """The manifests of one store as this process reads them, and the packs it reads and
    writes. Thread-safe: the gateway shares one Registry across request threads."""

    def __init__(self, store: Store):
        self.store = store
        self._manifests: dict[tuple[str, int], Manifest] = {}  # immutable: kept forever
        self._unpacked: dict[str, bytes] = {}  # records written and not yet in a pack
        self._unpacked_lock = threading.Lock()
        self._packs = packs.PackCache()  # packs read so far (remote stores)

    # -- reading ---------------------------------------------------------------------
    def get(self, name: str, version: int) -> Manifest | None:
        """Version ``version`` of ``name`` from the first tier that has it; None if absent."""
        known = self.known(name, version)
        if known is not None:
            return known
        raw = self.store.read(manifest_key(name, version))
        return None if raw is None else self.accept(name, version, raw, keep=True)

    def known(self, name: str, version: int) -> Manifest | None:
        """The manifest from memory or this machine's copy, without asking the store."""
        return self._manifests.get((name, version)) or self._kept(name, version)

    def many(
        self, pairs: list[tuple[str, int]], listed: Mapping[str, ObjectInfo] | None = None
    ) -> list[Manifest]:
        """The manifests of ``pairs`` (absent ones left out), in order: from memory, this
        machine's copies, then all the others at once (``listed``: the LIST the caller made,
        whose etags tell which pack records still hold)."""
        missing = [p for p in pairs if self.known(*p) is None]
        if len(missing) > BATCH_AFTER:
            listed = listed or {}
            infos = [
                listed.get(manifest_key(*p)) or ObjectInfo(manifest_key(*p), 0, 0) for p in missing
            ]
            raws, fetched = self.read_many(infos)
            fetched = set(fetched)  # kept on this machine; a pack's are in the pack
            for pair, info in zip(missing, infos, strict=True):
                if info.key in raws:
                    self.accept(*pair, raws[info.key], keep=info.key in fetched)
        return [m for m in (self.get(*p) for p in pairs) if m is not None]

    def read_many(self, infos: list[ObjectInfo]) -> tuple[dict[str, bytes], list[str]]:
        """Any listed records (alias tables too) through the packs: see ``packs.read_many``."""
        workers = getattr(self.store, "concurrent_reads", 1)
        return packs.read_many(self.store, infos, workers, self._packs)

    def accept(self, name: str, version: int, raw: bytes, keep: bool) -> Manifest:
        """Check a manifest read from anywhere and remember it (and, with ``keep``, keep a
        copy on this machine); DamagedRecord when it is not version ``version`` of ``name``."""
        key = manifest_key(name, version)
        manifest = Manifest.from_json(raw, key)
        if (manifest.name, manifest.version) != (name, version):
            raise DamagedRecord(f"manifest {key}", f"it describes {manifest.ref}")
        local = self._copy_path(key) if keep else None
        if local is not None:
            save_copy(local, raw)
        self._manifests[(name, version)] = manifest
        return manifest

    def remember(self, manifest: Manifest) -> None:
        """A manifest this registry has just created."""
        self._manifests[(manifest.name, manifest.version)] = manifest

    def forget(self, name: str, version: int) -> None:
        """Drop this process's and this machine's copies of a manifest gone from the store."""
        self._manifests.pop((name, version), None)
        local = self._copy_path(manifest_key(name, version))
        if local is not None:
            local.unlink(missing_ok=True)

    def _kept(self, name: str, version: int) -> Manifest | None:
        """The copy this machine keeps of a remote store's manifest, if any."""
        local = self._copy_path(manifest_key(name, version))
        if local is None or not local.is_file():
            return None
        try:
            return self.accept(name, version, local.read_bytes(), keep=False)
        except (DamagedRecord, OSError) as error:  # this machine's copy, not the store's record
            log.warning("dropping a damaged local copy %s: %s", local, error)
            local.unlink(missing_ok=True)
            return None

    def _copy_path(self, key: str) -> Path | None:
        """Where a remote store's manifest is kept on this machine (None: a local store)."""
        if not getattr(self.store, "remote", False):
            return None
        store_id = hashlib.sha256(self.store.url.encode()).hexdigest()[:16]
        return cache_dir() / "manifests" / store_id / key

    # -- writing ---------------------------------------------------------------------
    def written(self, key: str, data: bytes) -> None:
        """Note a record just written, for the next pack (remote stores: packs.py)."""
        if getattr(self.store, "remote", False):
            with self._unpacked_lock:
                self._unpacked[key] = data

    def pack_written(self) -> None:
        """Put the records noted since the last call into one small pack."""
        with self._unpacked_lock:
            written, self._unpacked = self._unpacked, {}
        packs.note(self.store, written)

    def unpack_removed(self, keys: list[str]) -> None:
        """Rewrite the packs that still hold removed records without them (packs.forget)."""
        packs.forget(self.store, keys)
