"""A version's lineage as a graph, its training curve, and what of it a key may see.

    graph = lineage_graph(manifest, visible, hide)   # {"nodes": [...], "edges": [...]}
    curve = read_curve(registry, manifest)           # [{"step": 5, "loss": 2.1}, ...] or None

Nodes are the base (the root), the parents back to it (``lineage.parent_digest``, one
hop at a time), this version, the versions trained from it, and the dataset it was
trained on. ``visible`` holds only the versions the key may use: a parent outside them
is drawn as its digest alone, the same whether it is another tenant's or gone, and a
child outside them is not drawn at all. ``hide`` redacts text naming another
tenant's adapter (a judge in label provenance, a reward model in the
hyper-parameters).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable

from lorabay.hub.cache import blob_key
from lorabay.hub.errors import InvalidReference
from lorabay.hub.manifest import Manifest
from lorabay.hub.reference import parse_reference

MAX_HOPS = 32  # parents followed back; a longer chain (or a loop) ends in a "more" node
CURVE_FILE = "trainer_state.json"  # the transformers Trainer's, with its log_history
MAX_CURVE_BYTES = 4 << 20
HIDDEN = "(not visible to this key)"


def adapter_node(manifest: Manifest, role: str) -> dict:
    return {
        "id": manifest.digest,
        "kind": "adapter",
        "role": role,  # ancestor | self | child
        "ref": manifest.ref,
        "method": (manifest.lineage or {}).get("method"),
    }


def lineage_graph(manifest: Manifest, visible: list[Manifest], hide: Callable) -> dict:
    """The graph the version page draws, oldest on the left."""
    by_digest: dict[str, Manifest] = {}
    for m in visible:
        by_digest.setdefault(m.digest, m)
    chain: list[dict] = []  # the parents, nearest first
    edges: list[dict] = []
    seen = {manifest.digest}
    child, parent_digest = manifest, (manifest.lineage or {}).get("parent_digest")
    while parent_digest:
        parent = by_digest.get(parent_digest)
        if parent_digest in seen or len(chain) >= MAX_HOPS:
            chain.append({"id": f"more:{parent_digest}", "kind": "more", "label": "..."})
            edges.append(edge(chain[-1]["id"], child.digest, child))
            break
        seen.add(parent_digest)
        if parent is None:
            chain.append({"id": parent_digest, "kind": "hidden", "label": HIDDEN})
            edges.append(edge(parent_digest, child.digest, child))
            break
        chain.append(adapter_node(parent, "ancestor"))
        edges.append(edge(parent.digest, child.digest, child))
        child, parent_digest = parent, (parent.lineage or {}).get("parent_digest")
    root = child  # the oldest version drawn: trained on the base itself
    base = {"id": "base", "kind": "base", "label": (root.base or {}).get("id") or "the base"}
    oldest = chain[-1]["id"] if chain else manifest.digest
    to_base = edge("base", oldest, root)
    if chain and chain[-1]["kind"] != "adapter":  # what lies between is not known here
        to_base |= {"label": "", "dashed": True}
    edges.append(to_base)
    nodes = [base, *reversed(chain), adapter_node(manifest, "self")]
    for m in visible:
        if (m.lineage or {}).get("parent_digest") == manifest.digest and m.digest not in seen:
            seen.add(m.digest)
            nodes.append(adapter_node(m, "child"))
            edges.append(edge(manifest.digest, m.digest, m))
    dataset = (manifest.lineage or {}).get("dataset_digest")
    if dataset:
        provenance = (manifest.lineage or {}).get("dataset_provenance")
        nodes.append(
            {
                "id": f"dataset:{dataset}",
                "kind": "dataset",
                "label": str(dataset),
                "made_by": hide((provenance or {}).get("made_by")),
            }
        )
        edges.append({"from": f"dataset:{dataset}", "to": manifest.digest, "label": "data"})
    return {"nodes": nodes, "edges": edges}


def edge(source: str, target: str, trained: Manifest) -> dict:
    """An arrow into ``trained``, labelled with the method that made it."""
    return {"from": source, "to": target, "label": (trained.lineage or {}).get("method") or ""}


def hider(all_names: set[str], allows: Callable[[str], bool]) -> Callable:
    """A function that replaces, in JSON values, every string naming an adapter of the
    registry that ``allows`` refuses (``team-b/judge:1@sha256:...``) with HIDDEN."""

    def names_hidden(text: str) -> bool:
        head = text.split("@", 1)[0].strip()
        try:
            name = parse_reference(head).name
        except (InvalidReference, ValueError):
            return False
        return name in all_names and not allows(name)

    def hide(value):
        if isinstance(value, str):
            return HIDDEN if names_hidden(value) else value
        if isinstance(value, dict):
            return {k: hide(v) for k, v in value.items()}
        if isinstance(value, list):
            return [hide(v) for v in value]
        return value

    return hide


def read_curve(registry, manifest: Manifest) -> list[dict] | None:
    """The training curve a run pushed with its adapter (``trainer_state.json``'s
    ``log_history``: one record per logging step), read from its blob and checked
    against the manifest's sha256; None when the version has none."""
    entry = next((f for f in manifest.files if f["path"] == CURVE_FILE), None)
    if entry is None or entry.get("pieces") or int(entry["size"]) > MAX_CURVE_BYTES:
        return None
    raw = registry.store.read(blob_key(entry["sha256"]))
    if raw is None or hashlib.sha256(raw).hexdigest() != entry["sha256"]:
        return None  # a damaged blob: `lorabay hub verify` reports it
    try:
        history = json.loads(raw).get("log_history")
    except (ValueError, AttributeError, RecursionError):
        return None
    if not isinstance(history, list):
        return None
    points = []
    for record in history:
        if not isinstance(record, dict) or not isinstance(record.get("step"), int | float):
            continue
        numbers = {
            k: v
            for k, v in record.items()
            if isinstance(k, str)
            and isinstance(v, int | float)
            and not isinstance(v, bool)
            and math.isfinite(v)  # NaN is no JSON a browser reads
        }
        if len(numbers) > 1:
            points.append(numbers)
    return points or None
