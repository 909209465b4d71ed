"""Run configs: the options of each training method, spelled as a YAML recipe or as flags.

A method's config is composed of option groups, so each command shows, accepts and records
in the lineage only what it uses:

    TrainConfig       every method: the base, the data, the adapter's shape, the optimizer,
                      the length of the run, the run folder, the push
    TrainerOptions    the runs the transformers Trainer drives (sft, dpo, reward, prm): LoRA
                      dropout, gradient accumulation and checkpointing, checkpoints and
                      --resume, data-parallel --nproc

    SFTConfig(TrainerOptions, TrainConfig)      DPOConfig, RewardConfig, PRMConfig alike
    RLHFConfig(TrainConfig)                     PPO is our own loop (train/ppo.py)

The recipe keys and the flags are the same fields (train/options.py). :func:`build_config`
merges a recipe with the flags (flags win), converts every value, refuses unknown keys and
conflicting options, checks each group and the method's own ``check``, and raises one
:class:`~lorabay.hub.errors.ConfigError` listing every problem, each naming the option and
how to fix it.

    config = build_config(SFTConfig, recipe="sft.yaml", flags={"lr": "1e-3"})
"""

from __future__ import annotations

import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorabay.hub.bases import resolve_base
from lorabay.hub.errors import ConfigError
from lorabay.train.data import records_file_problem

# The option framework (train/options.py); train/label/run.py still imports config_fields,
# convert_value, field_problems and option from here.
from lorabay.train.options import (  # noqa: F401
    collect_values,
    config_fields,
    config_to_dict,
    convert_value,
    field_flag,
    field_problems,
    option,
)

# ---------------------------------------------------------------- the option groups


@dataclass
class TrainConfig:
    """What every training method uses: the base, the data, the adapter's shape, the
    optimizer, the length of the run, the run folder and the push."""

    base: str | None = option(
        None,
        "Base model folder (config.json, safetensors, tokenizer) or a pulled base's name.",
        required=True,
    )
    data: str | None = option(None, "Training data: a .jsonl or .parquet file.", required=True)
    output: str | None = option(
        None, "Run folder (adapter/, checkpoints/, metrics.jsonl). Default: runs/<method>-<time>."
    )
    from_ref: str | None = option(
        None,
        "Start from this adapter (registry reference or folder); it is also the frozen reference.",
        key="from",
    )
    r: int = option(8, "LoRA rank.", minimum=1, maximum=1024)
    alpha: float = option(16, "LoRA alpha (the update is scaled by alpha / r).", above=0)
    targets: list[str] = option(
        ["q_proj", "v_proj"], "Modules LoRA adapts, comma-separated, or all-linear."
    )
    quantize: str = option(
        "none",
        "nf4: load the base in 4-bit NF4 with double quantization (QLoRA).",
        choices=("none", "nf4"),
    )
    precision: str = option(
        "auto",
        "Compute precision: auto (bf16 for a bf16 base where the hardware has bf16, else fp32), fp32 or bf16.",
        choices=("auto", "fp32", "bf16"),
    )
    epochs: float = option(3.0, "Passes over the data.", above=0)
    max_steps: int = option(0, "Stop after this many optimizer steps (0: use --epochs).", minimum=0)
    lr: float = option(2e-4, "Peak learning rate.", above=0, maximum=1)
    scheduler: str = option(
        "linear", "Learning-rate schedule.", choices=("linear", "cosine", "constant")
    )
    warmup_ratio: float = option(0.0, "Share of the steps spent warming up.", minimum=0, maximum=1)
    weight_decay: float = option(0.0, "AdamW weight decay.", minimum=0)
    batch_size: int = option(8, "Examples per step and process.", minimum=1)
    max_length: int = option(1024, "Longest example in tokens; longer ones are cut.", minimum=8)
    threads: int = option(
        0, "CPU threads for torch (0: auto, 1 for a base under 100M parameters).", minimum=0
    )
    seed: int = option(0, "Random seed (data order, LoRA init, dropout).", minimum=0)
    logging_steps: int = option(5, "Write metrics.jsonl every this many steps.", minimum=1)
    overwrite: bool = option(False, "Start over in an --output that holds an earlier run.")
    push: str | None = option(None, "Push the adapter to the registry under this name.")
    alias: list[str] = option([], "Aliases to point at the pushed version, comma-separated.")
    description: str = option("", "Description stored in the pushed manifest.")
    registry: str | None = option(
        None,
        "Registry URL for --push and the adapters named by reference "
        "(file://DIR, s3://BUCKET/PREFIX, oci://HOST/REPOSITORY).",
    )

    # The method name written into the lineage and the default output folder.
    method: typing.ClassVar[str] = "train"
    # Options of other methods this one does not take, and why (a recipe says so, not
    # "unknown key"); train/options.py collect_values reads it.
    left_out: typing.ClassVar[dict[str, str]] = {}

    def check(self, given: set[str]) -> list[str]:
        """The method's own cross-field problems; ``given`` holds the keys the user set
        (recipe or flag), so defaults never conflict. The groups' checks run first."""
        return []


