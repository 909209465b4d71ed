"""The registry: versions, aliases, yanks, the event log, pull, verify and gc.

Written once against the small ``store.Store`` interface, so ``file://`` and
``s3://`` registries behave the same.

    from lorabay.hub import Registry
    reg = Registry.open("file:///tmp/reg")          # or s3://bucket/prefix, or None
    m = reg.push("./my-adapter", "team/summarize", aliases=["prod"])
    path = reg.pull("team/summarize:prod")

A registry that does not exist yet is created by the first push. Opening one
never writes; reading a missing one raises RegistryUnavailable, except the
default registry (``$LORABAY_HOME/registry``), which reads as empty until then.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import os
import random
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from lorabay.hub import faults, packs
from lorabay.hub.cache import PullStats, blob_key, copy_out, pull_into_cache
from lorabay.hub.content import find_base, scan_adapter
from lorabay.hub.errors import (
    AdapterNotFound,
    ConfigError,
    Conflict,
    DamagedRecord,
    IncompatibleBase,
    RegistryUnavailable,
    YankedVersion,
)
from lorabay.hub.keys import (
    alias_key,
    manifest_key,
    name_from_alias_key,
    name_from_prefix,
    name_prefix,
)
from lorabay.hub.manifest import KINDS, LINEAGE_KEYS, Manifest, empty_lineage
from lorabay.hub.reference import (
    LATEST,
    Reference,
    parse_reference,
    validate_alias,
    validate_digest,
    validate_name,
)
from lorabay.hub.settings import cache_dir, default_registry_url
from lorabay.hub.store import ObjectInfo, PreconditionFailed, Store, open_store
from lorabay.hub.upkeep import GcReport, Problem, collect_garbage, verify_registry

log = logging.getLogger("lorabay.hub")
Progress = Callable[[int], None]
CAS_ATTEMPTS = 200


class YankedWarning(UserWarning):
    """Pulling a yanked version: allowed by exact version or digest, but said out loud."""


@dataclass
class NameState:
    """What one listing of ``adapters/<name>/`` says: versions, yanked ones, aliases file."""

    versions: list[int] = field(default_factory=list)
    yanked: set[int] = field(default_factory=set)

    @property
    def latest(self) -> int | None:
        live = [v for v in self.versions if v not in self.yanked]
        return max(live) if live else None


def states_of(infos: Iterable[ObjectInfo]) -> dict[str, NameState]:
    """Versions and yanked flags per name, from a listing of ``adapters/``."""
    states: dict[str, NameState] = {}
    for info in infos:
        key_name, leaf = name_from_prefix(info.key)
        stem, _, suffix = leaf.partition(".")
        state = states.setdefault(key_name, NameState())
        if stem.isdigit() and suffix == "json":
            state.versions.append(int(stem))
        elif stem.isdigit() and suffix == "yanked":
            state.yanked.add(int(stem))
    return states


def parse_alias_table(raw: bytes, key: str) -> dict[str, int]:
    try:
        table = json.loads(raw)
        if not isinstance(table, dict):
            raise ValueError("not a JSON object")
        return {str(k): int(v) for k, v in table.items()}
    except (ValueError, TypeError) as error:
        raise DamagedRecord(f"alias table {key}", str(error)) from None


def save_copy(path: Path, data: bytes) -> None:
    """Write ``path`` atomically (temporary name, then rename); a failure only costs speed."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as error:
        log.debug("could not keep a copy of %s: %s", path, error)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def current_user() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def check_push_options(
    name: str, aliases: Iterable[str], kind: str, labels: Mapping, lineage: Mapping | None
) -> tuple[list[str], dict, dict]:
    validate_name(name)
    aliases = list(aliases)
    for alias in aliases:
        validate_alias(alias, f"{name}:{alias}")
        if alias == LATEST:
            raise ConfigError(
                "'latest' is implicit (the highest version not yanked)", "pick another alias"
            )
    problems = []
    if kind not in KINDS:
        problems.append(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    if not isinstance(labels, Mapping) or not all(
        isinstance(k, str) and k and isinstance(v, str) for k, v in labels.items()
    ):
        problems.append("labels must map non-empty strings to strings (--label key=value)")
    merged = empty_lineage()
    if lineage is not None:
        unknown = sorted(set(lineage) - set(LINEAGE_KEYS))
        if unknown:
            problems.append(f"unknown lineage fields {unknown} (known: {', '.join(LINEAGE_KEYS)})")
        merged.update({k: v for k, v in lineage.items() if k in LINEAGE_KEYS})
        if merged.get("parent_digest"):
            validate_digest(merged["parent_digest"], "lineage.parent_digest")
        for key in ("hyperparameters", "metrics"):
            merged[key] = dict(merged.get(key) or {})
        try:
            json.dumps(merged, allow_nan=False)
        except (TypeError, ValueError) as error:
            problems.append(f"lineage is not plain JSON ({error})")
    if problems:
        raise ConfigError(problems, "fix the push options")
    return aliases, dict(labels), merged


class Registry:
    """A registry of versioned, verified adapters on one store."""

    def __init__(self, store: Store, *, missing_is_empty: bool = False):
        self.store = store
        self.url = store.url
        self.missing_is_empty = missing_is_empty
        self.pull_stats = PullStats()
        self.last_push_created = False  # whether the last push made a new version
        self._manifests: dict[tuple[str, int], Manifest] = {}  # immutable: cached forever
        self._unpacked: dict[str, bytes] = {}  # records written and not yet in a pack
        self._unpacked_lock = threading.Lock()
        self._packs = packs.PackCache()  # packs read so far (remote stores)

    # -- opening ---------------------------------------------------------------------
    @classmethod
    def open(cls, url: str | None = None) -> Registry:
        """Open ``file://DIR`` or ``s3://BUCKET/PREFIX`` (None: ``$LORABAY_REGISTRY``, else
        ``file://$LORABAY_HOME/registry``). Raises RegistryUnavailable when the store cannot
        be reached or is something else; a registry not created yet opens (nothing is
        written) and is created by the first push."""
        default = default_registry_url()
        store = open_store(url or default)
        store.check_reachable()
        return cls(store, missing_is_empty=url is None or url == default)

    def __repr__(self) -> str:
        return f"Registry({self.url!r})"

    def is_readable(self) -> bool:
        """True when there is a registry to read; False for the default one before its first
        push; RegistryUnavailable for any other registry that does not exist yet."""
        if self.store.exists():
            return True
        if self.missing_is_empty:
            return False
        error = RegistryUnavailable(self.url, "there is no registry here yet")
        error.hint = "push an adapter to create it, or fix --registry / LORABAY_REGISTRY"
        raise error

    # -- reading ---------------------------------------------------------------------
    def _state(self, name: str) -> NameState:
        state = self.version_table(name).get(name, NameState())
        state.versions.sort()
        return state

    def load_manifest(self, name: str, version: int) -> Manifest | None:
        """Version ``version`` of ``name`` (None if absent), cached: manifests never change."""
        cached = self._manifests.get((name, version)) or self._kept_manifest(name, version)
        if cached is not None:
            return cached
        key = manifest_key(name, version)
        raw = self.store.read(key)
        return None if raw is None else self._accept_manifest(name, version, raw, keep=True)

    def _kept_manifest(self, name: str, version: int) -> Manifest | None:
        """The copy this machine keeps of a remote store's manifest, if any."""
        local = self._manifest_copy(manifest_key(name, version))
        if local is None or not local.is_file():
            return None
        try:
            return self._accept_manifest(name, version, local.read_bytes(), keep=False)
        except (DamagedRecord, OSError) as error:  # this machine's copy, not the store's record
            log.warning("dropping a damaged local copy %s: %s", local, error)
            local.unlink(missing_ok=True)
            return None

    def _accept_manifest(self, name: str, version: int, raw: bytes, keep: bool) -> Manifest:
        """Check a manifest read from anywhere, remember it (and keep a copy if asked)."""
        key = manifest_key(name, version)
        manifest = Manifest.from_json(raw, key)
        if (manifest.name, manifest.version) != (name, version):
            raise DamagedRecord(f"manifest {key}", f"it describes {manifest.ref}")
        local = self._manifest_copy(key) if keep else None
        if local is not None:
            save_copy(local, raw)
        self._manifests[(name, version)] = manifest
        return manifest

    def read_stored_manifest(self, name: str, version: int) -> Manifest:
        """The manifest as the store holds it now (verify: no cached copy may hide damage)."""
        key = manifest_key(name, version)
        raw = self.store.read(key)
        if raw is None:
            raise DamagedRecord(f"manifest {key}", "it disappeared")
        return Manifest.from_json(raw, key)

    def _manifest_copy(self, key: str) -> Path | None:
        """Where a remote store's manifest is kept on this machine. Manifests are immutable
        and checked against their own digest when read, so a copy never goes stale; it
        spares a fresh process one GET per version (``list`` of 1,000 on S3)."""
        if not getattr(self.store, "remote", False):
            return None
        store_id = hashlib.sha256(self.url.encode()).hexdigest()[:16]
        return cache_dir() / "manifests" / store_id / key

    def _manifests_of(
        self, pairs: list[tuple[str, int]], listed: Mapping[str, ObjectInfo] | None = None
    ) -> list[Manifest]:
        """The manifests of ``pairs`` (absent ones left out): from memory, this machine's
        copies, then all the others at once (``packs.read_many``: a few GETs on S3)."""
        missing = [p for p in pairs if p not in self._manifests and self._kept_manifest(*p) is None]
        if len(missing) > 4:
            listed = listed or {}
            infos = [
                listed.get(manifest_key(*p)) or ObjectInfo(manifest_key(*p), 0, 0) for p in missing
            ]
            workers = getattr(self.store, "concurrent_reads", 1)
            raws, fetched = packs.read_many(self.store, infos, workers, self._packs)
            fetched = set(fetched)  # kept on this machine; a pack's are in the pack
            for pair, info in zip(missing, infos, strict=True):
                if info.key in raws:
                    self._accept_manifest(*pair, raws[info.key], keep=info.key in fetched)
        return [m for m in (self.load_manifest(*p) for p in pairs) if m is not None]

    def _read_aliases(self, name: str) -> tuple[dict[str, int], str | None]:
        key = alias_key(name)
        tagged = self.store.read_tagged(key)
        if tagged is None:
            return {}, None
        return parse_alias_table(tagged[0], key), tagged[1]

    def alias_tables(self, names: Iterable[str] | None = None) -> dict[str, dict[str, int]]:
        """The alias table of each of ``names`` (None: every name), read all at once: one LIST
        and, on S3, the packs plus a GET per table changed since (``packs.py``)."""
        if not self.is_readable():
            return {}
        listed = {name_from_alias_key(i.key): i for i in self.store.list("aliases/")}
        wanted = sorted(listed) if names is None else sorted(set(names) & set(listed))
        workers = getattr(self.store, "concurrent_reads", 1)
        raws, _ = packs.read_many(self.store, [listed[n] for n in wanted], workers, self._packs)
        tables = {n: {} for n in ([] if names is None else names)}
        for name in wanted:
            raw = raws.get(listed[name].key)
            if raw is not None:
                tables[name] = dict(sorted(parse_alias_table(raw, listed[name].key).items()))
        return tables

    def resolve(self, ref: str | Reference) -> Manifest:
        """The manifest ``ref`` names: ``name``, ``name:3``, ``name:alias``, ``name@sha256:hex``."""
        parsed = ref if isinstance(ref, Reference) else parse_reference(ref)
        shown = str(ref)
        if not self.is_readable():
            raise AdapterNotFound(shown, "the registry is empty; push an adapter first")
        name = parsed.name
        if parsed.version is not None:
            manifest = self.load_manifest(name, parsed.version)
            if manifest is None:
                raise AdapterNotFound(shown, f"run `lorabay hub list {name}` to see its versions")
            return manifest
        if parsed.digest is not None:
            state = self._state(name)
            for manifest in self._manifests_of([(name, v) for v in state.versions]):
                if manifest.digest == parsed.digest:
                    return manifest
            raise AdapterNotFound(shown, f"run `lorabay hub list {name}` to see its digests")
        if parsed.is_latest:
            state = self._state(name)
            if state.latest is None:
                hint = (
                    f"every version is yanked; pull one by number or undo a yank "
                    f"(`lorabay hub list {name} --all`)"
                    if state.versions
                    else "run `lorabay hub list` to see what exists"
                )
                raise AdapterNotFound(shown, hint)
            return self.load_manifest(name, state.latest)
        table, _ = self._read_aliases(name)
        if parsed.alias not in table:
            raise AdapterNotFound(shown, f"run `lorabay hub show {name}` to see its aliases")
        manifest = self.load_manifest(name, table[parsed.alias])
        if manifest is None:
            raise DamagedRecord(shown, f"the alias points to missing version {table[parsed.alias]}")
        return manifest

    def _as_manifest(self, ref_or_manifest: str | Manifest) -> Manifest:
        return (
            ref_or_manifest
            if isinstance(ref_or_manifest, Manifest)
            else self.resolve(ref_or_manifest)
        )

    def is_yanked(self, ref_or_manifest: str | Manifest) -> bool:
        manifest = self._as_manifest(ref_or_manifest)
        return self.store.has(f"{name_prefix(manifest.name)}{manifest.version}.yanked")

    def names(self) -> list[str]:
        if not self.is_readable():
            return []
        return sorted({name_from_prefix(i.key)[0] for i in self.store.list("adapters/")})

    def version_table(self, name: str | None) -> dict[str, NameState]:
        """Versions and yanked flags per name (of ``name``, or of all), from one listing."""
        return states_of(self.store.list(name_prefix(name) if name else "adapters/"))

    def list(self, name: str | None = None, include_yanked: bool = False) -> list[Manifest]:
        """Every version (of ``name``), oldest first per name; yanked ones only if asked."""
        if name is not None:
            validate_name(name)
        if not self.is_readable():
            return []
        listed = {i.key: i for i in self.store.list(name_prefix(name) if name else "adapters/")}
        pairs = [
            (n, v)
            for n, state in sorted(states_of(listed.values()).items())
            for v in sorted(state.versions)
            if include_yanked or v not in state.yanked
        ]
        return self._manifests_of(pairs, listed)

    def yanked_versions(self, name: str) -> set[int]:
        validate_name(name)
        return self._state(name).yanked if self.is_readable() else set()

    def aliases(self, name: str) -> dict[str, int]:
        validate_name(name)
        if not self.is_readable():
            return {}
        return dict(sorted(self._read_aliases(name)[0].items()))

    def events(self, name: str | None = None) -> list[dict]:
        """The event log, oldest first: pushed, aliased, unaliased, yanked, unyanked."""
        if not self.is_readable():
            return []
        keys = sorted(i.key for i in self.store.list("events/"))
        workers = getattr(self.store, "concurrent_reads", 1)
        with ThreadPoolExecutor(max(1, workers)) as pool:
            raws = list(pool.map(self.store.read, keys))
        events = [json.loads(raw) for raw in raws if raw is not None]
        return [e for e in events if name is None or e.get("name") == name]

    # -- writing ---------------------------------------------------------------------
    def _log(self, event: str, **facts) -> None:
        record = {"event": event, "at": now_iso(), "by": current_user(), **facts}
        key = f"events/{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.json"
        self.store.create(key, json.dumps(record, sort_keys=True).encode())

    def _ensure_created(self) -> None:
        self.store.check_reachable()
        self.store.initialize()

    def push(
        self,
        folder: str | os.PathLike,
        name: str,
        *,
        aliases: Iterable[str] = (),
        description: str = "",
        labels: Mapping[str, str] | None = None,
        base: str | os.PathLike | None = None,
        lineage: Mapping | None = None,
        kind: str = "lora",
        progress: Progress | None = None,
    ) -> Manifest:
        """Check ``folder`` completely, then store it as the next version of ``name``.

        Content identical to an existing version of ``name`` returns that version and
        creates nothing (the aliases still move to it). Nothing is written before every
        check has passed.
        """
        aliases, labels, lineage = check_push_options(name, aliases, kind, labels or {}, lineage)
        content = scan_adapter(folder, progress=progress)
        self.last_push_created = False
        base_record = find_base(content.config, base)
        if base is not None:
            from lorabay.hub.compat import check_content_against_base

            reasons = check_content_against_base(content, base)
            if reasons:
                raise IncompatibleBase(name, str(base), reasons)
        self._ensure_created()
        digest = content.digest
        existing = self._find_digest(name, digest)
        if existing is not None:
            log.info("%s already holds this content as %s", name, existing.ref)
            for alias in aliases:
                self.set_alias(name, alias, existing.version)
            return existing

        for index, f in enumerate(content.files):
            self.store.put_file(blob_key(f.sha256), f.source, f.sha256)
            if index == 0:
                faults.checkpoint("push:blob")
        faults.checkpoint("push:blobs")

        manifest = None
        for _ in range(CAS_ATTEMPTS):
            state = self._state(name)
            # A concurrent push of the same content may have won meanwhile.
            existing = self._find_digest(name, digest, state)
            if existing is not None:
                manifest = existing
                break
            candidate = Manifest(
                name=name,
                version=(state.versions[-1] if state.versions else 0) + 1,
                digest=digest,
                files=[f.entry() for f in content.files],
                peft=content.peft(),
                base=base_record,
                lineage=lineage,
                kind=kind,
                created_at=now_iso(),
                created_by=current_user(),
                description=description,
                labels=labels,
            )
            key = manifest_key(name, candidate.version)
            if self.store.create(key, candidate.to_json()):
                self._written(key, candidate.to_json())
                manifest = candidate
                self.last_push_created = True
                self._manifests[(name, candidate.version)] = candidate
                faults.checkpoint("push:manifest")
                # A gc that ran between the blob writes and the manifest may have taken a
                # blob that already existed (and was unreferenced): put it back.
                for f in content.files:
                    if not self.store.has(blob_key(f.sha256)):
                        self.store.put_file(blob_key(f.sha256), f.source, f.sha256)
                self._log("pushed", name=name, version=candidate.version, digest=digest)
                break
            time.sleep(random.uniform(0, 0.01))
        if manifest is None:
            raise Conflict(
                f"could not create a version of {name} after {CAS_ATTEMPTS} attempts",
                "too many concurrent pushes; try again",
            )
        for alias in aliases:
            self.set_alias(name, alias, manifest.version)
        self._pack_written()
        return manifest

    def _find_digest(
        self, name: str, digest: str, state: NameState | None = None
    ) -> Manifest | None:
        state = state or self._state(name)
        for manifest in self._manifests_of([(name, v) for v in state.versions]):
            if manifest.digest == digest:
                return manifest
        return None

    def _move_alias(self, name: str, alias: str, version: int | None) -> int | None:
        """Compare-and-swap the alias table; returns the previous version of ``alias``."""
        key = alias_key(name)
        for attempt in range(CAS_ATTEMPTS):
            table, etag = self._read_aliases(name)
            previous = table.get(alias)
            if version is None:
                if previous is None:
                    raise AdapterNotFound(
                        f"{name}:{alias}", f"run `lorabay hub show {name}` to see its aliases"
                    )
                table.pop(alias)
            else:
                table[alias] = version
            data = json.dumps(table, sort_keys=True).encode()
            try:
                self.store.swap(key, data, etag)
                self._written(key, data)
                return previous
            except PreconditionFailed:
                # Another writer moved an alias of this name: re-read and retry, with a
                # growing random backoff so 8 writers do not keep colliding.
                time.sleep(random.uniform(0, min(0.2, 0.005 * (attempt + 1))))
        raise Conflict(
            f"could not move {name}:{alias} after {CAS_ATTEMPTS} attempts",
            "too many concurrent alias moves; try again",
        )

    def set_alias(self, name: str, alias: str, version: int) -> None:
        """Point ``name:alias`` at ``version`` (compare-and-swap, logged)."""
        validate_name(name)
        validate_alias(alias, f"{name}:{alias}")
        if alias == LATEST:
            raise ConfigError("'latest' is implicit and cannot be set", "pick another alias")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ConfigError(f"version {version!r} is not a whole number from 1")
        self._readable_or_raise(f"{name}:{version}")
        if self.load_manifest(name, version) is None:
            raise AdapterNotFound(f"{name}:{version}", f"run `lorabay hub list {name}`")
        if self.is_yanked(self.load_manifest(name, version)):
            raise YankedVersion(f"{name}:{version}")
        previous = self._move_alias(name, alias, version)
        self._log("aliased", name=name, alias=alias, version=version, previous=previous)
        self._pack_written()

    def remove_alias(self, name: str, alias: str) -> None:
        validate_name(name)
        validate_alias(alias, f"{name}:{alias}")
        self._readable_or_raise(f"{name}:{alias}")
        previous = self._move_alias(name, alias, None)
        self._log("unaliased", name=name, alias=alias, previous=previous)
        self._pack_written()

    def _written(self, key: str, data: bytes) -> None:
        """Remember a record just written, for the next pack (remote stores: packs.py)."""
        if getattr(self.store, "remote", False):
            with self._unpacked_lock:
                self._unpacked[key] = data

    def _pack_written(self) -> None:
        """Put the records this registry wrote into one small pack, so the next ``list``
        anywhere finds them without a GET each."""
        with self._unpacked_lock:
            written, self._unpacked = self._unpacked, {}
        packs.note(self.store, written)

    def _readable_or_raise(self, shown: str) -> None:
        if not self.is_readable():
            raise AdapterNotFound(shown, "the registry is empty; push an adapter first")

    def yank(self, ref: str, undo: bool = False, reason: str = "") -> Manifest:
        """Hide a version from ``latest`` and ``list`` (still pullable by version or digest)."""
        manifest = self.resolve(ref)
        key = f"{name_prefix(manifest.name)}{manifest.version}.yanked"
        if undo:
            self.store.delete(key)
        else:
            record = {"at": now_iso(), "by": current_user(), "reason": reason}
            self.store.create(key, json.dumps(record).encode())
        self._log(
            "unyanked" if undo else "yanked",
            name=manifest.name,
            version=manifest.version,
            digest=manifest.digest,
            reason=reason,
        )
        return manifest

    # -- pulling ---------------------------------------------------------------------
    def pull(
        self,
        ref_or_manifest: str | Manifest,
        to: str | os.PathLike | None = None,
        *,
        progress: Progress | None = None,
    ) -> Path:
        """A verified local folder with the adapter's files (cached by digest)."""
        manifest = self._as_manifest(ref_or_manifest)
        if self.is_yanked(manifest):
            warnings.warn(
                f"{manifest.ref} is yanked; pulled because it was named exactly",
                YankedWarning,
                stacklevel=2,
            )
        path = pull_into_cache(self.store, manifest, cache_dir(), self.pull_stats, progress)
        return copy_out(path, Path(to)) if to is not None else path

    # -- upkeep ----------------------------------------------------------------------
    def verify(self, ref: str | None = None, progress: Progress | None = None) -> list[Problem]:
        """Re-hash the stored blobs (of ``ref``, or all): every mismatch, missing blob and
        damaged manifest (see ``upkeep.verify_registry``)."""
        return verify_registry(self, ref, progress)

    def gc(self, grace_seconds: float, dry_run: bool = False) -> GcReport:
        """Remove unreferenced blobs and leftovers older than ``grace_seconds``
        (see ``upkeep.collect_garbage``)."""
        return collect_garbage(self, grace_seconds, dry_run)

    def check(
        self,
        ref_or_manifest: str | Manifest,
        base_path: str | os.PathLike,
        max_rank: int | None = None,
    ) -> list[str]:
        """Every reason the adapter does not fit the base at ``base_path``; [] when it fits."""
        from lorabay.hub.compat import check_manifest_against_base

        manifest = self._as_manifest(ref_or_manifest)
        folder = self.pull(manifest)
        return check_manifest_against_base(manifest, folder, base_path, max_rank)
