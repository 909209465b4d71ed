"""Does an adapter fit a base? Every reason it does not, from headers only.

Compares the adapter's recorded base (architecture, hidden size, layer count,
vocabulary) with the base's ``config.json``, and the adapter's tensors with the
base's weight shapes read from the safetensors headers (no weights are loaded):
each target module must exist in the base, and ``lora_A``/``lora_B`` must match
the in/out features of the module they attach to.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from lorabay.hub.base_config import read_base_config
from lorabay.hub.bases import read_provenance, source_digest
from lorabay.hub.content import (
    LORA_TENSOR,
    WEIGHTS_FILE,
    AdapterContent,
    read_tensor_shapes,
)
from lorabay.hub.errors import LorabayError
from lorabay.hub.manifest import Manifest

PEFT_PREFIX = "base_model.model."
MAX_SHAPE_REASONS = 5


def read_base_shapes(folder: Path) -> dict[str, list[int]] | None:
    """Weight name -> shape for a base folder's safetensors (single file or sharded)."""
    single = folder / "model.safetensors"
    if single.is_file():
        return read_tensor_shapes(single)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        shapes: dict[str, list[int]] = {}
        for shard in shards:
            shapes.update(read_tensor_shapes(folder / shard))
        return shapes
    return None


def compare_config(recorded: dict, config: dict) -> list[str]:
    """What a base's config.json (``values`` of a :class:`BaseConfig`) says against what the
    adapter's base record says it was trained on."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    actual = {
        "architecture": (config.get("architectures") or [None])[0],
        "hidden_size": text.get("hidden_size"),
        "num_hidden_layers": text.get("num_hidden_layers"),
        "vocab_size": text.get("vocab_size"),
    }
    words = {
        "architecture": "architecture",
        "hidden_size": "hidden size",
        "num_hidden_layers": "layer count",
        "vocab_size": "vocabulary size",
    }
    return [
        f"{words[key]}: adapter was trained on {recorded[key]}, base has {actual[key]}"
        for key in words
        if recorded.get(key) is not None
        and actual[key] is not None
        and recorded[key] != actual[key]
    ]


def compare_source(recorded: dict, provenance: dict | None) -> list[str]:
    """Same shapes are not the same weights: where both the adapter's base record and the
    base folder's provenance (``lorabay base pull``) name a source, they must agree."""
    trained_on, base_has = source_digest(recorded), source_digest(provenance)
    if not trained_on or not base_has or trained_on == base_has:
        return []
    name = (provenance or {}).get("name") or "this base"
    return [
        f"weights: adapter was trained on {recorded.get('id')} ({trained_on[:19]}), "
        f"the base is {name} ({base_has[:19]})"
    ]


def missing_targets(targets, modules: set[str]) -> list[str]:
    if isinstance(targets, str):  # PEFT: a string is a regex matched against full names
        if not any(re.fullmatch(targets, m) for m in modules):
            return [f"target_modules pattern {targets!r} matches no module of the base"]
        return []
    return [
        f"target module {t!r} is not in the base"
        for t in targets or []
        if not any(m == t or m.endswith("." + t) for m in modules)
    ]


