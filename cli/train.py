"""`lorabay train sft|dpo|reward|rlhf|prm`: train a LoRA adapter and, with --push, put it in
the registry. Thin: parse, call lorabay.train.methods.run_training, print.

Every option is generated from the method's config dataclass (lorabay.train.config), so a
recipe key and a flag are the same thing and each command shows only the options its
method uses; flags override the recipe.
"""

from __future__ import annotations

import json

import click

from lorabay.train.methods import METHODS
from lorabay.train.options import click_options, flags_from_click


@click.group()
def train() -> None:
    """Train a LoRA (or QLoRA) adapter on a base; push it with its lineage."""


def run_command(name: str, recipe: str | None, as_json: bool, params: dict) -> None:
    """Build and validate the config, train, print the result (where this process has it)."""
    from lorabay.train.config import build_config, run_recipe
    from lorabay.train.methods import run_training

    cls = METHODS[name].config
    flags = flags_from_click(cls, params)
    config = build_config(cls, run_recipe(recipe, flags), flags)
    result = run_training(config, show_progress=True, as_json=as_json)
    if result is None:  # another process reports the run (--nproc, or a rank other than 0)
        return
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    metrics = result.metrics
    summary = f"{metrics['steps']} steps"
    if "loss" in metrics and "first_loss" in metrics:
        summary += f", loss {metrics['first_loss']:.3f} -> {metrics['loss']:.3f}"
    line = f"{result.adapter}  ({summary})"
    if result.manifest is not None:
        line = f"{result.adapter} -> {result.manifest.ref} {result.manifest.digest}  ({summary})"
    click.echo(line)


def training_command(name: str, help: str):
    """Add ``lorabay train NAME``: --config, --json, and one option per field of its
    method's config (lorabay.train.methods.METHODS)."""

    def command(config_path: str | None, as_json: bool, **params) -> None:
        run_command(name, config_path, as_json, params)

    command.__doc__ = help
    command = click_options(METHODS[name].config)(command)
    command = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")(
        command
    )
    command = click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False),
        default=None,
        help="YAML recipe; its keys are the options below (flags override it).",
    )(command)
    return train.command(name)(command)


sft = training_command(
    "sft",
    """Supervised fine-tuning (TRL SFTTrainer); loss on completion tokens only.

    \b
    Data (JSONL or Parquet), one record per line:
      {"prompt": "...", "completion": "..."}   or   {"messages": [{"role": ..., "content": ...}]}

    \b
    Examples:
      lorabay train sft --base ./tiny --data sft.jsonl --lr 1e-3 --push team/sentiment
      lorabay train sft --config recipe.yaml --quantize nf4 --nproc 2 --output runs/a
      lorabay train sft --output runs/a --resume
    """,
)

dpo = training_command(
    "dpo",
    """Direct preference optimization (TRL DPOTrainer).

    The reference policy is the base with the adapter disabled or, with --from, the
    starting adapter frozen beside the trained copy; never a second copy of the base.

    \b
    Data (JSONL or Parquet), one record per line:
      {"prompt": ..., "chosen": ..., "rejected": ...}   (text or message lists)

    \b
    Examples:
      lorabay train dpo --base ./tiny --data pairs.jsonl --from team/sentiment:1 --push team/sentiment
    """,
)

reward = training_command(
    "reward",
    """Train an outcome reward model on preference pairs; the registry records kind `reward`.

    --format generative (the default): a plain LoRA whose score is the probability of a
    "right" label token after the response (chosen right, rejected wrong), which the
    serving engine runs: `lorabay serve` uses it as a best-of-N "verifier". --format head:
    a Bradley-Terry LoRA plus a scalar head (TRL RewardTrainer, loss -log sigmoid(r(chosen)
    - r(rejected))), read in-process only (`lorabay train rlhf --reward`).

    \b
    Data (JSONL or Parquet), one record per line:
      {"prompt": ..., "chosen": ..., "rejected": ...}   (text or message lists)

    \b
    Examples:
      lorabay train reward --base ./tiny --data pairs.jsonl --lr 1e-3 --push team/rm
    """,
)

rlhf = training_command(
    "rlhf",
    """RLHF with PPO (InstructGPT): maximise the reward model's score minus a KL penalty.

    One base holds the policy (the trained adapter), the reference (the starting adapter
    frozen, or the base with adapters off), the reward model (its own adapter and head)
    and the value head. Logs per step: reward, kl, entropy, value_loss, clip_fraction,
    response_length. --reward prm:REF gives every step of a response the process reward
    model's judgement (dense rewards) instead of one score at the end.

    \b
    Prompts (JSONL or Parquet), one record per line:
      {"prompt": "..."}   or   {"prompt": [{"role": "user", "content": "..."}]}

    \b
    Examples:
      lorabay train rlhf --base ./tiny --policy team/sft:1 --reward team/rm:1 \\
          --prompts prompts.jsonl --kl-coef 0.05 --push team/policy
      lorabay train rlhf --base ./tiny --policy team/sft:1 --reward prm:team/prm:1 \\
          --prompts problems.jsonl --max-new-tokens 64
    """,
)

prm = training_command(
    "prm",
    """Train a process reward model that judges each solution step (kind `prm`).

    --format generative (the default): a plain LoRA read through two label tokens ("+"/"-")
    after each step's separator, which the serving engine runs (best-of-N and beam search
    in `lorabay serve`). --format head: a LoRA plus a two-class head read at the
    separator's token, in-process only. `lorabay score` reads either.

    \b
    Data (JSONL or Parquet), one record per line:
      {"prompt": "...", "completions": ["step 1", "step 2"], "labels": [true, false]}

    \b
    Examples:
      lorabay train prm --base ./tiny --data steps.jsonl --lr 1e-3 --push team/prm
    """,
)
