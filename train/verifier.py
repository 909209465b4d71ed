"""Train generative verifiers: reward models and PRMs that the serving engine runs.

``lorabay train prm`` and ``lorabay train reward`` (``--format generative``, the default)
train a plain causal-LM LoRA whose verdict is read from two label tokens at marker
positions (the layout and why: :mod:`lorabay.hub.verifier`). Data:

- a PRM reads each step of Math-Shepherd / PRM800K records
  ``{"prompt", "completions": [step, ...], "labels": [bool, ...]}``; a step's label
  sits on its marker;
- an outcome reward model reads preference pairs ``{"prompt", "chosen", "rejected"}``
  as two labelled responses, chosen right and rejected wrong: pointwise, as generative
  verifiers are trained ("Generative Verifiers", arXiv:2408.15240), so its score is a
  probability a weighted vote can add up.

The loss is the cross-entropy over the two labels at every marker,

    loss = - mean over markers m of log sigmoid(+-(logit[good] - logit[bad]) at m - 1)

computed from the decoder's last hidden states and only the two label rows of the base's
output layer (never the full-vocabulary logits). Nothing but the LoRA is trained: the
adapter is an ordinary one, saved with ``verifier.json``, pushed as kind ``prm`` or
``reward``.

    lorabay train prm --base ./tiny --data steps.jsonl --push team/prm
    lorabay score --base ./tiny --prm team/prm --prompt "2+2=?" --steps steps.txt
"""

from __future__ import annotations

import json

from lorabay.hub.errors import ConfigError
from lorabay.hub.verifier import VERIFIER_FILE, VerifierSpec

# Label pairs tried in order: the first whose two texts are one token each in the base's
# vocabulary. Math-Shepherd's "+"/"-" first.
LABEL_PAIRS = (("+", "-"), (" +", " -"), ("Yes", "No"), (" Yes", " No"), ("yes", "no"))
OUTCOME_SEPARATOR = "\n"  # what closes a whole response before an outcome RM's marker
IGNORE = -100  # the label of every position without a marker


def single_token(tokenizer, text: str) -> int | None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def end_token_ids(tokenizer) -> list[int]:
    """The tokens that end a response (EOS, a chat template's end of turn): stripped from a
    sampled response before a verifier reads it."""
    found = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    unknown = tokenizer.unk_token_id
    return sorted({i for i in found if isinstance(i, int) and i >= 0 and i != unknown})


def make_spec(tokenizer, kind: str, separator: str) -> VerifierSpec:
    """The spec of a new verifier of ``kind`` on this tokenizer's base."""
    for good, bad in LABEL_PAIRS:
        good_id, bad_id = single_token(tokenizer, good), single_token(tokenizer, bad)
        if good_id is not None and bad_id is not None and good_id != bad_id:
            break
    else:
        raise ConfigError(
            "the base's vocabulary has none of the label pairs "
            + ", ".join(f"{g!r}/{b!r}" for g, b in LABEL_PAIRS)
            + " as single tokens",
            "train a head verifier instead: --format head",
        )
    separator_ids = tokenizer(separator, add_special_tokens=False)["input_ids"]
    if not separator_ids:
        raise ConfigError(f"--step-separator {separator!r} is no token of this base")
    return VerifierSpec(
        kind=kind,
        good_token=good,
        good_id=good_id,
        bad_token=bad,
        bad_id=bad_id,
        step_separator=separator,
        separator_ids=tuple(separator_ids),
        end_ids=tuple(end_token_ids(tokenizer)),
    )


def spec_files(spec: VerifierSpec) -> dict[str, str]:
    return {VERIFIER_FILE: json.dumps(spec.to_json(), indent=2) + "\n"}


def response_steps(spec: VerifierSpec, response: str) -> list[str]:
    """The steps a verifier reads in a response's text (lorabay.hub.verifier): a PRM's
    steps at the separator, an outcome RM's one step, the whole response."""
    return spec.split_text(response)


def verifier_input(tokenizer, spec: VerifierSpec, prompt, steps: list[str]):
    """(ids, markers) for a prompt (text, or messages through the chat template) and step
    texts, each tokenized on its own, as the policy's tokens are split in the gateway."""
    from lorabay.train.evaluate import prompt_ids

    step_ids = [tokenizer(step, add_special_tokens=False)["input_ids"] for step in steps]
    return spec.marked_input(prompt_ids(tokenizer, prompt), step_ids)


# ---------------------------------------------------------------- training data


def labelled_row(ids: list[int], markers: list[int], labels: list[bool], max_length: int):
    """{input_ids, labels}: 1/0 (right/wrong) at each marker, IGNORE elsewhere; cut at
    ``max_length`` (the markers past the cut lose their labels)."""
    row = [IGNORE] * len(ids)
    for marker, right in zip(markers, labels, strict=True):
        row[marker] = int(right)
    return {"input_ids": ids[:max_length], "labels": row[:max_length]}


def step_rows(records: list[dict], tokenizer, spec: VerifierSpec, max_length: int) -> list[dict]:
    rows = []
    for record in records:
        ids, markers = verifier_input(tokenizer, spec, record["prompt"], record["completions"])
        rows.append(labelled_row(ids, markers, record["labels"], max_length))
    return rows


