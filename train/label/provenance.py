"""What made a labelled file, written beside it, and carried into a trained adapter's lineage.

`lorabay label --out labels.jsonl` writes ``labels.provenance.json``: the judge and the
policy as the endpoint served them (``name:version`` and digest on a lorabay gateway),
the constitution's sha256, the sampling settings, and the counts kept and dropped. It
names the labelled file's own sha256, so `lorabay train` records it only for exactly
that file: an edited file no longer matches its provenance, and a lineage that claimed
it did would lie.

    provenance = data_provenance("labels.jsonl", dataset_digest("labels.jsonl"))
    # -> the compact entry the lineage keeps (``lineage["dataset_provenance"]``), or None
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from lorabay.hub.atomic import write_atomically

KIND = "lorabay.label"
SCHEMA = 1

log = logging.getLogger("lorabay.train")


def provenance_path(data: str | os.PathLike) -> Path:
    """``labels.jsonl`` -> ``labels.provenance.json`` (beside it)."""
    return Path(data).with_suffix(".provenance.json")


def write_provenance(path: Path, provenance: dict) -> Path:
    """Write the provenance whole or not at all (a temporary file, then a rename)."""
    return write_atomically(path, json.dumps(provenance, indent=2, sort_keys=False) + "\n")


def data_provenance(data: str | os.PathLike, dataset_digest: str) -> dict | None:
    """The lineage entry for training data `lorabay label` wrote, or None for other data.

    A provenance file that describes other bytes (the labels were edited since) is not
    recorded, and a warning says so.
    """
    path = provenance_path(data)
    if not path.is_file():
        return None
    raw = path.read_bytes()
    try:
        provenance = json.loads(raw)
    except ValueError:
        log.warning(
            "%s is not valid JSON: the lineage will not name where the data came from", path
        )
        return None
    if not isinstance(provenance, dict) or provenance.get("kind") != KIND:
        return None
    described = (provenance.get("output") or {}).get("digest")
    if described != dataset_digest:
        log.warning(
            "%s describes other data (%s, the file is %s): the labels were changed after "
            "`lorabay label` wrote them, so the lineage will not claim where they came from",
            path,
            described,
            dataset_digest,
        )
        return None
    return lineage_entry(provenance, path.name, "sha256:" + hashlib.sha256(raw).hexdigest())


def lineage_entry(provenance: dict, file: str, digest: str) -> dict:
    """The few facts `lorabay hub show` prints; the whole record is the file (``digest``)."""
    counts = provenance.get("counts") or {}
    constitution = provenance.get("constitution") or {}
    return {
        "made_by": f"lorabay label --mode {provenance.get('mode')}",
        "judge": model_label(provenance.get("judge") or {}),
        "policy": model_label(provenance.get("policy") or {}),
        "constitution": constitution.get("name"),
        "constitution_sha256": constitution.get("sha256"),
        "records": counts.get("records"),
        "dropped": counts.get("dropped_total"),
        "provenance": file,
        "provenance_sha256": digest,
    }


def model_label(pinned: dict) -> str | None:
    """``name:version@sha256:...`` when the endpoint said, else the id it served."""
    if pinned.get("ref") and pinned.get("digest"):
        return f"{pinned['ref']}@{pinned['digest']}"
    return pinned.get("served") or pinned.get("requested")