def compare_shapes(
    adapter: dict[str, list[int]],
    base: dict[str, list[int]],
    heads: tuple[str, ...] = (),
    hidden_size: int | None = None,
) -> list[str]:
    """``heads``: modules_to_save the base may lack, a task head the adapter brings
    (the ``score`` of a reward model or PRM); each must read ``hidden_size`` features."""
    reasons: list[str] = []
    for key, shape in sorted(adapter.items()):
        match = LORA_TENSOR.search(key)
        module = key[: match.start()] if match else key.rsplit(".", 1)[0]
        module = module.removeprefix(PEFT_PREFIX)
        weight = base.get(f"{module}.weight")
        if weight is None and not match and module.rsplit(".", 1)[-1] in heads:
            if key.endswith(".weight") and hidden_size and shape[-1] != hidden_size:
                reasons.append(
                    f"head {key} reads {shape[-1]} features, the base's hidden size is {hidden_size}"
                )
            continue
        if weight is None:
            reasons.append(f"module {module} (from the adapter) is not in the base")
            continue
        if not match:  # modules_to_save: a full copy of the base's tensor
            base_shape = base.get(key.removeprefix(PEFT_PREFIX))
            if base_shape is not None and base_shape != shape:
                reasons.append(f"{key} has shape {shape}, the base has {base_shape}")
            continue
        embedding, side = bool(match.group(1)), match.group(2)
        # Linear weight is [out, in]; embedding weight is [num_embeddings, dim].
        # lora_A: [r, in] (embedding: [r, num_embeddings]); lora_B: [out, r] ([dim, r]).
        if side == "A":
            want, got = (weight[0] if embedding else weight[1]), shape[1]
            what = "rows" if embedding else "in_features"
        else:
            want, got = (weight[1] if embedding else weight[0]), shape[0]
            what = "dim" if embedding else "out_features"
        if want != got:
            reasons.append(f"{key} expects {what}={got}, the base's {module} has {want}")
    if len(reasons) > MAX_SHAPE_REASONS:
        more = len(reasons) - MAX_SHAPE_REASONS
        reasons = reasons[:MAX_SHAPE_REASONS] + [f"... and {more} more tensor mismatches"]
    return reasons


def fit_reasons(
    peft: dict,
    recorded_base: dict | None,
    shapes: dict[str, list[int]],
    base_path: str | os.PathLike,
    max_rank: int | None,
) -> list[str]:
    found = read_base_config(base_path)
    reasons = compare_config(recorded_base or {}, found.values)
    reasons += compare_source(recorded_base or {}, read_provenance(found.folder))
    ranks = [s[0] for k, s in shapes.items() if (m := LORA_TENSOR.search(k)) and m[2] == "A"]
    rank = max(ranks + [int(peft.get("r") or 0)])
    if max_rank is not None and rank > max_rank:
        reasons.append(f"rank {rank} is above the maximum {max_rank} (--max-lora-rank)")
    base_shapes = read_base_shapes(found.folder)
    if base_shapes is not None:
        modules = {k.removesuffix(".weight") for k in base_shapes if k.endswith(".weight")}
        missing = missing_targets(peft.get("target_modules"), modules)
        reasons += missing
        if not missing:
            heads = tuple(peft.get("modules_to_save") or ())
            hidden_size = found.text.get("hidden_size")
            reasons += compare_shapes(shapes, base_shapes, heads, hidden_size)
    return reasons


def refusal_if_it_raises(check: Callable[[], list[str]]) -> list[str]:
    """Run a check; an input no rule foresaw (a stored manifest from before a rule, an odd
    base index) becomes one reason, so a push is refused and the gateway answers 4xx,
    never a traceback or a 500."""
    try:
        return check()
    except LorabayError:
        raise
    except Exception as error:  # noqa: BLE001 - see the docstring
        text = str(error).splitlines()[0][:200] if str(error) else ""
        return [f"the adapter could not be checked ({type(error).__name__}: {text})"]


def check_content_against_base(content: AdapterContent, base: str | os.PathLike) -> list[str]:
    """At push with ``--base``: the record comes from that base, so only tensors can disagree."""
    return refusal_if_it_raises(
        lambda: fit_reasons(content.peft(), None, content.shapes, base, None)
    )


def check_manifest_against_base(
    manifest: Manifest, folder: Path, base_path: str | os.PathLike, max_rank: int | None
) -> list[str]:
    def check() -> list[str]:
        shapes = read_tensor_shapes(folder / WEIGHTS_FILE)
        return fit_reasons(manifest.peft, manifest.base, shapes, base_path, max_rank)

    return refusal_if_it_raises(check)
