"""From the ``model`` a client sends to what the engine serves.

``model`` is the base's served name or a registry reference (``name``, ``name:3``,
``name:prod``, ``name@sha256:...``). It is resolved to a manifest on every request:
results are cached for at most ``ttl`` seconds (0.5 s), so a moved alias shows within
that, and a request holds one manifest from resolution to its last token, so it
never mixes versions. The engine knows an adapter as ``name@sha256:<hex>``: the
name carries the digest, so new content can never be served under an old name.

Every "no such model" answer is the same, whether the reference is malformed,
missing, or names an adapter the caller's key may not use: names do not leak.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from lorabay.hub import Manifest, Registry
from lorabay.hub.base_config import local_base_config
from lorabay.hub.cache import CacheLease
from lorabay.hub.compat import check_manifest_against_base, compare_config, read_base_shapes
from lorabay.hub.errors import (
    AdapterNotFound,
    IncompatibleBase,
    InvalidReference,
    UntrustedAdapter,
)
from lorabay.hub.reference import parse_reference
from lorabay.hub.verifier import KINDS as VERIFIER_KINDS
from lorabay.hub.verifier import verifier_problems
from lorabay.serve.keys import KeyGrant

log = logging.getLogger("lorabay.serve")

BASE_VERSION = "base"
POLICY, VERIFIER = "policy", "verifier"  # what a request uses an adapter as (role_problems)
TRUST_RECHECK_SECONDS = 5.0  # a trust refusal stands this long (a signature added counts after)


def model_not_found(model: str) -> AdapterNotFound:
    # OpenAI's own wording for a model that is missing or not the caller's to use.
    error = AdapterNotFound(str(model)[:200], None)
    error.message = (
        f"The model '{str(model)[:200]}' does not exist or you do not have access to it."
    )
    return error


@dataclass(frozen=True)
class Target:
    """What one request is served by: the base, or one immutable adapter version."""

    name: str  # the adapter's name, or the base's served name
    manifest: Manifest | None = None  # None: the base

    @property
    def is_base(self) -> bool:
        return self.manifest is None

    @property
    def version(self) -> str:
        return BASE_VERSION if self.manifest is None else str(self.manifest.version)

    @property
    def labels(self) -> tuple[str, str]:
        return (self.name, self.version)

    @property
    def pinned(self) -> str:
        """``name:version@sha256:...`` (the base: its served name): exactly what answered."""
        if self.manifest is None:
            return self.name
        return f"{self.name}:{self.manifest.version}@{self.manifest.digest}"

    @property
    def engine_name(self) -> str:
        return self.name if self.manifest is None else f"{self.name}@{self.manifest.digest}"


def role_problems(manifest: Manifest, role: str) -> list[str]:
    """Why ``manifest`` cannot serve a request as ``role``: the ``model`` that generates
    (POLICY: kind lora) or the ``verifier`` that scores (VERIFIER: a generative reward model
    or PRM, lorabay.hub.verifier), from the manifest alone."""
    if role == VERIFIER:
        return verifier_problems(manifest)
    if manifest.kind == "lora":
        return []
    shown = (
        f"kind {manifest.kind!r} judges text and generates nothing; the engine serves kind 'lora'"
    )
    if not verifier_problems(manifest):
        return [f'{shown}: name it as a request\'s "verifier" (with best_of or search)']
    return [
        f"{shown} (a score-head judge scores in `lorabay score --prm` "
        "and `lorabay train rlhf --reward`)"
    ]


def describe_mismatch(manifest: Manifest, config: dict, max_rank: int | None) -> list[str]:
    """Why ``manifest`` cannot fit the base, from the manifest alone (no download), in the
    role its kind gives it (a verifier's kind: as a verifier).

    Used to filter /v1/models; the full check (tensor shapes) runs before a load.
    """
    reasons = role_problems(manifest, VERIFIER if manifest.kind in VERIFIER_KINDS else POLICY)
    reasons += compare_config(manifest.base or {}, config)
    rank = (manifest.peft or {}).get("r")
    if max_rank is not None and isinstance(rank, int) and rank > max_rank:
        reasons.append(f"rank {rank} is above the engine's --max-lora-rank {max_rank}")
    return reasons


class ModelResolver:
    def __init__(
        self,
        registry: Registry,
        served_name: str,
        base: str,
        max_rank: int | None = None,
        ttl: float = 0.5,
        trust=None,
    ):
        self.registry = registry
        self.trust = trust  # hub.signing.TrustPolicy (--trust), or None: no signature needed
        # (name, digest) -> a recent refusal; the name too: rules are by name, not content
        self._untrusted: dict[tuple[str, str], tuple[float, UntrustedAdapter]] = {}
        self.served_name = served_name
        found = local_base_config(base)  # None: a Hugging Face id, checked by the engine
        self.base_folder = None if found is None else found.folder
        self.base_config = {} if found is None else found.values
        self.max_rank = max_rank
        self.ttl = ttl
        self._cache: dict[str, tuple[float, Manifest]] = {}
        self._inflight: dict[str, asyncio.Task] = {}
        self._fit: dict[str, list[str]] = {}  # digest -> reasons it does not fit ([] = fits)

    def warm_up(self) -> None:
        """Read the base's tensor shapes once now: the first check costs ~0.1 s cold (imports,
        the safetensors header off disk), which would land on a client's first token."""
        if self.base_folder is not None:
            read_base_shapes(self.base_folder)

    async def resolve(self, model: str, grant: KeyGrant) -> Target:
        if model == self.served_name:
            return Target(self.served_name)
        try:
            reference = parse_reference(model)
        except (InvalidReference, ValueError):  # ValueError: int() of a 5,000-digit version
            raise model_not_found(model) from None
        if not grant.allows(reference.name):
            raise model_not_found(model)
        manifest = await self._lookup(model)
        return Target(manifest.name, manifest)

    async def _lookup(self, model: str) -> Manifest:
        cached = self._cache.get(model)
        if cached is not None and time.monotonic() - cached[0] < self.ttl:
            return cached[1]
        task = self._inflight.get(model)
        if task is None:  # concurrent lookups of one reference share one registry read
            task = asyncio.get_running_loop().create_task(self._read(model))
            self._inflight[model] = task
            task.add_done_callback(lambda t: self._lookup_done(model, t))
        return await asyncio.shield(task)

    def _lookup_done(self, model: str, task: asyncio.Task) -> None:
        self._inflight.pop(model, None)
        if not task.cancelled():
            task.exception()  # retrieved: a lookup whose waiters all left must not warn

    async def _read(self, model: str) -> Manifest:
        asked = time.monotonic()
        try:
            manifest = await asyncio.to_thread(self.registry.resolve, model)
        except AdapterNotFound:
            raise model_not_found(model) from None
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[model] = (asked, manifest)
        return manifest

    async def prepare(self, target: Target, role: str = POLICY) -> CacheLease:
        """Pull and verify the adapter, check it fits the base as ``role`` (POLICY or
        VERIFIER); its local folder, held in the pull cache until the pool releases it
        (``os.fspath`` gives the path)."""
        manifest = target.manifest
        assert manifest is not None
        self.check_role(target, role)  # before any download
        known = self._fit.get(manifest.digest)
        if known:
            raise IncompatibleBase(manifest.ref, self.served_name, known)
        return await asyncio.to_thread(self._pull_and_check, manifest)

    def check_role(self, target: Target, role: str) -> None:
        """IncompatibleBase unless ``target`` can serve a request as ``role``: checked on
        every request, since an adapter the engine holds for one role is not thereby fit
        for the other."""
        if target.is_base:
            problems = ["the base generates; a verifier is an adapter"] if role == VERIFIER else []
        else:
            problems = role_problems(target.manifest, role)
        if problems:
            shown = target.name if target.is_base else target.manifest.ref
            raise IncompatibleBase(shown, self.served_name, problems)

    def _pull_and_check(self, manifest: Manifest) -> CacheLease:
        # One verified pull, then the check on that folder (Registry.check would pull,
        # i.e. re-hash, a second time): the cold path is on a client's first token.
        # The folder stays held (a lease) while the engine has the adapter: vLLM may read
        # it again, so no cache prune, in this process or another, may remove it (pool.py).
        lease = self.registry.lease(manifest)
        folder = lease.path
        try:
            reasons = self._fit.get(manifest.digest)
            if reasons is None:
                reasons = (
                    check_manifest_against_base(manifest, folder, self.base_folder, self.max_rank)
                    if self.base_folder is not None
                    else []  # a hub id, not a folder: vLLM checks the shapes when loading
                )
                self._fit[manifest.digest] = reasons
            if reasons:
                raise IncompatibleBase(manifest.ref, self.served_name, reasons)
            if self.trust is not None:
                self._check_trust(manifest, folder)
        except BaseException:
            lease.release()
            raise
        return lease

    def _check_trust(self, manifest: Manifest, folder: Path) -> None:
        """The trust policy on the verified folder, before the engine sees it (raises
        UntrustedAdapter). A refusal is kept a few seconds: a client repeating a request
        for an untrusted adapter does not make the gateway check it again each time."""
        key = (manifest.name, manifest.digest)
        refused = self._untrusted.get(key)
        if refused is not None and time.monotonic() - refused[0] < TRUST_RECHECK_SECONDS:
            raise refused[1]
        try:
            signer = self.trust.check(self.registry, manifest, folder)
        except UntrustedAdapter as error:
            log.warning("refused %s: %s", manifest.ref, error.reason)
            if len(self._untrusted) > 10_000:
                self._untrusted.clear()
            self._untrusted[key] = (time.monotonic(), error)
            raise
        self._untrusted.pop(key, None)
        log.info("%s is signed by %s (trust policy)", manifest.ref, signer.shown)

    def fits(self, manifest: Manifest) -> bool:
        """For /v1/models: a known result, else the manifest-only check."""
        known = self._fit.get(manifest.digest)
        if known is not None:
            return not known
        return not describe_mismatch(manifest, self.base_config, self.max_rank)
