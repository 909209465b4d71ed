"""Direct preference optimization of a LoRA (or QLoRA) adapter with TRL's DPOTrainer.

The reference policy is never a second copy of the base:

- a fresh adapter: the reference is the base with the adapter disabled (TRL wraps the
  base with ``peft_config`` and switches adapters off for the reference pass);
- ``--from REF``: the parent adapter is loaded twice over the one base, as the
  trainable ``default`` and as a frozen ``ref`` copy (TRL adds it when handed a
  PeftModel without a ``ref_model``), so the run starts at, and is held near, REF.

    lorabay train dpo --base ./tiny --data pairs.jsonl --from team/sentiment:1 --beta 0.1
"""

from __future__ import annotations

from lorabay.train.config import DPOConfig
from lorabay.train.run import RunResult


def train_dpo(config: DPOConfig, show_progress: bool = True) -> RunResult:
    """Train ``config`` (already validated by build_config) and return the finished run."""
    import datasets
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    from lorabay.train.data import load_dataset
    from lorabay.train.progress import RunProgress
    from lorabay.train.run import begin_run, load_policy, train_and_finish, trainer_arguments

    datasets.disable_progress_bars()
    dataset, _ = load_dataset(config.data, "preference")
    run = begin_run(config)

    model, tokenizer, lora_config = load_policy(config, run.parent)
    args = TRLDPOConfig(
        **trainer_arguments(config, run.output),
        beta=config.beta,
        loss_type=[config.loss],
        precompute_ref_log_probs=False,  # the reference is one adapter switch away
    )
    progress = RunProgress(run.output / "metrics.jsonl", show_bar=show_progress)
    trainer = DPOTrainer(
        model=model,
        ref_model=None,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config,
        callbacks=[progress],
    )
    result = train_and_finish(config, run, trainer, progress)
    result.extra["reference"] = describe_reference(trainer)
    return result


def describe_reference(trainer) -> str:
    """What the reference policy of ``trainer`` is; never a second model."""
    from lorabay.train.model import REFERENCE_ADAPTER

    if trainer.ref_model is not None:  # not reachable through train_dpo; kept honest anyway
        return "separate model"
    model = trainer.accelerator.unwrap_model(trainer.model)
    if REFERENCE_ADAPTER in model.peft_config:
        return f"frozen adapter {REFERENCE_ADAPTER!r} (the parent)"
    return "base with the adapter disabled"
