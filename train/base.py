"""Build a Llama-architecture base model from scratch, for tests, the demo and benchmarks.

Nothing is downloaded: the weights are a seeded random init and the tokenizer is a
byte-level BPE trained on ``assets/corpus.txt``. The folder holds the files
transformers, PEFT and vLLM load (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, generation_config.json). The same seed gives the same bytes.

    lorabay base create /tmp/tiny --size tiny
    python -c "from lorabay.train.base import create_base; create_base('/tmp/tiny')"
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from lorabay.hub.atomic import replacing_folder
from lorabay.hub.errors import ConfigError

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML. The {% generation %} markers let TRL compute an assistant-only loss mask.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class BaseSize:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    dtype: str  # the dtype the weights are stored in


SIZES = {
    # ~2.2M parameters, head dim 64 with grouped-query attention; float32 so tests
    # can compare vLLM against transformers token for token.
    "tiny": BaseSize(2048, 256, 512, 2, 4, 2, 1024, "float32"),
    # ~155M parameters, head dim 64 (the benchmark base; stored in bf16).
    "small": BaseSize(32000, 768, 2816, 12, 12, 12, 2048, "bfloat16"),
}


def train_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on the packaged corpus, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = resources.files("lorabay.train").joinpath("assets/corpus.txt").read_text()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=None,
    )


def create_base(
    path: str | os.PathLike, size: str = "tiny", seed: int = 0, overwrite: bool = False
) -> Path:
    """Write a new base model folder at ``path`` and return it.

    The folder appears whole or not at all: it is built in a temporary sibling and
    renamed into place.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one small shard: no "Writing model shards" bar

    if size not in SIZES:
        raise ConfigError(f"--size {size!r} is not one of {', '.join(SIZES)}")
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise ConfigError(
            f"{path} exists and is not empty", "pick a new folder or pass --overwrite"
        )
    spec = SIZES[size]

    tokenizer = train_tokenizer(spec.vocab_size)
    assert len(tokenizer) <= spec.vocab_size
    eos_ids = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    config = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.hidden_size // spec.num_attention_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=eos_ids[0],
        pad_token_id=tokenizer.pad_token_id,
        dtype=spec.dtype,
    )
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(getattr(torch, spec.dtype))
    model.generation_config = GenerationConfig(
        eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )

    with replacing_folder(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "lorabay_base.json").write_text(json.dumps({"size": size, "seed": seed}) + "\n")
    return path


def count_parameters(path: str | os.PathLike) -> int:
    """Parameters stored in a base folder, read from the safetensors header (no weights loaded)."""
    from math import prod

    from safetensors import safe_open

    with safe_open(Path(path) / "model.safetensors", "pt") as f:
        return sum(prod(f.get_slice(name).get_shape()) for name in f.keys())
