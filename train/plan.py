"""Size a LoRA run from a base's config.json alone: no weights are loaded.

For a Llama-style decoder (llama, mistral, qwen2, ...) every number follows from the
config: each layer has q/k/v/o projections and a gated MLP (gate/up/down), LoRA of
rank r on a module of shape (in, out) adds r * (in + out) parameters, and the base
memory is the parameters times their bytes. NF4 is counted as bitsandbytes stores
it: 4 bits per quantized weight, one absmax constant per block of 64 weights
(8 bits with double quantization, plus one fp32 constant per 256 of those), the
code tables per tensor, and the layers it leaves unquantized (embeddings, lm_head,
norms, in the base's dtype: 16 bits for a 7B checkpoint). 1 GB = 10^9 bytes, 1 MB = 10^6 bytes.

    lorabay plan --base llama-2-7b/config.json --r 8 --targets q_proj,v_proj
    # 4,194,304 trainable parameters (0.06%), adapter 8.4 MB in bf16, base 13.5 GB bf16 / 3.9 GB NF4
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

from lorabay.hub.base_config import llama_shapes, lora_parameters, read_base_config
from lorabay.hub.errors import ConfigError

LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
NF4_BLOCK = 64  # weights per absmax constant (bitsandbytes' 4-bit blocksize)
NESTED_BLOCK = 256  # absmax constants per second-level constant (double quantization)
NF4_TENSOR_CONSTANTS = 16 * 4 + 256 * 4 + 4  # NF4 code, 8-bit nested code (fp32), offset
ADAM_BYTES = 8  # two fp32 moments per trainable parameter


def read_model_config(base: str | os.PathLike) -> dict:
    """The language model's config in a base folder's config.json (or the file itself)."""
    return read_base_config(base).text


def parameter_groups(config: dict) -> tuple[int, int]:
    """(parameters in decoder linear layers, all other parameters) of the base."""
    shapes = llama_shapes(config)
    layers = config["num_hidden_layers"]
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    linear = layers * sum(i * o for i, o in shapes.values())
    biases = 0
    if config.get("attention_bias"):
        biases += sum(shapes[m][1] for m in ATTENTION if m != "o_proj")
    if config.get("mlp_bias"):
        biases += sum(shapes[m][1] for m in ("gate_proj", "up_proj", "down_proj"))
    norms = layers * 2 * hidden + hidden
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
    return linear, embeddings + norms + layers * biases


def count_base_parameters(base: str | os.PathLike) -> int:
    linear, other = parameter_groups(read_model_config(base))
    return linear + other


def resolve_targets(targets: list[str]) -> list[str]:
    if targets == ["all-linear"]:
        return list(LINEAR_MODULES)
    unknown = [t for t in targets if t not in LINEAR_MODULES]
    if unknown:
        raise ConfigError(
            f"--targets {','.join(unknown)}: not a module of a Llama-style layer",
            f"pick from {','.join(LINEAR_MODULES)} or all-linear",
        )
    return list(dict.fromkeys(targets))


def safetensors_size(tensors: dict[str, tuple[list[int], int]], dtype: str) -> int:
    """Bytes of a safetensors file holding ``tensors`` (name -> (shape, element bytes)):
    8-byte length, the JSON header padded to 8 bytes, the data. Same dtype: sorted by name."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(tensors):
        shape, size = tensors[name]
        end = offset + math.prod(shape) * size
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":"))
    return 8 + len(text) + (-len(text)) % 8 + offset


def adapter_tensors(config: dict, r: int, targets: list[str], size: int):
    """PEFT's tensor names and shapes for a LoRA adapter (lora_A: (r, in), lora_B: (out, r))."""
    shapes = llama_shapes(config)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module in targets:
            block = "self_attn" if module in ATTENTION else "mlp"
            stem = f"base_model.model.model.layers.{layer}.{block}.{module}"
            fan_in, fan_out = shapes[module]
            tensors[f"{stem}.lora_A.weight"] = ([r, fan_in], size)
            tensors[f"{stem}.lora_B.weight"] = ([fan_out, r], size)
    return tensors


def nf4_bytes(config: dict, double_quant: bool = True) -> int:
    """Bytes of the base loaded by bitsandbytes in NF4: packed weights, their constants,
    and the layers it leaves unquantized (lm_head, embeddings and norms)."""
    shapes = llama_shapes(config)
    total = 0
    for fan_in, fan_out in shapes.values():
        weights = fan_in * fan_out
        blocks = math.ceil(weights / NF4_BLOCK)
        constants = blocks + 4 * math.ceil(blocks / NESTED_BLOCK) if double_quant else 4 * blocks
        total += math.ceil(weights / 2) + constants + NF4_TENSOR_CONSTANTS
    total *= config["num_hidden_layers"]
    _, other = parameter_groups(config)
    return total + stored_bytes(config) * other


