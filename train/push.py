"""Push a trained adapter into the registry with its lineage.

``lorabay train ... --push NAME`` calls :func:`push_adapter` when training ends. A run
trained without ``--push`` keeps its adapter and ``lineage.json`` in the run folder.
"""

from __future__ import annotations

import os
from pathlib import Path


def push_adapter(
    adapter: str | os.PathLike,
    name: str,
    *,
    base: str | os.PathLike | None,
    lineage: dict,
    kind: str = "lora",
    registry: str | None = None,
    aliases: list[str] | tuple[str, ...] = (),
    description: str = "",
    labels: dict[str, str] | None = None,
):
    """Store ``adapter`` as the next version of ``name``; returns the Manifest.

    ``base`` (a base folder) fills the manifest's base record and is checked against
    the adapter's shapes; ``lineage`` is method, dataset digest, parent digest,
    hyper-parameters and final metrics.
    """
    from lorabay.hub import Registry

    pushed = Registry.open(registry).push(
        adapter,
        name,
        aliases=aliases,
        description=description,
        labels=labels or {},
        base=base if base and Path(base).exists() else None,
        lineage=lineage,
        kind=kind,
    )
    return pushed.manifest
