"""Supervised fine-tuning of a LoRA (or QLoRA) adapter with TRL's SFTTrainer.

The loss covers the completion only: for ``{"prompt", "completion"}`` records the
prompt tokens are masked (TRL's ``completion_only_loss``); for ``{"messages"}``
records only the assistant turns count (found by rendering the conversation prefix by
prefix with the base's own chat template: ``data.tokenize_conversations``).

    lorabay train sft --base ./tiny --data sft.jsonl --r 8 --lr 1e-3 --push team/sentiment
    python -c "from lorabay.train.sft import train_sft; from lorabay.train.config import *; \
               train_sft(build_config(SFTConfig, 'recipe.yaml'))"
"""

from __future__ import annotations

from lorabay.train.config import SFTConfig
from lorabay.train.run import RunResult


def train_sft(config: SFTConfig, show_progress: bool = True) -> RunResult:
    """Train ``config`` (already validated by build_config) and return the finished run."""
    import datasets
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    from lorabay.train.data import load_dataset, tokenize_conversations
    from lorabay.train.progress import RunProgress
    from lorabay.train.run import begin_run, load_policy, train_and_finish, trainer_arguments

    datasets.disable_progress_bars()
    dataset, shape = load_dataset(config.data, "sft")
    run = begin_run(config)

    model, tokenizer, lora_config = load_policy(config, run.parent)
    if shape == "messages":  # the assistant tokens are masked here, for any chat template
        dataset = tokenize_conversations(dataset, tokenizer)
    args = TRLSFTConfig(
        **trainer_arguments(config, run.output),
        completion_only_loss=shape == "prompt_completion",
        packing=False,
    )
    progress = RunProgress(run.output / "metrics.jsonl", show_bar=show_progress)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config,
        callbacks=[progress],
    )
    return train_and_finish(config, run, trainer, progress)
