"""The registry: versions, aliases, yanks, the event log, pull, verify and gc.

Written once against the small ``store.Store`` interface, so ``file://``, ``s3://`` and
``oci://`` registries behave the same. How manifests are found (memory, this machine's
copies, the store, packs) is ``records.py``; blobs and the pull cache, ``cache.py``.

    from lorabay.hub import Registry
    reg = Registry.open("file:///tmp/reg")          # or s3://bucket/prefix, or None
    m = reg.push("./my-adapter", "team/summarize", aliases=["prod"]).manifest
    path = reg.pull("team/summarize:prod")      # verified, cached by digest
    with reg.lease("team/summarize:prod") as held:   # the same, and no prune removes it
        use(held.path)                                # until the block ends
    reg.yank("team/summarize:1").changed         # False: it was yanked already
    reg.remove("team/summarize:1")               # gone; `hub gc` frees its blobs

A registry that does not exist yet is created by the first push. Opening one
never writes; reading a missing one raises RegistryUnavailable, except the
default registry (``$LORABAY_HOME/registry``), which reads as empty until then.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
import unicodedata
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lorabay.hub import faults
from lorabay.hub.base_config import find_base
from lorabay.hub.cache import CacheLease, PullStats, blob_key, copy_out, pull_into_cache
from lorabay.hub.cache_prune import discard_unused
from lorabay.hub.content import scan_adapter
from lorabay.hub.errors import (
    AdapterNotFound,
    ConfigError,
    Conflict,
    DamagedRecord,
    IncompatibleBase,
    LorabayError,
    RegistryUnavailable,
    VersionAliased,
    YankedVersion,
)
from lorabay.hub.events import current_user, damaged_events, now_iso, read_events, write_event
from lorabay.hub.keys import (
    alias_key,
    manifest_key,
    name_from_alias_key,
    name_from_prefix,
    name_prefix,
    removed_key,
    yanked_key,
)
from lorabay.hub.manifest import KINDS, LINEAGE_KEYS, Manifest, empty_lineage
from lorabay.hub.pieces import Progress
from lorabay.hub.records import ManifestRecords
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
from lorabay.hub.upkeep import (
    GcReport,
    Problem,
    collect_garbage,
    protect_blobs,
    verify_registry,
)

log = logging.getLogger("lorabay.hub")
CAS_ATTEMPTS = 200


class YankedWarning(UserWarning):
    """Pulling a yanked version: allowed by exact version or digest, but said out loud."""


MAX_VERSION = 10**15  # as reference.MAX_VERSION_DIGITS allows


@dataclass(frozen=True)
class Pushed:
    """What a push did: the version it names, and whether it made it."""

    manifest: Manifest
    created: bool  # False: the content was this version already; no version was written


@dataclass(frozen=True)
class Change:
    """What a yank or an un-yank did."""

    manifest: Manifest
    changed: bool  # False: it was so already; nothing was written or logged


@dataclass(frozen=True)
class Removed:
    """What ``remove`` did: the version gone, and where its aliases point now (None: gone)."""

    manifest: Manifest
    aliases: dict[str, int | None] = field(default_factory=dict)


@dataclass
class NameState:
    """What one listing of ``adapters/<name>/`` says: versions, yanked and removed ones."""

    versions: list[int] = field(default_factory=list)
    yanked: set[int] = field(default_factory=set)
    removed: set[int] = field(default_factory=set)  # numbers `hub rm` left taken

    @property
    def latest(self) -> int | None:
        live = [v for v in self.versions if v not in self.yanked]
        return max(live) if live else None

    @property
    def next_version(self) -> int:
        return max([0, *self.versions, *self.removed]) + 1


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
        elif stem.isdigit() and suffix == "removed":
            state.removed.add(int(stem))
    for state in states.values():
        # The tombstone is the commit point of `hub rm`: a version whose manifest a killed
        # rm left behind is removed all the same (gc deletes what was left).
        state.versions = [v for v in state.versions if v not in state.removed]
    return states


def parse_alias_table(raw: bytes, key: str) -> dict[str, int]:
    try:
        table = json.loads(raw)
        if not isinstance(table, dict):
            raise ValueError("not a JSON object")
        return {str(k): int(v) for k, v in table.items()}
    except (ValueError, TypeError) as error:
        raise DamagedRecord(f"alias table {key}", str(error)) from None


def unprintable(text: str) -> str | None:
    """The first control or formatting character in ``text`` (as U+XXXX), if any: they
    rewrite or reorder what a terminal shows when `hub show` prints the text."""
    from lorabay.hub.content import UNPRINTABLE

    odd = next((c for c in text if unicodedata.category(c) in UNPRINTABLE), None)
    return None if odd is None else f"U+{ord(odd):04X}"


def check_push_options(
    name: str,
    aliases: Iterable[str],
    kind: str,
    labels: Mapping,
    lineage: Mapping | None,
    description: str = "",
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
    else:
        for key, value in labels.items():
            if odd := unprintable(key + value):
                problems.append(f"label {key!r} holds the control character {odd}")
    if not isinstance(description, str):
        problems.append("the description must be a string")
    elif odd := unprintable(description):
        problems.append(f"the description holds the control character {odd} (one line of text)")
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
        self.records = ManifestRecords(store)  # how manifests are found (hub/records.py)

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
        return self.records.get(name, version)

    def read_stored_manifest(self, name: str, version: int) -> Manifest:
        """The manifest as the store holds it now (verify: no cached copy may hide damage)."""
        key = manifest_key(name, version)
        raw = self.store.read(key)
        if raw is None:
            raise DamagedRecord(f"manifest {key}", "it disappeared")
        return Manifest.from_json(raw, key)

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
        raws, _ = self.records.read_many([listed[n] for n in wanted])
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
            return self._existing_manifest(name, parsed.version, shown)
        if parsed.digest is not None:
            state = self._state(name)
            for manifest in self.records.many([(name, v) for v in state.versions]):
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
        version = table[parsed.alias]
        try:
            return self._existing_manifest(name, version, shown)
        except AdapterNotFound:
            if self.store.has(removed_key(name, version)):
                raise AdapterNotFound(
                    shown,
                    f"it points to {name}:{version}, which was removed; move it with "
                    f"`lorabay hub alias set {name} {parsed.alias} VERSION`",
                ) from None
            raise DamagedRecord(shown, f"the alias points to missing version {version}") from None

    def _existing_manifest(self, name: str, version: int, shown: str) -> Manifest:
        """Version ``version`` while the store has it: a copy kept here is used only after a
        HEAD shows its manifest is still there (``hub rm`` may have removed it)."""
        key = manifest_key(name, version)
        kept = self.records.known(name, version)
        if kept is not None and self.store.has(key):
            return kept
        self.records.forget(name, version)
        raw = self.store.read(key) if kept is None else None
        if raw is not None:
            return self.records.accept(name, version, raw, keep=True)
        if self.store.has(removed_key(name, version)):
            raise AdapterNotFound(
                shown, f"{name}:{version} was removed (`lorabay hub log {name}` says when)"
            )
        raise AdapterNotFound(shown, f"run `lorabay hub list {name}` to see its versions")

    def _as_manifest(self, ref_or_manifest: str | Manifest) -> Manifest:
        return (
            ref_or_manifest
            if isinstance(ref_or_manifest, Manifest)
            else self.resolve(ref_or_manifest)
        )

    def is_yanked(self, ref_or_manifest: str | Manifest) -> bool:
        manifest = self._as_manifest(ref_or_manifest)
        return self.store.has(yanked_key(manifest.name, manifest.version))

    def names(self) -> list[str]:
        if not self.is_readable():
            return []
        states = states_of(self.store.list("adapters/"))
        return sorted(name for name, state in states.items() if state.versions)

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
        return self.records.many(pairs, listed)

    def yanked_versions(self, name: str) -> set[int]:
        validate_name(name)
        return self._state(name).yanked if self.is_readable() else set()

    def aliases(self, name: str) -> dict[str, int]:
        validate_name(name)
        if not self.is_readable():
            return {}
        return dict(sorted(self._read_aliases(name)[0].items()))

    def events(
        self, name: str | None = None, *, limit: int | None = None, since: float | None = None
    ) -> list[dict]:
        """The event log (of ``name``: one listing of its own prefix), oldest first: pushed,
        aliased, unaliased, yanked, unyanked, removed. ``since`` (seconds since the epoch)
        and ``limit`` (the newest N) are applied to the keys, so only those events are read.
        A damaged event raises DamagedRecord."""
        if name is not None:
            validate_name(name)
        if limit is not None and limit < 0:
            raise ConfigError(f"limit {limit} is negative", "give 0 or more")
        if not self.is_readable():
            return []
        return read_events(self.store, name, limit=limit, since=since)

    def damaged_events(self) -> list[tuple[str, LorabayError]]:
        """Every event that cannot be read (``verify``): (key, error)."""
        return damaged_events(self.store)

    # -- writing ---------------------------------------------------------------------
    def _log(self, event: str, **facts) -> None:
        write_event(self.store, event, **facts)

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
    ) -> Pushed:
        """Check ``folder`` completely, then store it as the next version of ``name``.

        Content identical to an existing version of ``name`` gives that version with
        ``created`` False and writes none (the aliases still move to it). Nothing is
        written before every check has passed.
        """
        aliases, labels, lineage = check_push_options(
            name, aliases, kind, labels or {}, lineage, description
        )
        content = scan_adapter(folder, progress=progress)
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
            return Pushed(existing, created=False)

        for index, f in enumerate(content.files):
            self.store.put_file(blob_key(f.sha256), f.source, f.sha256)
            if index == 0:
                faults.checkpoint("push:blob")
        faults.checkpoint("push:blobs")

        manifest, created = None, False
        for _ in range(CAS_ATTEMPTS):
            state = self._state(name)
            # A concurrent push of the same content may have won meanwhile.
            existing = self._find_digest(name, digest, state)
            if existing is not None:
                manifest = existing
                break
            candidate = Manifest(
                name=name,
                version=state.next_version,
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
                self.records.written(key, candidate.to_json())
                manifest, created = candidate, True
                self.records.remember(candidate)
                faults.checkpoint("push:manifest")
                self._log("pushed", name=name, version=candidate.version, digest=digest)
                # A gc running now read the manifests before this one existed: make sure
                # it spares these blobs, or put back what it took (upkeep.py says why).
                protect_blobs(self.store, [(f.sha256, f.source) for f in content.files])
                break
            time.sleep(random.uniform(0, 0.01))
        if manifest is None:
            raise Conflict(
                f"could not create a version of {name} after {CAS_ATTEMPTS} attempts",
                "too many concurrent pushes; try again",
            )
        for alias in aliases:
            self.set_alias(name, alias, manifest.version)
        self.records.pack_written()
        return Pushed(manifest, created)

    def _find_digest(
        self, name: str, digest: str, state: NameState | None = None
    ) -> Manifest | None:
        state = state or self._state(name)
        for manifest in self.records.many([(name, v) for v in state.versions]):
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
                self.records.written(key, data)
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
        if (
            not isinstance(version, int)
            or isinstance(version, bool)
            or not 1 <= version <= MAX_VERSION
        ):
            raise ConfigError(
                f"version {str(version)[:20]!r} is not a whole number from 1 to {MAX_VERSION:,}"
            )
        self._readable_or_raise(f"{name}:{version}")
        manifest = self._existing_manifest(name, version, f"{name}:{version}")
        if self.is_yanked(manifest):
            raise YankedVersion(f"{name}:{version}")
        previous = self._move_alias(name, alias, version)
        self._log("aliased", name=name, alias=alias, version=version, previous=previous)
        self.records.pack_written()

    def remove_alias(self, name: str, alias: str) -> None:
        validate_name(name)
        validate_alias(alias, f"{name}:{alias}")
        self._readable_or_raise(f"{name}:{alias}")
        previous = self._move_alias(name, alias, None)
        self._log("unaliased", name=name, alias=alias, previous=previous)
        self.records.pack_written()

    def _readable_or_raise(self, shown: str) -> None:
        if not self.is_readable():
            raise AdapterNotFound(shown, "the registry is empty; push an adapter first")

    def yank(self, ref: str, undo: bool = False, reason: str = "") -> Change:
        """Hide a version from ``latest`` and ``list`` (still pullable by version or digest),
        or show it again (``undo``). Logged only when it changed something: yanking a
        yanked version (or un-yanking one that is not) gives ``changed`` False."""
        manifest = self.resolve(ref)
        key = yanked_key(manifest.name, manifest.version)
        if undo:
            changed = self._delete_flag(key)
        else:
            record = {"at": now_iso(), "by": current_user(), "reason": reason}
            changed = self.store.create(key, json.dumps(record).encode())
        if changed:
            self._log(
                "unyanked" if undo else "yanked",
                name=manifest.name,
                version=manifest.version,
                digest=manifest.digest,
                reason=reason,
            )
        return Change(manifest, changed)

    def _delete_flag(self, key: str) -> bool:
        """Delete ``key`` if present; whether this call deleted it (of two at once, one)."""
        for _ in range(CAS_ATTEMPTS):
            tagged = self.store.read_tagged(key)
            if tagged is None:
                return False
            try:
                self.store.delete(key, tagged[1])
                return True
            except PreconditionFailed:
                continue  # deleted (or re-created) meanwhile: look again
        raise Conflict(f"could not change {key}", "too many concurrent changes; try again")

    def remove(
        self,
        ref: str,
        *,
        drop_aliases: bool = False,
        move_aliases: int | None = None,
        reason: str = "",
    ) -> Removed:
        """Delete a version: its manifest and yanked flag go, a tombstone keeps its number
        taken (never given out again), the event log records ``removed``, and ``gc`` then
        frees the blobs no other version uses. Refused (VersionAliased) while aliases point
        at it, unless ``drop_aliases`` removes them or ``move_aliases`` points them at that
        version instead."""
        if drop_aliases and move_aliases is not None:
            raise ConfigError("give --drop-aliases or --move-aliases, not both")
        manifest = self.resolve(ref)
        name, version = manifest.name, manifest.version
        if move_aliases is not None:
            if move_aliases == version:
                raise ConfigError(f"--move-aliases {version} is the version being removed")
            target = self._existing_manifest(name, move_aliases, f"{name}:{move_aliases}")
            if self.is_yanked(target):
                raise YankedVersion(target.ref)
        moved = self._release_aliases(manifest, drop_aliases, move_aliases)
        record = {
            "at": now_iso(),
            "by": current_user(),
            "digest": manifest.digest,
            "reason": reason,
        }
        # The commit point. Only its creator logs; a second rm (racing, or after one that was
        # killed) only finishes the deletes.
        if self.store.create(removed_key(name, version), json.dumps(record).encode()):
            self._log("removed", name=name, version=version, digest=manifest.digest, reason=reason)
        self.store.delete(manifest_key(name, version))
        self.store.delete(yanked_key(name, version))
        signatures = f"{name_prefix(name)}{version}.sig."  # hub/signing.py: one per key
        for info in self.store.list(name_prefix(name)):
            if info.key.startswith(signatures):
                self.store.delete(info.key)
        self.records.forget(name, version)
        # An alias set to this version while it was being removed would point at nothing.
        moved |= self._release_aliases(manifest, True, move_aliases)
        self.records.pack_written()
        self.records.unpack_removed([manifest_key(name, version)])
        discard_unused(cache_dir(), manifest.digest_hex)
        return Removed(manifest, moved)

    def _release_aliases(
        self, manifest: Manifest, drop: bool, move_to: int | None
    ) -> dict[str, int | None]:
        """Move or remove the aliases that point at ``manifest`` (compare-and-swap, logged);
        VersionAliased when there are some and neither is asked for."""
        name, version, key = manifest.name, manifest.version, alias_key(manifest.name)
        for attempt in range(CAS_ATTEMPTS):
            table, etag = self._read_aliases(name)
            pointing = sorted(a for a, v in table.items() if v == version)
            if not pointing:
                return {}
            if not drop and move_to is None:
                raise VersionAliased(manifest.ref, [f"{name}:{a}" for a in pointing])
            for alias in pointing:
                if move_to is None:
                    table.pop(alias)
                else:
                    table[alias] = move_to
            data = json.dumps(table, sort_keys=True).encode()
            try:
                self.store.swap(key, data, etag)
            except PreconditionFailed:
                time.sleep(random.uniform(0, min(0.2, 0.005 * (attempt + 1))))
                continue
            self.records.written(key, data)
            for alias in pointing:
                if move_to is None:
                    self._log("unaliased", name=name, alias=alias, previous=version)
                else:
                    self._log("aliased", name=name, alias=alias, version=move_to, previous=version)
            return dict.fromkeys(pointing, move_to)
        raise Conflict(
            f"could not move the aliases of {name} after {CAS_ATTEMPTS} attempts",
            "too many concurrent alias moves; try again",
        )

    # -- pulling ---------------------------------------------------------------------
    def pull(
        self,
        ref_or_manifest: str | Manifest,
        to: str | os.PathLike | None = None,
        *,
        progress: Progress | None = None,
    ) -> Path:
        """A verified local folder with the adapter's files (cached by digest). The cache
        folder is not held once this returns: a prune may remove it later; use ``lease``
        to keep it, or ``to`` for a copy of one's own."""
        manifest = self._as_manifest(ref_or_manifest)
        self._warn_if_yanked(manifest)
        with self._fetch(manifest, progress) as held:
            return copy_out(held.path, Path(to)) if to is not None else held.path

    def lease(
        self, ref_or_manifest: str | Manifest, *, progress: Progress | None = None
    ) -> CacheLease:
        """Pull, and hold the cached folder: until ``release()`` (or the end of a ``with``
        block), no cache prune in any process removes it (hub/cache.py). The gateway holds
        one per adapter the engine has loaded."""
        manifest = self._as_manifest(ref_or_manifest)
        self._warn_if_yanked(manifest)
        return self._fetch(manifest, progress)

    def _fetch(self, manifest: Manifest, progress: Progress | None) -> CacheLease:
        return pull_into_cache(
            self.store, manifest, cache_dir(), self.pull_stats, progress, self.url
        )

    def _warn_if_yanked(self, manifest: Manifest) -> None:
        if self.is_yanked(manifest):
            warnings.warn(
                f"{manifest.ref} is yanked; pulled because it was named exactly",
                YankedWarning,
                stacklevel=3,
            )

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
        self._warn_if_yanked(manifest)
        with self._fetch(manifest, None) as held:
            return check_manifest_against_base(manifest, held.path, base_path, max_rank)
