"""A process reward model: a LoRA adapter that judges each solution step.

``--format generative`` (the default, train/verifier.py): a plain LoRA read through two
label tokens after each step (Math-Shepherd's "+"/"-"), which the serving engine runs
like any adapter (best-of-N and beam search in the gateway). ``--format head``, the
older format: a LoRA plus a two-class head, read in-process only, described below.

Data (Math-Shepherd / PRM800K shape), one record per line::

    {"prompt": "...", "completions": ["step 1", "step 2", ...], "labels": [true, false, ...]}

Each example is tokenized as the prompt, then every step followed by the step
separator (``--step-separator``, a newline by default). The label of a step sits on
the separator's last token; every other token gets the ignore label (-100), so the
loss is the cross-entropy of the (wrong, right) head at the separators only:

    loss = - mean over steps k of log p(label_k | prompt, step_1 .. step_k)

The base is loaded as a token classifier (a new ``score`` head, hidden -> 2) and
trained with the transformers Trainer (TRL 1.16 ships no PRM trainer); the head is
saved inside the adapter (``modules_to_save``) with ``head.json`` naming the
separator, and the registry records kind ``prm``. ``lorabay score`` reads it back:
the probability that each step is right, and the solution's score, their product
("Let's Verify Step by Step", arXiv:2305.20050).

    lorabay train prm --base ./tiny --data steps.jsonl --push team/prm
    lorabay score --base ./tiny --prm team/prm --prompt "2+2=?" --steps steps.txt
"""

from __future__ import annotations

from lorabay.train.config import PRMConfig
from lorabay.train.run import RunResult

KIND = "prm"


def step_dataset(records: list[dict], tokenizer, separator: str, max_length: int):
    """A datasets.Dataset of {input_ids, labels}: labels IGNORE except at each step's end."""
    from datasets import Dataset

    from lorabay.train.heads import IGNORE, step_input

    rows = []
    for record in records:
        ids, ends = step_input(tokenizer, record["prompt"], record["completions"], separator)
        labels = [IGNORE] * len(ids)
        for end, right in zip(ends, record["labels"], strict=True):
            labels[end] = int(right)
        # Cut long examples at max_length: the steps past the cut lose their labels.
        rows.append({"input_ids": ids[:max_length], "labels": labels[:max_length]})
    return Dataset.from_list(rows)


def train_prm(config: PRMConfig, show_progress: bool = True) -> RunResult:
    """Train ``config`` (already validated by build_config) and return the finished run."""
    if config.format == "generative":
        from lorabay.train.verifier import train_verifier

        return train_verifier(config, KIND, show_progress)
    import datasets
    from peft import get_peft_model
    from transformers import DataCollatorForTokenClassification, Trainer, TrainingArguments

    from lorabay.train.data import detect_shape, load_records
    from lorabay.train.heads import head_files
    from lorabay.train.progress import RunProgress
    from lorabay.train.run import begin_run, load_policy, train_and_finish, trainer_arguments

    datasets.disable_progress_bars()
    records = load_records(config.data)
    detect_shape(records, "steps", config.data)
    run = begin_run(config)

    model, tokenizer, lora_config = load_policy(config, run.parent, head=KIND)
    if lora_config is not None:
        model = get_peft_model(model, lora_config)
    arguments = trainer_arguments(config, run.output)
    arguments.pop("max_length")  # a TRL option; the examples are cut in step_dataset
    progress = RunProgress(run.output / "metrics.jsonl", show_bar=show_progress)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**arguments, remove_unused_columns=False),
        train_dataset=step_dataset(records, tokenizer, config.step_separator, config.max_length),
        data_collator=DataCollatorForTokenClassification(tokenizer),  # pads labels with -100
        processing_class=tokenizer,
        callbacks=[progress],
    )
    return train_and_finish(
        config, run, trainer, progress, KIND, head_files(KIND, config.step_separator)
    )