@dataclass
class TrainerOptions:
    """The options of a run the transformers Trainer drives (sft, dpo, reward, prm)."""

    dropout: float = option(0.05, "Dropout on the LoRA input.", minimum=0, maximum=0.9)
    grad_accum: int = option(1, "Steps whose gradients are summed before an update.", minimum=1)
    gradient_checkpointing: bool = option(
        False, "Recompute activations in the backward pass (less memory, ~20% slower)."
    )
    save_steps: int = option(50, "Save a checkpoint every this many steps.", minimum=1)
    keep_checkpoints: int = option(2, "Checkpoints kept on disk (oldest removed).", minimum=1)
    resume: bool = option(False, "Continue from the last checkpoint in --output.")
    nproc: int = option(1, "Data-parallel processes (accelerate launch, gloo on CPU).", minimum=1)


def resumes(config: TrainConfig) -> bool:
    """Whether the run continues from a checkpoint (only Trainer runs keep checkpoints)."""
    return isinstance(config, TrainerOptions) and config.resume


def run_problems(config: TrainConfig, given: set[str]) -> list[str]:
    """Cross-field problems of every method's options (each a sentence naming the options
    and the fix)."""
    problems = []
    # Methods may rename these (rlhf: --prompts, --policy); messages use their flags.
    cls = type(config)
    data_flag, from_flag = field_flag(cls, "data"), field_flag(cls, "from_ref")
    if not config.targets:
        problems.append("--targets needs at least one module, e.g. q_proj,v_proj or all-linear")
    if config.max_steps and "epochs" in given:
        problems.append("--epochs and --max-steps both given: keep one")
    if config.alias and not config.push:
        problems.append("--alias needs --push NAME: aliases point at a pushed version")
    problems += _reference_problems(config)
    if config.from_ref:
        for key in sorted({"r", "alpha", "targets"} & given):
            problems.append(
                f"--{key} conflicts with {from_flag}: the adapter's shape comes from "
                f"{config.from_ref}; drop --{key}"
            )
    if "all-linear" in config.targets and len(config.targets) > 1:
        problems.append("--targets all-linear already means every linear layer: give it alone")
    for target in config.targets:
        if target != "all-linear" and not target.replace("_", "").replace(".", "").isalnum():
            problems.append(f"--targets {target!r} is not a module name, e.g. q_proj,v_proj")
    if (
        config.base
        and _looks_local(config.base)
        and not (Path(config.base) / "config.json").is_file()
    ):
        problems.append(
            f"--base {config.base}: no config.json there; "
            "give a base folder or a pulled base's name (`lorabay base pull NAME`)"
        )
    if config.data and (problem := records_file_problem(data_flag, config.data)):
        problems.append(problem)
    # Other ranks of a data-parallel run see the folder rank 0 has just started.
    first_rank = os.environ.get("RANK", "0") == "0"
    if (
        first_rank
        and config.output
        and not (resumes(config) or config.overwrite)
        and _has_run(Path(config.output))
    ):
        fix = "pass --overwrite to start over"
        if isinstance(config, TrainerOptions):
            fix = "pass --resume to continue it or --overwrite to start over"
        problems.append(f"--output {config.output} holds an earlier run: {fix}")
    if config.from_ref and _looks_local(config.from_ref):
        if not (Path(config.from_ref) / "adapter_config.json").is_file():
            problems.append(f"{from_flag} {config.from_ref}: no adapter_config.json in that folder")
    return problems


