"""Push a trained adapter into the registry with its lineage.

``lorabay train ... --push NAME`` calls :func:`push_adapter` when training ends;
:func:`push_run` pushes a finished run folder later (it reads ``lineage.json`` and
``recipe.yaml`` from it), so a run trained without ``--push`` loses nothing.

    push_run("runs/sft-20260101-120000", "team/sentiment", aliases=["prod"])
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lorabay.hub.errors import ConfigError

# Training methods whose adapter carries a head, pushed as that kind (the rest: "lora").
HEAD_KINDS = {"reward": "reward", "prm": "prm"}


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


def push_run(
    output: str | os.PathLike,
    name: str,
    *,
    registry: str | None = None,
    aliases: list[str] | tuple[str, ...] = (),
    description: str = "",
    kind: str | None = None,
):
    """Push the adapter of a finished run folder, with the lineage the run wrote; ``kind``
    defaults to the run's (a reward or prm run pushes its kind, any other run ``lora``)."""
    import yaml

    output = Path(output)
    adapter, lineage_file = output / "adapter", output / "lineage.json"
    if not adapter.is_dir() or not lineage_file.is_file():
        raise ConfigError(
            f"{output} holds no finished run (adapter/ and lineage.json)",
            "train first, or push the adapter folder with `lorabay hub push`",
        )
    recipe_file = output / "recipe.yaml"
    recipe = yaml.safe_load(recipe_file.read_text()) if recipe_file.is_file() else {}
    lineage = json.loads(lineage_file.read_text())
    return push_adapter(
        adapter,
        name,
        base=recipe.get("base"),
        lineage=lineage,
        kind=kind or HEAD_KINDS.get(lineage.get("method"), "lora"),
        registry=registry,
        aliases=aliases,
        description=description,
    )
