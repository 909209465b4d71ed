"""Reward models and process reward models as adapters beside a policy, on one base.

A reward model (``lorabay train reward``) or a PRM (``lorabay train prm``) comes in two
formats. A generative verifier (the default) is a plain LoRA with a ``verifier.json``:
its "head" is the output layer's rows of its two label tokens, read one position before
each marker (lorabay.hub.verifier); the serving engine runs it too. The older format is a
LoRA adapter plus a ``score`` head (saved through PEFT ``modules_to_save``) and a
``head.json`` that says what the head reads. Training loads the base as a sequence or
token classifier; here the same adapter is loaded under its own name into a causal-LM
PeftModel, so PPO keeps ONE base in memory for policy, reference and reward: switch
to the adapter, run the decoder, apply the head to its last hidden states. That is
exactly what ``LlamaForSequenceClassification`` / ``...ForTokenClassification`` compute
(decoder -> final norm -> ``score``), checked in tests/train/test_prm.py.

    model, tokenizer = load_base("tiny")
    model, prm = attach_head(model, resolve_adapter("team/prm:1"), "prm")
    step_probabilities(prm, tokenizer, ["2+2=?"], [["2+2 is 4", "so 4"]])  # [[0.97, 0.95]]

Inputs are built the way training built them: a reward model reads prompt + response
tokenized as TRL's RewardTrainer does (chat template, or text + EOS) at the last
non-pad token; a PRM reads prompt + each step followed by the separator, and a step's
probability of being right at the separator's last token (:func:`step_input`).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

from lorabay.hub.errors import ConfigError
from lorabay.train.model import HEAD_MODULE, HEADS

HEAD_FILE = "head.json"
IGNORE = -100  # label of every token the PRM loss skips (torch's cross-entropy ignore_index)
NAMES = {"reward": "reward model", "prm": "process reward model", "lora": "plain adapter"}


def head_settings(kind: str, step_separator: str | None = None) -> dict:
    """What ``head.json`` records: the head's kind, module, outputs (and a PRM's separator)."""
    settings = {"kind": kind, "module": HEAD_MODULE, "outputs": HEADS[kind][1]}
    if step_separator is not None:
        settings["step_separator"] = step_separator
    return settings


def head_files(kind: str, step_separator: str | None = None) -> dict[str, str]:
    """The files a head adapter carries beside its weights: {"head.json": text}."""
    return {HEAD_FILE: json.dumps(head_settings(kind, step_separator), indent=2) + "\n"}


def read_head_settings(folder: Path, flag: str, ref: str) -> dict:
    """What a verifier adapter's head reads: ``verifier.json`` of a generative verifier
    (``format: generative``), else the score head's ``head.json``."""
    from lorabay.hub.verifier import read_verifier_spec

    spec = read_verifier_spec(folder)
    if spec is not None:
        return spec.to_json()
    path = Path(folder) / HEAD_FILE
    if not path.is_file():
        raise ConfigError(
            f"{flag} {ref}: a plain adapter, not a reward model or PRM (no {HEAD_FILE})",
            "train one with `lorabay train reward` or `lorabay train prm`",
        )
    return json.loads(path.read_text())


@dataclass
class Head:
    """An adapter with a score head, attached under ``name`` to a shared PeftModel."""

    model: object  # the PeftModel that holds this adapter (and maybe a policy)
    name: str
    linear: object  # torch.nn.Linear(hidden, outputs), float32, frozen
    settings: dict

    def outputs(self, input_ids, attention_mask):
        """(B, L, outputs) head outputs at every position, with this adapter active."""
        import torch

        with torch.no_grad(), using_adapter(self.model, self.name):
            hidden = decoder_states(self.model, input_ids, attention_mask)  # (B, L, H)
            return self.linear(hidden.float())


def attach_head(model, parent, name: str, kind: str | None = None, flag: str = "--reward"):
    """(PeftModel, Head): the adapter of ``parent`` (a run.Parent) loaded into ``model`` as
    ``name`` (frozen), and its score head. ``kind``: refuse any other kind of adapter."""
    import torch
    from peft import PeftConfig, PeftModel
    from safetensors.torch import load_file

    settings = check_head(parent, kind, flag)
    config = PeftConfig.from_pretrained(str(parent.folder))
    # The LoRA part only: the head is no module of a causal LM; it is read separately below.
    config.task_type, config.modules_to_save, config.inference_mode = "CAUSAL_LM", None, True
    if isinstance(model, PeftModel):
        model.load_adapter(str(parent.folder), adapter_name=name, peft_config=config)
    else:
        model = PeftModel.from_pretrained(
            model, str(parent.folder), adapter_name=name, config=config
        )
    if is_generative(settings):
        weight, bias = label_rows(model, settings)
    else:
        weights = load_file(str(parent.folder / "adapter_model.safetensors"))
        prefix = f"base_model.model.{settings.get('module', HEAD_MODULE)}"
        weight, bias = weights[f"{prefix}.weight"], weights.get(f"{prefix}.bias")
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight.float())
        if bias is not None:
            linear.bias.copy_(bias.float())
    linear.requires_grad_(False)
    device = next(p.device for p in model.parameters())
    return model, Head(model, name, linear.to(device), settings)


def is_generative(settings: dict) -> bool:
    return settings.get("format") == "generative"


def label_rows(model, settings: dict):
    """(weight (2, H), bias or None): a generative verifier's "head", the output layer's rows
    of its (bad, good) label tokens: softmax over them is p(wrong), p(right), the verdict
    lorabay.hub.verifier defines, so every reader below treats both formats alike."""
    output = model.get_output_embeddings()
    rows = [settings["bad_id"], settings["good_id"]]
    bias = getattr(output, "bias", None)
    return output.weight[rows].detach(), None if bias is None else bias[rows].detach()


