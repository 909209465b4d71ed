"""The policy being trained: a base (optionally 4-bit NF4, i.e. QLoRA) with a LoRA adapter.

The reference policy that DPO and PPO compare against is never a second copy of the
base: it is the same model with the adapter disabled, or, for a run that starts
from a parent adapter, a frozen copy of that adapter (``ref``) beside the trainable
one (``default``). :func:`reference_policy` switches to it for a forward pass.

    base, tokenizer = load_base("tiny", quantize="nf4")
    policy = attach_adapter(base, new_lora_config(r=8, alpha=16, targets=["q_proj", "v_proj"]))
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from lorabay.hub.errors import ConfigError

REFERENCE_ADAPTER = "ref"
TRAINED_ADAPTER = "default"


def compute_dtype(base: str | os.PathLike, precision: str):
    """The torch dtype training computes in: ``precision`` fp32/bf16, or auto: bf16 for a
    bf16 base, unless it would be emulated (a CPU without bfloat16 arithmetic and no GPU:
    hub/machine.py, 5-11x slower than fp32 there)."""
    import torch

    from lorabay.hub.base_config import read_base_config
    from lorabay.hub.machine import bf16_is_emulated

    if precision == "auto":
        bf16_base = read_base_config(base).dtype == "bfloat16"
        emulated = not torch.cuda.is_available() and bf16_is_emulated()
        precision = "bf16" if bf16_base and not emulated else "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32


def nf4_config(dtype):
    """bitsandbytes 4-bit NF4 with double quantization (QLoRA, arXiv:2305.14314 section 3)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )


# Task heads trained beside an adapter and saved with it (PEFT ``modules_to_save``) as the
# module ``score``: kind -> (transformers auto class, outputs, PEFT task type). A reward model
# reads one number at the last token; a PRM two classes (wrong, right) at each step separator.
HEAD_MODULE = "score"
HEADS = {
    "reward": ("AutoModelForSequenceClassification", 1, "SEQ_CLS"),
    "prm": ("AutoModelForTokenClassification", 2, "TOKEN_CLS"),
}


def load_base(
    path: str | os.PathLike,
    quantize: str = "none",
    precision: str = "auto",
    head: str | None = None,
):
    """(model, tokenizer) for a base folder; ``quantize="nf4"`` loads the weights in 4 bits.

    ``head`` ("reward" or "prm", see HEADS) loads the base with a new ``score`` head instead
    of its language-model head."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = compute_dtype(path, precision)
    kwargs = {"dtype": dtype}
    if quantize == "nf4":
        kwargs["quantization_config"] = nf4_config(dtype)
        # bitsandbytes quantizes as the weights land on their device: one per rank.
        on_gpu = torch.cuda.is_available()
        kwargs["device_map"] = {
            "": f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if on_gpu else "cpu"
        }
    elif quantize != "none":
        raise ConfigError(f"--quantize {quantize!r} is not one of none, nf4")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if head is None:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs), tokenizer
    auto_class, outputs, _ = HEADS[head]
    with quiet_transformers():  # "score MISSING, lm_head UNEXPECTED" is the point of a head
        model = getattr(transformers, auto_class).from_pretrained(
            path, num_labels=outputs, pad_token_id=tokenizer.pad_token_id, **kwargs
        )
    return model, tokenizer


@contextlib.contextmanager
def quiet_transformers():
    """transformers logs errors only, for a call whose warnings are expected."""
    from transformers.utils import logging as transformers_logging

    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(level)


def new_lora_config(
    r: int, alpha: float, targets: list[str], dropout: float = 0.0, head: str | None = None
):
    """A PEFT LoRA config for a causal LM; ``targets=["all-linear"]`` adapts every linear layer.

    With ``head`` (see HEADS) the ``score`` head is trained too and saved with the adapter."""
    from peft import LoraConfig

    target_modules = "all-linear" if targets == ["all-linear"] else list(targets)
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        bias="none",
        task_type=HEADS[head][2] if head else "CAUSAL_LM",
        modules_to_save=[HEAD_MODULE] if head else None,
    )


def check_targets(model, targets: list[str]) -> None:
    """Refuse target modules the base does not have, naming the ones it does."""
    if targets == ["all-linear"]:
        return
    present = linear_module_names(model)
    missing = [t for t in targets if t not in present]
    if missing:
        raise ConfigError(
            f"--targets {','.join(missing)}: not a linear module of this base",
            f"pick from {','.join(sorted(present))} or all-linear",
        )


def linear_module_names(model) -> list[str]:
    """Leaf names of the base's linear layers, its output heads (lm_head, score) left out:
    what "all-linear" adapts. PEFT's own expansion keeps a token classifier's ``score``."""
    import torch

    present = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        or type(module).__name__ in ("Linear4bit", "Linear8bitLt")
    }
    return sorted(present - {"lm_head", HEAD_MODULE})


def attach_adapter(model, lora_config):
    """The base wrapped as a PeftModel with a new, trainable LoRA adapter named ``default``."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config)


