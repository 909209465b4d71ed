"""What the web console's JSON endpoints answer, for one key at a time.

    console = gateway_console(gateway)                       # inside `lorabay serve`
    console = registry_console(registry, keys, base="./tiny")    # `lorabay hub ui`
    console.adapters(grant)        # the rows `hub list` prints, only the key's names
    console.version(grant, "team-a/summarize:3")   # manifest, fit, aliases, events, lineage

Every answer is built from the names ``grant`` allows and nothing else: a version the
key may not use is the same 404 as a missing one (the gateway's own wording), a parent
or child of another tenant's is not named, and text in a lineage that names another
tenant's adapter is redacted. The methods block (registry reads): call them off the
event loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lorabay.hub.base_config import read_base_config
from lorabay.hub.errors import AdapterNotFound, InvalidReference
from lorabay.hub.listing import list_rows
from lorabay.hub.manifest import Manifest
from lorabay.hub.reference import parse_reference
from lorabay.serve.keys import OPEN, ApiKeys, KeyGrant
from lorabay.serve.resolve import describe_mismatch, model_not_found
from lorabay.serve.ui.lineage import hider, lineage_graph, read_curve
from lorabay.serve.ui.traffic import traffic

EVENTS_SHOWN = 200  # the newest events of a name on its version page


@dataclass(frozen=True)
class ServedBase:
    """The base adapters are checked against: its name, and why a manifest does not fit."""

    name: str
    mismatch: Callable[[Manifest], list[str]]  # [] when it fits


@dataclass
class Console:
    registry: object  # lorabay.hub.Registry
    authenticate: Callable[[str | None], KeyGrant]  # an Authorization header -> its grant
    base: ServedBase | None = None  # None: nothing to check adapters against
    metrics: object | None = None  # the gateway's GatewayMetrics; None: no traffic here
    generates: bool = False  # /v1 answers on this origin (the playground)

    def info(self, grant: KeyGrant) -> dict:
        return {
            "mode": "gateway" if self.generates else "registry",
            "base": self.base.name if self.base else None,
            "playground": self.generates,
            "traffic": self.metrics is not None,
            "keys": grant is not OPEN,
        }

    def adapters(self, grant: KeyGrant, include_yanked: bool = False) -> dict:
        """The rows of `hub list` (``--all`` with ``include_yanked``) for the key's names,
        each with whether it fits the served base."""
        annotate = None
        if self.base is not None:
            mismatch = self.base.mismatch
            annotate = lambda manifest: {"fits": not mismatch(manifest)}  # noqa: E731
        rows = list_rows(
            self.registry, include_yanked=include_yanked, allows=grant.allows, annotate=annotate
        )
        return {"base": self.base.name if self.base else None, "rows": rows}

    def version(self, grant: KeyGrant, ref: str) -> dict:
        manifest = self._resolve(grant, ref)
        registry, name = self.registry, manifest.name
        everything = registry.list(include_yanked=True)
        visible = [m for m in everything if grant.allows(m.name)]
        hide = hider({m.name for m in everything}, grant.allows)
        state = registry.version_table(name).get(name)
        yanked = state.yanked if state else set()
        latest = state.latest if state else None
        table = registry.aliases(name)
        aliases = sorted(a for a, v in table.items() if v == manifest.version)
        if latest == manifest.version:
            aliases.append("latest")
        lineage = hide(dict(manifest.lineage or {}))
        fit = None
        if self.base is not None:
            reasons = self.base.mismatch(manifest)
            fit = {"base": self.base.name, "fits": not reasons, "reasons": reasons}
        return {
            "ref": manifest.ref,
            "name": name,
            "version": manifest.version,
            "digest": manifest.digest,
            "kind": manifest.kind,
            "size": manifest.size,
            "created_at": manifest.created_at,
            "created_by": manifest.created_by,
            "description": manifest.description,
            "labels": manifest.labels,
            "yanked": manifest.version in yanked,
            "aliases": aliases,
            "alias_table": table,
            "versions": [
                {"version": m.version, "yanked": m.version in yanked}
                for m in visible
                if m.name == name
            ],
            "files": [
                {"path": f["path"], "size": f["size"], "sha256": f["sha256"]}
                for f in manifest.files
            ],
            "peft": manifest.peft,
            "base": manifest.base,
            "fit": fit,
            "lineage": lineage,
            "graph": lineage_graph(manifest, visible, hide),
            "events": registry.events(name, limit=EVENTS_SHOWN),
            "curve": read_curve(registry, manifest),
        }

    def _resolve(self, grant: KeyGrant, ref: str) -> Manifest:
        try:
            name = parse_reference(ref).name
        except (InvalidReference, ValueError):
            raise model_not_found(ref) from None
        if not grant.allows(name):
            raise model_not_found(ref)
        try:
            return self.registry.resolve(ref)
        except AdapterNotFound:
            raise model_not_found(ref) from None

    def traffic(self, grant: KeyGrant) -> dict:
        if self.metrics is None:
            return {"adapters": []}
        return traffic(self.metrics, grant, self.base.name if self.base else "")


def gateway_console(gateway) -> Console:
    """The console of a running gateway: its keys, its base, its counters, its /v1."""
    resolver = gateway.resolver

    def mismatch(manifest: Manifest) -> list[str]:
        # What /v1/models goes by: the manifest-only check, or the load's full one when
        # it was made; a full check that failed is said without its details here.
        reasons = describe_mismatch(manifest, resolver.base_config, resolver.max_rank)
        if not reasons and not resolver.fits(manifest):
            reasons = ["its tensors do not fit the base (found when the gateway loaded it)"]
        return reasons

    return Console(
        registry=resolver.registry,
        authenticate=gateway.authenticate,
        base=ServedBase(resolver.served_name, mismatch),
        metrics=gateway.metrics,
        generates=True,
    )


def registry_console(
    registry, keys: ApiKeys | None, base: str | None = None, max_rank: int | None = None
) -> Console:
    """The console of a registry alone (`lorabay hub ui`): no playground, no traffic;
    with ``base`` (a base folder) adapters are checked against it from their manifests."""

    def authenticate(authorization: str | None) -> KeyGrant:
        return OPEN if keys is None else keys.authenticate(authorization)

    served = None
    if base is not None:
        found = read_base_config(base)  # ConfigError naming --base and the fix
        served = ServedBase(
            found.folder.name, lambda manifest: describe_mismatch(manifest, found.values, max_rank)
        )
    return Console(registry=registry, authenticate=authenticate, base=served)