def trainer_problems(config: TrainerOptions, given: set[str]) -> list[str]:
    """Cross-field problems of the Trainer's options."""
    problems = []
    if config.resume and config.overwrite:
        problems.append(
            "--resume and --overwrite both given: --resume continues, --overwrite starts over"
        )
    if config.resume and not config.output:
        problems.append("--resume needs --output: the run folder whose checkpoint to continue")
    if config.resume and config.output and not _has_checkpoint(Path(config.output)):
        problems.append(
            f"--resume: no checkpoint in {config.output}/checkpoints; "
            "start the run without --resume"
        )
    return problems


def _reference_problems(config: TrainConfig) -> list[str]:
    """Registry names checked before training, not after: a bad --push fails in a second."""
    from lorabay.hub.errors import InvalidReference
    from lorabay.hub.reference import parse_reference, validate_alias, validate_name

    checks = []
    if config.push:
        checks.append(("--push", lambda: validate_name(config.push)))
    for alias in config.alias:
        checks.append(("--alias", lambda alias=alias: validate_alias(alias)))
    if config.from_ref and not _looks_local(config.from_ref):
        checks.append(
            (field_flag(type(config), "from_ref"), lambda: parse_reference(config.from_ref))
        )
    problems = []
    for flag, check in checks:
        try:
            check()
        except InvalidReference as error:
            problems.append(f"{flag} {error.ref!r}: {error.reason}")
    if "latest" in config.alias:
        problems.append("--alias latest is implicit (the highest version): pick another alias")
    return problems


def _looks_local(value: str) -> bool:
    # A path (./x, /x, x/y that exists) rather than a registry reference or a hub id.
    return value.startswith((".", "/", "~")) or os.path.exists(value)


def _has_run(output: Path) -> bool:
    return any((output / part).exists() for part in ("adapter", "checkpoints", "metrics.jsonl"))


def _has_checkpoint(output: Path) -> bool:
    folder = output / "checkpoints"
    return folder.is_dir() and any(p.name.startswith("checkpoint-") for p in folder.iterdir())


# ---------------------------------------------------------------- building a config


def build_config(
    cls: type[TrainConfig],
    recipe: str | os.PathLike | dict | None = None,
    flags: dict[str, Any] | None = None,
) -> TrainConfig:
    """The run ``cls`` described by ``recipe`` (a YAML path or a mapping) and ``flags``.

    ``flags`` maps keys (dashes or underscores) to values, None meaning "not given";
    strings are converted to the field's type. Raises ConfigError with every problem.
    """
    found = collect_values(cls, recipe, flags)
    problems = found.problems
    config = cls(**found.values)
    if config.base:  # a pulled base's name means its folder (hub/bases.py)
        try:
            config.base = resolve_base(config.base, allow_hub_id=True)
        except ConfigError as error:
            problems += [f"{error.problems[0]} ({error.hint})"]
    problems += validate(config, given=found.given)
    if problems:
        raise ConfigError(
            problems, "fix the options above; `lorabay train <method> --help` lists them"
        )
    return config


def validate(config: TrainConfig, given: set[str] = frozenset()) -> list[str]:
    """Every problem with ``config``: required fields, choices, bounds, each option group's
    checks, then the method's own."""
    given = set(given)
    problems = field_problems(config) + run_problems(config, given)
    if isinstance(config, TrainerOptions):
        problems += trainer_problems(config, given)
    return problems + config.check(given)


def run_recipe(recipe: str | None, flags: dict[str, Any]) -> str | None:
    """The recipe to build from: the one given, or for ``--resume --output DIR`` alone the
    ``recipe.yaml`` that run wrote, so a stopped run continues with one short command."""
    if recipe or not flags.get("resume") or not flags.get("output"):
        return recipe
    saved = Path(flags["output"]) / "recipe.yaml"
    return str(saved) if saved.is_file() else None