def stored_bytes(config: dict) -> int:
    """Bytes per weight in the dtype the base is stored in (2 unless it says float32)."""
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16")
    return 4 if dtype in ("float32", "torch.float32") else 2


@dataclass(frozen=True)
class Plan:
    """The sizes of one LoRA run; every byte count is exact for the layout described above."""

    architecture: str
    layers: int
    hidden_size: int
    r: int
    targets: list[str]
    adapted_modules: int
    base_parameters: int
    trainable_parameters: int
    trainable_percent: float
    adapter_bytes_bf16: int
    adapter_bytes_fp32: int
    base_bytes_bf16: int
    base_bytes_fp32: int
    base_bytes_nf4: int  # real: with the double-quantized constants
    base_bytes_nf4_nominal: int  # 4 bits for every parameter, nothing else
    quantize: str
    train_bytes_lora: int  # base as loaded + adapter weights, gradients, AdamW moments (fp32)
    train_bytes_full: int  # full fine-tune: bf16 weights and gradients, fp32 master + AdamW

    def to_dict(self) -> dict:
        return asdict(self)


def plan_lora(base: str | os.PathLike, r: int, targets: list[str], quantize: str = "none") -> Plan:
    """Size a LoRA (``quantize="nf4"``: QLoRA) run of rank ``r`` on ``targets`` for ``base``."""
    if r < 1:
        raise ConfigError(f"--r must be at least 1, got {r}")
    if quantize not in ("none", "nf4"):
        raise ConfigError(f"--quantize must be none or nf4, got {quantize!r}")
    config = read_model_config(base)
    modules = resolve_targets(targets)
    layers = config["num_hidden_layers"]
    linear, other = parameter_groups(config)
    total = linear + other
    trainable = lora_parameters(config, r, modules)
    bf16 = safetensors_size(adapter_tensors(config, r, modules, 2), "BF16")
    fp32 = safetensors_size(adapter_tensors(config, r, modules, 4), "F32")
    nf4 = nf4_bytes(config)
    loaded = nf4 if quantize == "nf4" else 2 * total
    return Plan(
        architecture=(config.get("architectures") or [config.get("model_type", "?")])[0],
        layers=layers,
        hidden_size=config["hidden_size"],
        r=r,
        targets=modules,
        adapted_modules=layers * len(modules),
        base_parameters=total,
        trainable_parameters=trainable,
        trainable_percent=100 * trainable / total,
        adapter_bytes_bf16=bf16,
        adapter_bytes_fp32=fp32,
        base_bytes_bf16=2 * total,
        base_bytes_fp32=4 * total,
        base_bytes_nf4=nf4,
        base_bytes_nf4_nominal=total // 2,
        quantize=quantize,
        train_bytes_lora=loaded + trainable * (4 + 4 + ADAM_BYTES),
        train_bytes_full=total * (2 + 2 + 4 + ADAM_BYTES),
    )


def human_bytes(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            decimals = 2 if unit == "GB" or count < 10 * scale else 1
            return f"{count / scale:.{decimals}f} {unit}"
    return f"{count} B"


def format_plan(plan: Plan) -> list[str]:
    """The plan as lines for people (the CLI prints them)."""
    lora_base = "NF4 base" if plan.quantize == "nf4" else "bf16 base"
    return [
        f"base             {plan.architecture}, {plan.layers} layers, hidden {plan.hidden_size}: "
        f"{plan.base_parameters:,} parameters",
        f"LoRA             r={plan.r} on {','.join(plan.targets)} ({plan.adapted_modules} modules)",
        f"trainable        {plan.trainable_parameters:,} ({plan.trainable_percent:.2f}% of the base)",
        f"adapter on disk  {human_bytes(plan.adapter_bytes_bf16)} in bf16 "
        f"({human_bytes(plan.adapter_bytes_fp32)} in fp32), safetensors",
        f"base memory      bf16 {human_bytes(plan.base_bytes_bf16)}; "
        f"NF4 {human_bytes(plan.base_bytes_nf4)} with its double-quantized constants "
        f"and unquantized embeddings/norms (nominal 4 bits x parameters: "
        f"{human_bytes(plan.base_bytes_nf4_nominal)})",
        f"training memory  {'QLoRA' if plan.quantize == 'nf4' else 'LoRA'}: "
        f"{human_bytes(plan.train_bytes_lora)} ({lora_base} + adapter weights, gradients, "
        f"AdamW states; activations extra)",
        f"full fine-tune   {plan.base_parameters:,} trainable (100%); checkpoint "
        f"{human_bytes(plan.base_bytes_bf16)} in bf16; "
        f"{human_bytes(plan.train_bytes_full)} for weights, gradients and AdamW states",
    ]
