"""``/v1/models``: the base and the adapters a key may use, as OpenAI model cards.

Adapters come from one registry listing and one read of the alias tables; only those
that fit the served base are shown (the checks ``lorabay hub check`` makes, from their
manifests), each with its aliases and ``latest``.
"""

from __future__ import annotations

import asyncio
from datetime import datetime

from lorabay.hub.listing import list_rows, row_of
from lorabay.serve.gateway import Gateway
from lorabay.serve.resolve import model_not_found


def base_card(gateway: Gateway) -> dict:
    return {
        "id": gateway.resolver.served_name,
        "object": "model",
        "created": 0,
        "owned_by": "lorabay",
        "kind": "base",
        "max_model_len": gateway.max_model_len,
    }


def owner_of(name: str) -> str:
    # The namespace, as OpenAI names an organisation; never created_by (user@host).
    return name.split("/", 1)[0] if "/" in name else "lorabay"


def adapter_card(gateway: Gateway, row: dict, latest: int) -> dict:
    """The card of one ``hub list`` row (hub/listing.py); ``latest``: its name's highest
    version listed, which also answers to ``latest``."""
    aliases = row["aliases"] + (["latest"] if row["version"] == latest else [])
    return {
        "id": row["ref"],
        "object": "model",
        "created": epoch_seconds(row["created_at"]),
        "owned_by": owner_of(row["name"]),
        "parent": gateway.resolver.served_name,
        "kind": row["kind"],
        "name": row["name"],
        "version": row["version"],
        "digest": row["digest"],
        "aliases": aliases,
        "description": row["description"],
    }


def latest_versions(rows: list[dict]) -> dict[str, int]:
    latest: dict[str, int] = {}
    for row in rows:
        latest[row["name"]] = max(latest.get(row["name"], 0), row["version"])
    return latest


async def list_models(gateway: Gateway, grant) -> list[dict]:
    """The base, then every adapter the key may use that fits the base: the rows of
    ``lorabay hub list`` (one listing, one read of the alias tables)."""
    resolver = gateway.resolver
    rows = await asyncio.to_thread(
        list_rows,
        resolver.registry,
        allows=grant.allows,
        annotate=lambda manifest: {"fits": resolver.fits(manifest)},
    )
    latest = latest_versions(rows)
    cards = [base_card(gateway)]
    for row in sorted(rows, key=lambda r: (r["name"], r["version"])):
        if row["fits"]:
            cards.append(adapter_card(gateway, row, latest[row["name"]]))
    return cards


async def find_model(gateway: Gateway, grant, model: str) -> dict:
    """One card (the openai client's ``models.retrieve``): the same 404 for a model that
    is missing, not the key's, or not one this base serves."""
    if model == gateway.resolver.served_name:
        return base_card(gateway)
    target = await gateway.resolver.resolve(model, grant)
    manifest = target.manifest
    if not gateway.resolver.fits(manifest):
        raise model_not_found(model)
    rows = await asyncio.to_thread(list_rows, gateway.resolver.registry, manifest.name)
    row = next((r for r in rows if r["version"] == manifest.version), None)
    if row is None:  # a version the listing leaves out (yanked, named exactly)
        row = row_of(manifest, {}, set())
    return adapter_card(gateway, row, latest_versions(rows).get(manifest.name, 0))


def epoch_seconds(iso: str) -> int:
    try:
        return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())
    except (ValueError, AttributeError):
        return 0