def pair_rows(records: list[dict], tokenizer, spec: VerifierSpec, max_length: int) -> list[dict]:
    """Two rows per preference pair: the chosen response right, the rejected one wrong."""
    rows = []
    for record in records:
        prompt, chosen, rejected = pair_parts(record)
        for response, right in ((chosen, True), (rejected, False)):
            ids, markers = verifier_input(tokenizer, spec, prompt, [response])
            rows.append(labelled_row(ids, markers, [right], max_length))
    return rows


def pair_parts(record: dict):
    """(prompt, chosen text, rejected text) of a preference record: explicit prompts (text or
    messages), or full conversations whose last assistant turn is the response."""

    def last_turn(value):
        return value[-1]["content"] if isinstance(value, list) else value

    if "prompt" in record:
        return record["prompt"], last_turn(record["chosen"]), last_turn(record["rejected"])
    chosen = record["chosen"]
    return chosen[:-1], chosen[-1]["content"], last_turn(record["rejected"])


# ---------------------------------------------------------------- the loss


def label_margin(model, hidden, spec: VerifierSpec):
    """(K,) logit[good] - logit[bad] for hidden states (K, H), from the two label rows of
    the base's output layer only."""
    head = model.get_output_embeddings()
    rows = head.weight[[spec.good_id, spec.bad_id]].float()  # (2, H)
    margin = hidden.float() @ (rows[0] - rows[1])  # (K,)
    bias = getattr(head, "bias", None)
    if bias is not None:
        margin = margin + (bias[spec.good_id] - bias[spec.bad_id]).float()
    return margin


def marker_loss(model, inputs: dict, spec: VerifierSpec):
    """(loss, accuracy) of one batch: binary cross-entropy of the label margin read one
    position before every marker."""
    import torch

    from lorabay.train.heads import decoder_states

    labels = inputs["labels"]  # (B, L): 1/0 at markers, IGNORE elsewhere
    hidden = decoder_states(model, inputs["input_ids"], inputs["attention_mask"])  # (B, L, H)
    marked = labels != IGNORE  # (B, L)
    read = torch.zeros_like(marked)
    read[:, :-1] = marked[:, 1:]  # the verdict on a marker at m is read at m - 1
    margin = label_margin(model, hidden[read], spec)  # (K,): row-major, as labels[marked]
    target = labels[marked].float()  # (K,)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(margin, target)
    accuracy = ((margin > 0).float() == target).float().mean()
    return loss, accuracy


def marker_trainer(spec: VerifierSpec, **kwargs):
    """A transformers Trainer whose loss is :func:`marker_loss`, logged with its accuracy
    (a class made here: transformers is imported only when a run starts)."""
    from transformers import Trainer

    class MarkerTrainer(Trainer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.accuracies: list[float] = []

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            net = getattr(model, "module", model)  # DDP wraps the PeftModel
            loss, accuracy = marker_loss(net, inputs, spec)
            self.accuracies.append(float(accuracy))
            return (loss, None) if return_outputs else loss

        def log(self, logs, *args, **kwargs):
            if "loss" in logs and self.accuracies:
                logs["accuracy"] = round(sum(self.accuracies) / len(self.accuracies), 4)
                self.accuracies.clear()
            super().log(logs, *args, **kwargs)

    return MarkerTrainer(**kwargs)


# ---------------------------------------------------------------- the run


def train_verifier(config, kind: str, show_progress: bool = True):
    """Train a generative verifier of ``kind`` (reward | prm) for ``config`` (validated)."""
    import datasets
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import DataCollatorForTokenClassification, TrainingArguments

    from lorabay.train.data import detect_shape, load_records
    from lorabay.train.progress import RunProgress
    from lorabay.train.run import begin_run, load_policy, train_and_finish, trainer_arguments

    datasets.disable_progress_bars()
    records = load_records(config.data)
    detect_shape(records, "steps" if kind == "prm" else "preference", config.data)
    run = begin_run(config)
    if run.parent is not None and not (run.parent.folder / VERIFIER_FILE).is_file():
        raise ConfigError(
            f"--from {run.parent.ref} is no generative verifier (no {VERIFIER_FILE})",
            "start from a generative verifier, or without --from",
        )

    model, tokenizer, lora_config = load_policy(config, run.parent)  # a causal LM, no head
    if lora_config is not None:
        model = get_peft_model(model, lora_config)
    separator = config.step_separator if kind == "prm" else OUTCOME_SEPARATOR
    spec = make_spec(tokenizer, kind, separator)
    build = step_rows if kind == "prm" else pair_rows
    rows = build(records, tokenizer, spec, config.max_length)
    arguments = trainer_arguments(config, run.output)
    arguments.pop("max_length")  # a TRL option; rows are cut above
    progress = RunProgress(run.output / "metrics.jsonl", show_bar=show_progress)
    trainer = marker_trainer(
        spec,
        model=model,
        args=TrainingArguments(**arguments, remove_unused_columns=False),
        train_dataset=Dataset.from_list(rows),
        data_collator=DataCollatorForTokenClassification(tokenizer),  # pads labels with -100
        processing_class=tokenizer,
        callbacks=[progress],
    )
    return train_and_finish(config, run, trainer, progress, kind, spec_files(spec))