def load_adapter(
    model,
    folder: str | os.PathLike,
    trainable: bool = True,
    dropout: float | None = None,
    head: str | None = None,
):
    """The base wrapped as a PeftModel with the adapter in ``folder`` as ``default``;
    ``head`` (see HEADS): ``model`` carries a new ``score`` head, trained with the adapter."""
    from peft import PeftConfig, PeftModel

    config = PeftConfig.from_pretrained(str(folder))
    if config.peft_type != "LORA":
        raise ConfigError(f"--from {folder}: a {config.peft_type} adapter, not LoRA")
    if dropout is not None:
        config.lora_dropout = dropout
    if head is not None:
        config.task_type, config.modules_to_save = HEADS[head][2], [HEAD_MODULE]
    config.inference_mode = not trainable
    return PeftModel.from_pretrained(model, str(folder), is_trainable=trainable, config=config)


def add_reference_adapter(model) -> None:
    """Add ``ref``: a frozen copy of the ``default`` adapter, the reference policy of a run
    that starts from a parent adapter. The base weights are shared, not copied."""
    model.add_adapter(REFERENCE_ADAPTER, model.peft_config[TRAINED_ADAPTER])
    for name, param in model.named_parameters():
        if f".{TRAINED_ADAPTER}." in name:
            reference = model.get_parameter(
                name.replace(f".{TRAINED_ADAPTER}.", f".{REFERENCE_ADAPTER}.")
            )
            reference.data.copy_(param.data)
            reference.requires_grad_(False)
    model.set_adapter(TRAINED_ADAPTER)  # set_adapter marks only the active adapter trainable


@contextlib.contextmanager
def reference_policy(model):
    """Run forwards as the reference policy: the frozen ``ref`` adapter if there is one,
    else the base with every adapter disabled."""
    if REFERENCE_ADAPTER in model.peft_config:
        previous = model.active_adapter
        model.set_adapter(REFERENCE_ADAPTER)
        try:
            yield model
        finally:
            model.set_adapter(previous)
    else:
        with model.disable_adapter():
            yield model


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as the parameters they stand for."""
    trainable = total = 0
    for param in model.parameters():
        count = param.numel()
        if type(param).__name__ == "Params4bit":
            count = count * 2  # two 4-bit values per stored byte
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total


def save_adapter(
    model, folder: str | os.PathLike, extra_files: dict[str, str] | None = None
) -> Path:
    """Save only the trained ``default`` adapter (adapter_config.json + safetensors) at ``folder``,
    whole or not at all: written in a temporary sibling, then renamed into place.
    ``extra_files`` (name -> text) are written beside it (a head's settings)."""
    from lorabay.hub.atomic import replacing_folder

    folder = Path(folder)
    with replacing_folder(folder) as tmp:
        model.save_pretrained(
            str(tmp), selected_adapters=[TRAINED_ADAPTER], safe_serialization=True
        )
        # PEFT writes a model card with template text; the manifest carries the facts instead.
        (tmp / "README.md").unlink(missing_ok=True)
        config_path = tmp / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["inference_mode"] = True
        config["target_modules"] = short_target_names(model, config["target_modules"])
        if config.get("modules_to_save"):  # PEFT adds names for other architectures ("classifier")
            present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
            config["modules_to_save"] = sorted(set(config["modules_to_save"]) & present) or None
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def short_target_names(model, targets):
    """PEFT records "all-linear" as every full module name ("model.layers.0.mlp.up_proj", ...).
    Write the leaf names instead ("up_proj", ...) when they select exactly the same modules,
    so manifests and `hub show` stay readable; PEFT and vLLM match either by suffix."""
    if isinstance(targets, str) or not targets:
        return targets
    leaves = {t.rsplit(".", 1)[-1] for t in targets}
    selected = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in leaves]
    if all(any(n == t or n.endswith("." + t) for t in targets) for n in selected):
        return sorted(leaves)
    return targets
