"""The version manifest: an immutable JSON record of one adapter version.

The digest of a version is the sha256 of its canonical file list
(``[{path, size, sha256, pieces?}]`` sorted by path, compact JSON with sorted keys), so
the same files give the same digest whatever their names in a store, and a manifest
whose files were edited no longer matches its own digest. ``pieces`` (schema 2, files
over 16 MiB: see pieces.py) is part of it, so a pinned digest fixes the piece digests a
pull checks.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields

from lorabay.hub import pieces
from lorabay.hub.errors import DamagedRecord

SCHEMA = 2  # the newest this reads; 2: large files carry piece digests (pieces.py)
KINDS = ("lora", "reward", "prm")  # a plain adapter, an outcome reward model, a PRM
PEFT_KEYS = ("peft_type", "r", "lora_alpha", "target_modules", "modules_to_save")
BASE_KEYS = (
    "id",
    "revision",
    "architecture",
    "hidden_size",
    "num_hidden_layers",
    "vocab_size",
    "config_digest",
    "source",  # where a pulled base's weights came from (hub/bases.py), else None
)
# dataset_provenance (optional, absent from empty_lineage): where labelled training data came
# from, for data `lorabay label` wrote (train/label/provenance.py lineage_entry).
LINEAGE_KEYS = (
    "method", "dataset_digest", "parent_digest", "hyperparameters", "metrics",
    "dataset_provenance",
)  # fmt: skip


def canonical_json(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def digest_files(files: list[dict]) -> str:
    """``sha256:<hex>`` of the canonical file list (sorted by path)."""
    canonical = [
        {"path": f["path"], "size": int(f["size"]), "sha256": f["sha256"]}
        | ({"pieces": f["pieces"]} if f.get("pieces") is not None else {})
        for f in sorted(files, key=lambda f: f["path"])
    ]
    return "sha256:" + hashlib.sha256(canonical_json(canonical)).hexdigest()


def empty_base() -> dict:
    return dict.fromkeys(BASE_KEYS)


def empty_lineage() -> dict:
    return {
        "method": None,
        "dataset_digest": None,
        "parent_digest": None,
        "hyperparameters": {},
        "metrics": {},
    }


@dataclass(frozen=True)
class Manifest:
    """One immutable adapter version. ``files`` is sorted by path."""

    name: str
    version: int
    digest: str
    files: list[dict]
    peft: dict
    base: dict = field(default_factory=empty_base)
    lineage: dict = field(default_factory=empty_lineage)
    kind: str = "lora"
    created_at: str = ""
    created_by: str = ""
    description: str = ""
    labels: dict = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def digest_hex(self) -> str:
        return self.digest.split(":", 1)[1]

    @property
    def size(self) -> int:
        return sum(int(f["size"]) for f in self.files)

    def to_dict(self) -> dict:
        # Schema 1 unless a file has pieces, so older readers still read small adapters.
        schema = 2 if any(f.get("pieces") for f in self.files) else 1
        return {"schema": schema, **asdict(self)}

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        names = [f.name for f in fields(cls)]
        missing = [n for n in ("name", "version", "digest", "files", "peft") if n not in data]
        if missing:
            raise ValueError(f"missing fields {missing}")
        return cls(**{n: data[n] for n in names if n in data})

    @classmethod
    def from_json(cls, raw: bytes, where: str = "?") -> Manifest:
        """Parse and check a stored manifest: its files must hash to its digest."""
        try:
            data = json.loads(raw)
            if data.get("schema", SCHEMA) > SCHEMA:
                raise ValueError(f"schema {data['schema']} is newer than this lorabay reads")
            manifest = cls.from_dict(data)
            for entry in manifest.files:
                pieces.check(entry)
            if digest_files(manifest.files) != manifest.digest:
                raise ValueError("its file list does not match its digest")
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise DamagedRecord(f"manifest {where}", str(error)) from None
        return manifest
