"""The rows of `lorabay hub list`: one function for the CLI and the web console.

    rows = list_rows(registry)                                  # what `hub list` prints
    rows = list_rows(registry, "team/summarize", include_yanked=True)   # `hub list NAME --all`
    rows = list_rows(registry, allows=grant.allows)             # only the names a key may use
    rows = list_rows(registry, annotate=lambda m: {"fits": fits(m)})   # with fields of one's own

A row is plain JSON: ref, name, version, digest, size, kind, aliases, created_at,
created_by, yanked, description, labels, base (the base's id, or None). Aliases are
only the stored ones (``latest`` is implicit: the highest version not yanked).
"""

from __future__ import annotations

from collections.abc import Callable

from lorabay.hub.manifest import Manifest


def list_rows(
    registry,
    name: str | None = None,
    *,
    include_yanked: bool = False,
    allows: Callable[[str], bool] | None = None,
    annotate: Callable[[Manifest], dict] | None = None,
) -> list[dict]:
    """Every version (of ``name``; of the names ``allows`` accepts), oldest first per name;
    yanked ones only if asked; ``annotate`` adds fields to each row from its manifest. One
    listing of the versions and one of the alias tables."""
    manifests = registry.list(name, include_yanked=include_yanked)
    if allows is not None:
        manifests = [m for m in manifests if allows(m.name)]
    aliases = registry.alias_tables(sorted({m.name for m in manifests}))
    yanked = (
        {n: state.yanked for n, state in registry.version_table(name).items()}
        if include_yanked
        else {}
    )
    rows = [row_of(m, aliases[m.name], yanked.get(m.name, set())) for m in manifests]
    if annotate is not None:
        for row, manifest in zip(rows, manifests, strict=True):
            row.update(annotate(manifest))
    return rows


def row_of(manifest: Manifest, aliases: dict[str, int], yanked: set[int]) -> dict:
    return {
        "ref": manifest.ref,
        "name": manifest.name,
        "version": manifest.version,
        "digest": manifest.digest,
        "size": manifest.size,
        "kind": manifest.kind,
        "aliases": sorted(a for a, v in aliases.items() if v == manifest.version),
        "created_at": manifest.created_at,
        "created_by": manifest.created_by,
        "yanked": manifest.version in yanked,
        "description": manifest.description,
        "labels": dict(sorted(manifest.labels.items())),
        "base": (manifest.base or {}).get("id"),
    }
