"""An outcome reward model on preference pairs: generative (the default) or a scalar head.

``--format generative`` (train/verifier.py): a plain LoRA whose score is the probability
of a "right" label token after the response, which the serving engine runs like any
adapter (best-of-N in the gateway). ``--format head``, the older format, below.

A Bradley-Terry reward model with TRL's RewardTrainer: a LoRA adapter plus a scalar head.
The base is loaded as a sequence classifier with one output: the new ``score`` head
(hidden size -> 1) reads the last token of prompt + response. Training lowers

    loss = -log sigmoid(r(prompt, chosen) - r(prompt, rejected))

(Bradley and Terry 1952; InstructGPT, arXiv:2203.02155 eq. 1). The head is trained
with the adapter and saved inside it (PEFT ``modules_to_save``), so the adapter
folder is the whole reward model; the registry records it as kind ``reward``.
:mod:`lorabay.train.heads` puts it beside a policy on one base for PPO.

    lorabay train reward --base ./tiny --data pairs.jsonl --push team/rm              # generative
    lorabay train reward --base ./tiny --data pairs.jsonl --format head --push team/rm-head
"""

from __future__ import annotations

from lorabay.train.config import RewardConfig
from lorabay.train.run import RunResult

KIND = "reward"


def train_reward(config: RewardConfig, show_progress: bool = True) -> RunResult:
    """Train ``config`` (already validated by build_config) and return the finished run."""
    if config.format == "generative":
        from lorabay.train.verifier import train_verifier

        return train_verifier(config, KIND, show_progress)
    import datasets
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    from lorabay.train.data import load_dataset
    from lorabay.train.heads import head_files
    from lorabay.train.progress import RunProgress
    from lorabay.train.run import begin_run, load_policy, train_and_finish, trainer_arguments

    datasets.disable_progress_bars()
    dataset, _ = load_dataset(config.data, "preference")
    run = begin_run(config)

    model, tokenizer, lora_config = load_policy(config, run.parent, head=KIND)
    args = TRLRewardConfig(
        **trainer_arguments(config, run.output),
        center_rewards_coefficient=config.center_rewards or None,
    )
    progress = RunProgress(run.output / "metrics.jsonl", show_bar=show_progress)
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config,
        callbacks=[progress],
    )
    return train_and_finish(config, run, trainer, progress, KIND, head_files(KIND))