# Options that say where things are or how the run is kept, not what the adapter learned:
# left out of the lineage's hyper-parameters. (--nproc is there as world_size.)
BOOKKEEPING = {
    "base", "data", "prompts", "output", "from", "policy", "resume", "overwrite", "push",
    "alias", "description", "registry", "logging_steps", "save_steps", "keep_checkpoints",
    "threads", "nproc",
}  # fmt: skip


def hyperparameters(config: TrainConfig) -> dict:
    """The options that shape the adapter (for the lineage): only the method's own, so a
    run records nothing it did not use."""
    return {key: value for key, value in config_to_dict(config).items() if key not in BOOKKEEPING}


# ---------------------------------------------------------------- the runs


@dataclass
class SFTConfig(TrainerOptions, TrainConfig):
    """Supervised fine-tuning: loss on the completion (assistant) tokens only."""

    method: typing.ClassVar[str] = "sft"


@dataclass
class DPOConfig(TrainerOptions, TrainConfig):
    """Direct preference optimization against a frozen reference policy."""

    lr: float = option(5e-5, "Peak learning rate.", above=0, maximum=1)
    beta: float = option(
        0.1, "How far the policy may move from the reference (higher: closer).", above=0
    )
    loss: str = option(
        "sigmoid",
        "DPO loss: sigmoid (DPO paper), ipo or hinge.",
        choices=("sigmoid", "ipo", "hinge"),
    )

    method: typing.ClassVar[str] = "dpo"


VERIFIER_FORMATS = ("generative", "head")
FORMAT_HELP = (
    "generative: a plain LoRA read through two label tokens, which the serving engine runs "
    "(best-of-N, search); head: a LoRA plus a score head, read in-process only."
)


@dataclass
class RewardConfig(TrainerOptions, TrainConfig):
    """An outcome reward model on preference pairs: generative (a LoRA whose probability of
    a "right" label token after the response is the score; chosen right, rejected wrong) or
    a Bradley-Terry LoRA plus a scalar ``score`` head (-log sigmoid(r(chosen) - r(rejected)))."""

    lr: float = option(1e-4, "Peak learning rate.", above=0, maximum=1)
    format: str = option("generative", FORMAT_HELP, choices=VERIFIER_FORMATS)
    center_rewards: float = option(
        0.0,
        "Weight of a penalty on the squared mean reward, keeping scores near 0 (arXiv:2312.09244; "
        "--format head).",
        minimum=0,
    )

    method: typing.ClassVar[str] = "reward"

    def check(self, given: set[str]) -> list[str]:
        problems = []
        if self.format == "generative" and self.center_rewards:
            problems.append(
                "--center-rewards applies to a head reward model's scalar: add --format head "
                "or drop it (a generative one's score is a probability)"
            )
        return problems


@dataclass
class PRMConfig(TrainerOptions, TrainConfig):
    """A process reward model judging each solution step (Math-Shepherd / PRM800K data):
    generative (a LoRA read through two label tokens after each step) or a LoRA plus a
    two-class ``score`` head read at the token that ends each step."""

    lr: float = option(1e-4, "Peak learning rate.", above=0, maximum=1)
    format: str = option("generative", FORMAT_HELP, choices=VERIFIER_FORMATS)
    step_separator: str = option(
        "\n", "Text appended to each step; the step's label sits on its last token."
    )

    method: typing.ClassVar[str] = "prm"

    def check(self, given: set[str]) -> list[str]:
        problems = []
        if not self.step_separator:
            problems.append("--step-separator must not be empty, e.g. a newline")
        return problems


