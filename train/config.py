"""Run configs: one dataclass per training method, spelled as a YAML recipe or as CLI flags.

A run is a dataclass whose every field carries a one-line help and a default
(:func:`option`). The recipe keys and the flags are generated from the same fields,
never written twice: field ``grad_accum`` is the YAML key ``grad_accum`` (``grad-accum``
works too) and the flag ``--grad-accum``. :func:`build_config` merges a recipe with the
flags (flags win), converts every value to the field's type, refuses unknown keys and
conflicting options, validates the whole run, and raises one
:class:`~lorabay.hub.errors.ConfigError` that lists every problem, each naming the
option and how to fix it.

    config = build_config(SFTConfig, recipe="sft.yaml", flags={"lr": "1e-3"})

Later methods (reward model, PPO, PRM) subclass :class:`TrainConfig` and add their
fields and checks (``check``); nothing here knows about a particular method.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorabay.hub.bases import resolve_base
from lorabay.hub.errors import ConfigError

# Names LoRA may target in a Llama-like base; "all-linear" is PEFT's shorthand for every
# linear layer of the decoder (the output head excluded).
LLAMA_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def option(
    default: Any,
    help: str,
    *,
    key: str | None = None,
    choices: tuple[str, ...] | None = None,
    minimum: float | None = None,
    above: float | None = None,
    maximum: float | None = None,
    required: bool = False,
) -> Any:
    """A config field: its default, one line of help, and the bounds :func:`validate` checks.

    ``key`` renames the recipe key and flag (``from_ref`` is spelled ``from``);
    ``minimum``/``maximum`` are inclusive bounds, ``above`` an exclusive lower bound.
    """
    metadata = {
        "help": help,
        "key": key,
        "choices": choices,
        "minimum": minimum,
        "above": above,
        "maximum": maximum,
        "required": required,
    }
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """What every training method shares: the base, the data, the adapter, the loop, the push."""

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
    dropout: float = option(0.05, "Dropout on the LoRA input.", minimum=0, maximum=0.9)
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
        "Compute precision: auto (bf16 for a bf16 base, else fp32), fp32 or bf16.",
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
    grad_accum: int = option(1, "Steps whose gradients are summed before an update.", minimum=1)
    max_length: int = option(1024, "Longest example in tokens; longer ones are cut.", minimum=8)
    gradient_checkpointing: bool = option(
        False, "Recompute activations in the backward pass (less memory, ~20% slower)."
    )
    threads: int = option(
        0, "CPU threads for torch (0: auto, 1 for a base under 100M parameters).", minimum=0
    )
    seed: int = option(0, "Random seed (data order, LoRA init, dropout).", minimum=0)
    logging_steps: int = option(5, "Write metrics.jsonl every this many steps.", minimum=1)
    save_steps: int = option(50, "Save a checkpoint every this many steps.", minimum=1)
    keep_checkpoints: int = option(2, "Checkpoints kept on disk (oldest removed).", minimum=1)
    resume: bool = option(False, "Continue from the last checkpoint in --output.")
    overwrite: bool = option(False, "Start over in an --output that holds an earlier run.")
    nproc: int = option(1, "Data-parallel processes (accelerate launch, gloo on CPU).", minimum=1)
    push: str | None = option(None, "Push the adapter to the registry under this name.")
    alias: list[str] = option([], "Aliases to point at the pushed version, comma-separated.")
    description: str = option("", "Description stored in the pushed manifest.")
    registry: str | None = option(
        None, "Registry URL for --push and --from (file://DIR, s3://BUCKET/PREFIX)."
    )

    # The method name written into the lineage and the default output folder.
    method: typing.ClassVar[str] = "train"

    def check(self, given: set[str]) -> list[str]:
        """Cross-field problems (each one a sentence naming the options and the fix).

        ``given`` holds the keys the user set (recipe or flag), so defaults never conflict.
        """
        problems = []
        # Subclasses may rename these (rlhf: --prompts, --policy); messages use their flags.
        data_flag, from_flag = field_flag(type(self), "data"), field_flag(type(self), "from_ref")
        if self.max_steps and "epochs" in given:
            problems.append("--epochs and --max-steps both given: keep one")
        if self.resume and self.overwrite:
            problems.append(
                "--resume and --overwrite both given: --resume continues, --overwrite starts over"
            )
        if self.resume and not self.output:
            problems.append("--resume needs --output: the run folder whose checkpoint to continue")
        if self.alias and not self.push:
            problems.append("--alias needs --push NAME: aliases point at a pushed version")
        problems += _reference_problems(self)
        if self.from_ref:
            for key in sorted({"r", "alpha", "targets"} & given):
                problems.append(
                    f"--{key} conflicts with {from_flag}: the adapter's shape comes from "
                    f"{self.from_ref}; drop --{key}"
                )
        if "all-linear" in self.targets and len(self.targets) > 1:
            problems.append("--targets all-linear already means every linear layer: give it alone")
        for target in self.targets:
            if target != "all-linear" and not target.replace("_", "").replace(".", "").isalnum():
                problems.append(f"--targets {target!r} is not a module name, e.g. q_proj,v_proj")
        if (
            self.base
            and _looks_local(self.base)
            and not (Path(self.base) / "config.json").is_file()
        ):
            problems.append(
                f"--base {self.base}: no config.json there; "
                "give a base folder or a pulled base's name (`lorabay base pull NAME`)"
            )
        if self.data:
            data = Path(self.data)
            if not data.is_file():
                problems.append(f"{data_flag} {self.data}: no such file")
            elif data.suffix not in (".jsonl", ".json", ".parquet"):
                problems.append(f"{data_flag} {self.data}: use a .jsonl or .parquet file")
        # Other ranks of a data-parallel run see the folder rank 0 has just started.
        first_rank = os.environ.get("RANK", "0") == "0"
        if (
            first_rank
            and self.output
            and not (self.resume or self.overwrite)
            and _has_run(Path(self.output))
        ):
            problems.append(
                f"--output {self.output} holds an earlier run: "
                "pass --resume to continue it or --overwrite to start over"
            )
        if self.resume and self.output and not _has_checkpoint(Path(self.output)):
            problems.append(
                f"--resume: no checkpoint in {self.output}/checkpoints; "
                "start the run without --resume"
            )
        if self.from_ref and _looks_local(self.from_ref):
            if not (Path(self.from_ref) / "adapter_config.json").is_file():
                problems.append(
                    f"{from_flag} {self.from_ref}: no adapter_config.json in that folder"
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


# ---------------------------------------------------------------- the field table


@dataclass(frozen=True)
class Spec:
    """One config field as the recipe, the CLI and the validator see it."""

    name: str  # the dataclass attribute
    key: str  # the recipe key; the flag is --key with dashes
    kind: type  # bool, int, float, str or list
    default: Any
    help: str
    metadata: dict

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")


def config_fields(cls: type) -> list[Spec]:
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        specs.append(
            Spec(
                name=f.name,
                key=f.metadata.get("key") or f.name,
                kind=_base_type(hints[f.name]),
                default=default,
                help=f.metadata.get("help", ""),
                metadata=dict(f.metadata),
            )
        )
    return specs


def field_flag(cls: type, name: str) -> str:
    """The flag of field ``name`` of ``cls`` (``from_ref`` -> ``--from``)."""
    return next(spec.flag for spec in config_fields(cls) if spec.name == name)


def _base_type(hint: Any) -> type:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is list:
        return list
    return hint


# ---------------------------------------------------------------- building a config


def read_recipe(path: str | os.PathLike) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file", "give the path of a YAML recipe")
    try:
        recipe = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"--config {path}: not valid YAML ({error})") from error
    if not isinstance(recipe, dict):
        raise ConfigError(f"--config {path}: a recipe is a mapping of option: value")
    return recipe


def build_config(
    cls: type[TrainConfig],
    recipe: str | os.PathLike | dict | None = None,
    flags: dict[str, Any] | None = None,
) -> TrainConfig:
    """The run ``cls`` described by ``recipe`` (a YAML path or a mapping) and ``flags``.

    ``flags`` maps keys (dashes or underscores) to values, None meaning "not given";
    strings are converted to the field's type. Raises ConfigError with every problem.
    """
    specs = {spec.key: spec for spec in config_fields(cls)}
    problems: list[str] = []
    source = recipe if isinstance(recipe, dict) else read_recipe(recipe) if recipe else {}
    merged: dict[str, Any] = {}
    for raw_key, value in source.items():
        key = str(raw_key).replace("-", "_")
        if key not in specs:
            problems.append(f"unknown recipe key {raw_key!r}{_suggest(key, specs)}")
            continue
        merged[key] = value
    for raw_key, value in (flags or {}).items():
        key = raw_key.replace("-", "_")
        if key not in specs:
            problems.append(f"unknown option {raw_key!r}{_suggest(key, specs)}")
            continue
        if value is not None:
            merged[key] = value  # a flag overrides the recipe

    values = {}
    for key, value in merged.items():
        spec = specs[key]
        try:
            values[spec.name] = convert_value(spec, value)
        except ValueError as error:
            problems.append(f"{spec.flag} {error}")
    config = cls(**values)
    if config.base:  # a pulled base's name means its folder (hub/bases.py)
        try:
            config.base = resolve_base(config.base, allow_hub_id=True)
        except ConfigError as error:
            problems += [f"{error.problems[0]} ({error.hint})"]
    problems += validate(config, given=set(merged))
    if problems:
        raise ConfigError(
            problems, "fix the options above; `lorabay train <method> --help` lists them"
        )
    return config


def run_recipe(recipe: str | None, flags: dict[str, Any]) -> str | None:
    """The recipe to build from: the one given, or for ``--resume --output DIR`` alone the
    ``recipe.yaml`` that run wrote, so a stopped run continues with one short command."""
    if recipe or not flags.get("resume") or not flags.get("output"):
        return recipe
    saved = Path(flags["output"]) / "recipe.yaml"
    return str(saved) if saved.is_file() else None


def _suggest(key: str, specs: dict[str, Spec]) -> str:
    import difflib

    close = difflib.get_close_matches(key, list(specs), n=1)
    return f" (did you mean {specs[close[0]].key!r}?)" if close else ""


def convert_value(spec: Spec, value: Any) -> Any:
    """``value`` as the field's type; raises ValueError with a message that names the fix."""
    kind = spec.kind
    if value is None:
        if spec.default is None:
            return None
        raise ValueError("needs a value")
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "yes", "1", "on"):
            return True
        if text in ("false", "no", "0", "off"):
            return False
        raise ValueError(f"must be true or false, got {value!r}")
    if kind is list:
        items = value if isinstance(value, list | tuple) else str(value).split(",")
        return [str(item).strip() for item in items if str(item).strip()]
    if kind is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"must be a whole number, got {value!r}")
        try:
            return (
                int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
            )
        except (TypeError, ValueError):
            raise ValueError(f"must be a whole number, got {value!r}") from None
    if kind is float:
        if isinstance(value, bool):
            raise ValueError(f"must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"must be a number, got {value!r}") from None
    if isinstance(value, dict | list):
        raise ValueError(f"must be text, got {value!r}")
    return str(value)


def validate(config: TrainConfig, given: set[str] = frozenset()) -> list[str]:
    """Every problem with ``config``: required fields, choices, bounds, then the method's checks."""
    problems = field_problems(config)
    if not config.targets:
        problems.append("--targets needs at least one module, e.g. q_proj,v_proj or all-linear")
    problems += config.check(set(given))
    return problems


def field_problems(config) -> list[str]:
    """Required fields, choices and bounds of any dataclass of :func:`option` fields
    (a training run, or `lorabay label`'s LabelConfig)."""
    problems = []
    for spec in config_fields(type(config)):
        value = getattr(config, spec.name)
        meta = spec.metadata
        if meta.get("required") and value in (None, ""):
            problems.append(f"{spec.flag} is required: {spec.help[0].lower()}{spec.help[1:-1]}")
            continue
        if value is None:
            continue
        if meta.get("choices") and value not in meta["choices"]:
            problems.append(
                f"{spec.flag} must be one of {', '.join(meta['choices'])}, got {value!r}"
            )
        if isinstance(value, int | float) and not isinstance(value, bool):
            if meta.get("minimum") is not None and value < meta["minimum"]:
                problems.append(f"{spec.flag} must be at least {meta['minimum']:g}, got {value:g}")
            if meta.get("above") is not None and value <= meta["above"]:
                problems.append(
                    f"{spec.flag} must be greater than {meta['above']:g}, got {value:g}"
                )
            if meta.get("maximum") is not None and value > meta["maximum"]:
                problems.append(f"{spec.flag} must be at most {meta['maximum']:g}, got {value:g}")
        if spec.kind is list and meta.get("required") and not value:
            problems.append(f"{spec.flag} needs at least one value")
    return problems


def config_to_dict(config: TrainConfig) -> dict:
    """The run as recipe keys -> values (what `--config` would read back)."""
    return {spec.key: getattr(config, spec.name) for spec in config_fields(type(config))}


def recipe_values(config: TrainConfig, leave_out: tuple[str, ...] = ()) -> dict:
    """The fields that differ from their defaults, as recipe keys: a recipe that repeats the
    run without tripping the "both given" checks (an unchanged --epochs is not given)."""
    return {
        spec.key: getattr(config, spec.name)
        for spec in config_fields(type(config))
        if getattr(config, spec.name) != spec.default and spec.key not in leave_out
    }


def hyperparameters(config: TrainConfig) -> dict:
    """The fields that shape the adapter (for the lineage): not paths, names or bookkeeping."""
    bookkeeping = {
        "base", "data", "output", "from", "resume", "overwrite", "push", "alias",
        "description", "registry", "logging_steps", "save_steps", "keep_checkpoints", "threads",
    }  # fmt: skip
    return {key: value for key, value in config_to_dict(config).items() if key not in bookkeeping}


# ---------------------------------------------------------------- click, generated


def click_options(cls: type[TrainConfig]):
    """A decorator adding one click option per field of ``cls``; all default to None ("not given")."""
    import click

    def decorate(command):
        for spec in reversed(config_fields(cls)):
            default = ",".join(spec.default) if spec.kind is list else spec.default
            shown = "" if default in (None, "", []) else f" [default: {default}]"
            if isinstance(default, str) and default != default.strip():  # "\n" shows as '\n'
                shown = f" [default: {default!r}]"
            if spec.kind is bool:
                opt = click.option(
                    f"{spec.flag}/--no-{spec.flag[2:]}",
                    spec.name,
                    default=None,
                    help=spec.help + shown,
                )
            else:
                metavar = {int: "INT", float: "NUMBER", list: "A,B"}.get(spec.kind, "TEXT")
                if spec.metadata.get("choices"):
                    metavar = "|".join(spec.metadata["choices"])
                # Typed as text: build_config converts and reports every bad value at once.
                opt = click.option(
                    spec.flag, spec.name, default=None, metavar=metavar, help=spec.help + shown
                )
            command = opt(command)
        return command

    return decorate


def flags_from_click(cls: type[TrainConfig], params: dict) -> dict:
    """click's keyword arguments (attribute names) -> {key: value} for :func:`build_config`."""
    by_name = {spec.name: spec.key for spec in config_fields(cls)}
    return {by_name[name]: value for name, value in params.items() if name in by_name}


# ---------------------------------------------------------------- the runs


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning: loss on the completion (assistant) tokens only."""

    method: typing.ClassVar[str] = "sft"


@dataclass
class DPOConfig(TrainConfig):
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
class RewardConfig(TrainConfig):
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
        problems = super().check(given)
        if self.format == "generative" and self.center_rewards:
            problems.append(
                "--center-rewards applies to a head reward model's scalar: add --format head "
                "or drop it (a generative one's score is a probability)"
            )
        return problems


@dataclass
class PRMConfig(TrainConfig):
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
        problems = super().check(given)
        if not self.step_separator:
            problems.append("--step-separator must not be empty, e.g. a newline")
        return problems


@dataclass
class RLHFConfig(TrainConfig):
    """RLHF with PPO (train/ppo.py): the policy samples responses to prompts, the reward
    model scores them, and PPO raises the score minus a KL penalty to the starting policy."""

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
    algo: str = option("ppo", "RL algorithm.", choices=("ppo",))
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
    lr: float = option(5e-5, "Peak learning rate.", above=0, maximum=1)
    logging_steps: int = option(1, "Write metrics.jsonl every this many PPO steps.", minimum=1)

    method: typing.ClassVar[str] = "rlhf"

    def check(self, given: set[str]) -> list[str]:
        problems = super().check(given)
        if self.resume:
            problems.append("--resume: rlhf runs keep no checkpoints yet; start the run again")
        if self.nproc > 1:
            problems.append("--nproc: rlhf runs in one process; drop --nproc")
        if self.grad_accum > 1:
            problems.append("--grad-accum: PPO steps once per mini-batch; use --mini-batches")
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