def check_head(parent, kind: str | None, flag: str) -> dict:
    """``parent``'s head settings; ConfigError unless it is a head adapter of ``kind``."""
    settings = read_head_settings(parent.folder, flag, parent.ref)
    found = parent.kind if parent.kind not in (None, "lora") else settings["kind"]
    if kind is not None and found != kind:
        raise ConfigError(
            f"{flag} {parent.ref} is a {NAMES.get(found, found)}, not a {NAMES[kind]}",
            f"give a {NAMES[kind]} (`lorabay train {kind}` makes one)",
        )
    return settings


@contextlib.contextmanager
def using_adapter(model, name: str):
    """Run forwards with adapter ``name`` active (frozen), then switch back."""
    previous = model.active_adapter
    model.set_adapter(name, inference_mode=True)
    try:
        yield model
    finally:
        model.set_adapter(previous)  # set_adapter makes the policy trainable again


def decoder_states(model, input_ids, attention_mask, position_ids=None):
    """(B, L, H) last hidden states of the decoder (after its final norm), without the LM head."""
    decoder = model.get_base_model().base_model  # LlamaModel in LlamaForCausalLM, and so on
    return decoder(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
    ).last_hidden_state


def pad_right(sequences: list[list[int]], pad_id: int, device=None):
    """(ids (B, L), attention mask (B, L)) for token lists, padded on the right."""
    import torch

    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        mask[row, : len(sequence)] = 1
    return ids.to(device), mask.to(device)


# ---------------------------------------------------------------- reward models


def reward_input(tokenizer, prompt, response: str) -> list[int]:
    """prompt + response as TRL's RewardTrainer tokenizes a pair's side: a message list through
    the chat template, text with an EOS appended."""
    if isinstance(prompt, list):
        messages = prompt + [{"role": "assistant", "content": response}]
        return list(
            tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        )
    text = prompt + response
    if not text.endswith(tokenizer.eos_token):
        text += tokenizer.eos_token
    return tokenizer(text)["input_ids"]


def reward_scores(head: Head, tokenizer, prompts: list, responses: list[str]):
    """(B,) the reward model's score of each (prompt, response)."""
    import torch

    if is_generative(head.settings):
        read = verifier_reads(head, tokenizer, prompts, [[r] for r in responses])
        return torch.tensor([row[0] for row in read])
    sequences = [reward_input(tokenizer, p, r) for p, r in zip(prompts, responses, strict=True)]
    device = head.linear.weight.device
    ids, mask = pad_right(sequences, tokenizer.pad_token_id, device)
    scores = head.outputs(ids, mask)[..., 0]  # (B, L)
    # The sequence classifier's rule: the last token that is not the pad token (an appended
    # EOS equal to the pad token is skipped, as it was in training).
    positions = torch.arange(ids.shape[1], device=device)
    last = (positions * (ids != tokenizer.pad_token_id)).argmax(-1)  # (B,)
    return scores[torch.arange(len(sequences), device=device), last]


# ---------------------------------------------------------------- process reward models


def step_input(tokenizer, prompt, steps: list[str], separator: str) -> tuple[list[int], list[int]]:
    """(token ids, index of each step's label token): the prompt, then every step followed by
    the separator; a step's label sits on the separator's last token."""
    from lorabay.train.evaluate import prompt_ids

    ids = list(prompt_ids(tokenizer, prompt))
    separator_ids = tokenizer(separator, add_special_tokens=False)["input_ids"]
    ends = []
    for step in steps:
        ids += tokenizer(step, add_special_tokens=False)["input_ids"] + separator_ids
        ends.append(len(ids) - 1)
    return ids, ends


def step_probabilities(head: Head, tokenizer, prompts: list, step_lists: list[list[str]]):
    """For each solution, the PRM's probability that each of its steps is right."""
    import torch

    if is_generative(head.settings):
        return verifier_reads(head, tokenizer, prompts, step_lists)
    separator = head.settings["step_separator"]
    built = [
        step_input(tokenizer, p, s, separator) for p, s in zip(prompts, step_lists, strict=True)
    ]
    if not built:
        return []
    device = head.linear.weight.device
    ids, mask = pad_right([ids for ids, _ in built], tokenizer.pad_token_id, device)
    right = torch.softmax(head.outputs(ids, mask), dim=-1)[..., 1]  # (B, L): p(step right)
    return [[float(right[row, end]) for end in ends] for row, (_, ends) in enumerate(built)]


def split_steps(text: str, separator: str) -> list[str]:
    """A response's steps: its text cut at the separator, empty pieces dropped."""
    return [step for step in text.split(separator) if step.strip()]


def verifier_reads(head: Head, tokenizer, prompts: list, step_lists: list[list[str]]):
    """A generative verifier's p(right) for each step of each solution: the label softmax
    one position before each marker (lorabay.hub.verifier), in one batched forward."""
    import torch

    from lorabay.hub.verifier import VerifierSpec
    from lorabay.train.verifier import verifier_input

    spec = VerifierSpec.from_json(head.settings)
    built = [
        verifier_input(tokenizer, spec, p, s) for p, s in zip(prompts, step_lists, strict=True)
    ]
    if not built:
        return []
    device = head.linear.weight.device
    ids, mask = pad_right([ids for ids, _ in built], tokenizer.pad_token_id, device)
    right = torch.softmax(head.outputs(ids, mask), dim=-1)[..., 1]  # (B, L): p(right)
    return [[float(right[row, m - 1]) for m in markers] for row, (_, markers) in enumerate(built)]