@dataclass
class RLHFConfig(TrainConfig):
    """RLHF with PPO (train/ppo.py): the policy samples responses to prompts, the reward
    model scores them, and PPO raises the score minus a KL penalty to the starting policy.
    Our own loop, not the Trainer: none of :class:`TrainerOptions`."""

    data: str | None = option(
        None,
        'Prompts: .jsonl or .parquet records with a "prompt" (text or a message list).',
        key="prompts",
        required=True,
    )
    from_ref: str | None = option(
        None,
        "Starting policy (registry reference or folder): trained, and kept frozen as the "
        "reference. Default: a new adapter on the base (the reference: the base).",
        key="policy",
    )
    reward: str | None = option(
        None,
        "Reward model (a reward-kind reference or folder), or prm:REF for dense step rewards "
        "from a process reward model.",
        required=True,
    )
    kl_coef: float = option(
        0.05, "Per-token KL penalty to the reference policy (InstructGPT's beta).", minimum=0
    )
    clip: float = option(0.2, "PPO clip range of the probability ratio.", above=0, maximum=1)
    value_clip: float = option(0.2, "Clip range of the value update.", above=0)
    vf_coef: float = option(0.1, "Weight of the value loss.", minimum=0)
    value_model: str = option(
        "head",
        "The critic: 'head', a linear head on the policy's hidden states (no pass of its "
        "own); 'adapter', its own LoRA on the same base plus a head, trained by its own "
        "pass each update as InstructGPT's value model (about twice the update cost).",
        choices=("head", "adapter"),
    )
    gamma: float = option(1.0, "Discount per token.", minimum=0, maximum=1)
    lam: float = option(0.95, "GAE lambda.", minimum=0, maximum=1)
    ppo_epochs: int = option(4, "Optimization passes over each batch of rollouts.", minimum=1)
    mini_batches: int = option(1, "Mini-batches per pass (one optimizer step each).", minimum=1)
    max_new_tokens: int = option(32, "Longest response sampled, in tokens.", minimum=1)
    temperature: float = option(1.0, "Sampling temperature of the rollouts.", above=0)
    batch_size: int = option(16, "Prompts per PPO step (one batch of rollouts).", minimum=1)
    epochs: float = option(1.0, "Passes over the prompts.", above=0)
    max_steps: int = option(0, "Stop after this many PPO steps (0: use --epochs).", minimum=0)
    seed: int = option(0, "Random seed (prompt order, LoRA init, sampling).", minimum=0)
    lr: float = option(5e-5, "Peak learning rate.", above=0, maximum=1)
    logging_steps: int = option(1, "Write metrics.jsonl every this many PPO steps.", minimum=1)
    max_length: int = option(
        1024, "Longest prompt in tokens; a longer one keeps its end.", minimum=8
    )

    method: typing.ClassVar[str] = "rlhf"
    left_out: typing.ClassVar[dict[str, str]] = {
        "algo": "PPO is the one algorithm `train rlhf` runs; drop it",
        "dropout": "PPO samples and updates with dropout off (the first pass over a batch "
        "must see ratio 1 exactly); drop it",
        "grad_accum": "PPO steps once per mini-batch; use --mini-batches",
        "gradient_checkpointing": "PPO's loop (train/ppo.py) does not checkpoint "
        "activations; drop it",
        "save_steps": "rlhf runs keep no checkpoints yet; drop it",
        "keep_checkpoints": "rlhf runs keep no checkpoints yet; drop it",
        "resume": "rlhf runs keep no checkpoints yet; start the run again",
        "nproc": "rlhf runs in one process; drop --nproc",
    }

    def check(self, given: set[str]) -> list[str]:
        problems = []
        if self.mini_batches > self.batch_size:
            problems.append(
                f"--mini-batches {self.mini_batches} is more than --batch-size "
                f"{self.batch_size}: each mini-batch needs a prompt"
            )
        if self.reward:
            kind, ref = reward_source(self.reward)
            if not ref:
                problems.append("--reward prm: names no model; give prm:REF")
            elif _looks_local(ref) and not (Path(ref) / "adapter_config.json").is_file():
                problems.append(f"--reward {self.reward}: no adapter_config.json in {ref}")
        return problems


def reward_source(value: str) -> tuple[str, str]:
    """``--reward`` -> (kind, reference): "prm:REF" is a process reward model, else a reward model."""
    if value.startswith("prm:"):
        return "prm", value.removeprefix("prm:")
    return "reward", value
