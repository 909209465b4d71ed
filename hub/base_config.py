"""A base model's ``config.json``, read in one place, and the manifest's base record.

    found = read_base_config("./tiny")           # ConfigError naming --base when it is not there
    found.values["hidden_size"], found.text      # the config; a multimodal one's language model
    record = find_base(adapter_config, "./tiny")  # what a pushed manifest says of its base

Readers: a push's base record and ``hub check`` (the shapes a base has), ``lorabay plan``
(sizes without weights), training (the dtype the base stores), the gateway (the base it
serves).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from lorabay.hub.bases import read_provenance
from lorabay.hub.errors import ConfigError
from lorabay.hub.manifest import empty_base

CONFIG_JSON = "config.json"
# What a Llama-style dense decoder's config gives for its linear shapes (llama_shapes).
REQUIRED_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
)


@dataclass(frozen=True)
class BaseConfig:
    """A base's config.json: where it is, its bytes (the manifest keeps their sha256) and
    what they say."""

    path: Path
    raw: bytes
    values: dict

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def text(self) -> dict:
        """The language model's config: a multimodal config nests it as ``text_config``."""
        nested = self.values.get("text_config")
        return nested if isinstance(nested, dict) else self.values

    @property
    def dtype(self) -> str:
        """The dtype the weights are stored in ("float32", "bfloat16", ...)."""
        return str(self.values.get("dtype") or self.values.get("torch_dtype") or "float32")


def read_base_config(base: str | os.PathLike, flag: str | None = "--base") -> BaseConfig:
    """The config.json of a base folder (or the file itself). ConfigError, naming ``flag``
    (the option that gave ``base``) and the fix, when it is missing or not a JSON object."""
    path = Path(base).expanduser()
    if path.is_dir():
        path = path / CONFIG_JSON
    shown = f"{flag} {base}" if flag else str(base)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{shown}: no {CONFIG_JSON} there",
            "give a base folder, its config.json, or a pulled base's name",
        ) from None
    except OSError as error:
        raise ConfigError(f"{shown}: cannot read {path} ({error.strerror})") from None
    try:
        values = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{shown}: {path} is not valid JSON ({error})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{shown}: {path} is not a JSON object")
    return BaseConfig(path, raw, values)


def llama_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear module of one decoder layer."""
    missing = [key for key in REQUIRED_KEYS if key not in config]
    if missing or any(
        k in config for k in ("num_local_experts", "num_experts", "n_routed_experts")
    ):
        what = f"lacks {', '.join(missing)}" if missing else "is a mixture of experts"
        raise ConfigError(
            f"this config ({config.get('model_type', '?')}) {what}",
            "sizes follow for Llama-style dense decoders (llama, mistral, qwen2, ...)",
        )
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    inner = config["intermediate_size"]
    return {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inner),
        "up_proj": (hidden, inner),
        "down_proj": (inner, hidden),
    }


def lora_parameters(config: dict, r: int, modules: list[str] | None = None) -> int:
    """Parameters of a rank-``r`` LoRA on ``modules`` (None: every linear module) of each
    decoder layer: r * (in + out) per module."""
    shapes = llama_shapes(config)
    per_layer = sum(r * sum(shapes[m]) for m in (shapes if modules is None else modules))
    return config["num_hidden_layers"] * per_layer


def local_base_config(base: str | os.PathLike) -> BaseConfig | None:
    """The config of ``base`` when it is a folder holding a config.json; None when it names
    something else (a Hugging Face id, a served name)."""
    folder = Path(base).expanduser()
    return read_base_config(folder) if (folder / CONFIG_JSON).is_file() else None


def describe_base(found: BaseConfig, base_id: str | None, revision: str | None, *, pulled=True):
    """The manifest's base record. A folder that ``lorabay base pull`` wrote names itself
    (``pulled``: look for its provenance): the id (``smollm2-135m-instruct``), the revision
    and the source."""
    text = found.text
    architectures = found.values.get("architectures") or [None]
    provenance = read_provenance(found.folder) if pulled else None
    source = (provenance or {}).get("source")
    if isinstance(source, dict) and provenance.get("name"):
        base_id = provenance["name"]
        revision = source.get("revision") or revision
    return {
        "id": base_id,
        "revision": revision,
        "architecture": architectures[0],
        "hidden_size": text.get("hidden_size"),
        "num_hidden_layers": text.get("num_hidden_layers"),
        "vocab_size": text.get("vocab_size"),
        "config_digest": "sha256:" + hashlib.sha256(found.raw).hexdigest(),
        "source": (
            {key: source.get(key) for key in ("kind", "uri", "sha256", "upstream")}
            if isinstance(source, dict)
            else None
        ),
    }


def find_base(adapter_config: dict, base: str | os.PathLike | None) -> dict:
    """The manifest's ``base`` record: from ``base``'s config.json, else from the adapter's
    ``base_model_name_or_path`` (a local folder, or a repository already in the HF cache);
    with only the id and revision when that config cannot be found offline."""
    base_id = adapter_config.get("base_model_name_or_path")
    revision = adapter_config.get("revision")
    if base is not None:
        found = read_base_config(base)
        return describe_base(found, base_id or str(found.folder), revision)
    if not base_id:
        return empty_base()
    local = local_base_config(base_id)
    if local is not None:
        return describe_base(local, base_id, revision)
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(base_id, CONFIG_JSON, revision=revision)
    except Exception:  # not a repo id; nothing to read offline
        cached = None
    if isinstance(cached, str):
        found = read_base_config(cached, flag=f"{base_id}'s cached")
        return describe_base(found, base_id, revision, pulled=False)
    return {**empty_base(), "id": base_id, "revision": revision}
