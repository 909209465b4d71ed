"""What every training method does around its trainer: the run folder, the parent adapter,
the Trainer arguments, the final adapter, the lineage, the push.

A run folder (``--output``) holds::

    adapter/          the trained PEFT adapter (adapter_config.json + adapter_model.safetensors)
    checkpoints/      Trainer checkpoints (``--resume`` continues from the last one)
    metrics.jsonl     one line per log event (loss, steps/s, learning rate, ...)
    recipe.yaml       the resolved run config: ``--config recipe.yaml`` repeats the run
    lineage.json      method, dataset digest, parent digest, hyper-parameters, final metrics

Only the main process writes; every process trains.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from lorabay.hub.atomic import write_atomically
from lorabay.hub.errors import ConfigError
from lorabay.train.config import TrainConfig, TrainerOptions, hyperparameters, resumes
from lorabay.train.options import recipe_values

RUN_PARTS = ("adapter", "checkpoints", "metrics.jsonl", "lineage.json", "recipe.yaml")


@dataclass
class RunResult:
    """What a finished run reports (the CLI prints it, tests read it)."""

    output: Path
    adapter: Path
    lineage: dict
    metrics: dict
    manifest: object | None = None  # lorabay.hub.Manifest with --push
    world_size: int = 1
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        result = {
            "output": str(self.output),
            "adapter": str(self.adapter),
            "method": self.lineage.get("method"),
            "world_size": self.world_size,
            "metrics": self.metrics,
            "lineage": self.lineage,
        }
        if self.manifest is not None:
            result["pushed"] = {
                "ref": self.manifest.ref,
                "name": self.manifest.name,
                "version": self.manifest.version,
                "digest": self.manifest.digest,
            }
        result.update(self.extra)
        return result


def world() -> tuple[int, int]:
    """(rank, world size) of this process: accelerate/torchrun set RANK and WORLD_SIZE."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return world()[0] == 0


def default_output(method: str) -> Path:
    return Path("runs") / f"{method}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare_output(config: TrainConfig) -> Path:
    """The run folder, created; ``--overwrite`` clears an earlier run's parts first."""
    _, world_size = world()
    if config.output is None and world_size > 1:
        raise ConfigError(
            "several processes need one run folder", "give --output when launching processes"
        )
    output = Path(config.output) if config.output else default_output(config.method)
    if is_main_process():
        if config.overwrite:
            for part in RUN_PARTS:
                path = output / part
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        (output / "checkpoints").mkdir(parents=True, exist_ok=True)
        # The recipe repeats this run; --resume/--overwrite/--nproc say how it was started.
        values = recipe_values(config, leave_out=("resume", "overwrite", "nproc"))
        write_recipe({**values, "output": str(output)}, output / "recipe.yaml")
    return output


def write_recipe(values: dict, path: Path) -> Path:
    """Write ``values`` (recipe keys) as a YAML recipe, whole or not at all."""
    import yaml

    return write_atomically(path, yaml.safe_dump(values, sort_keys=False))


@dataclass(frozen=True)
class Parent:
    """The adapter a run starts from (``--from``): where its files are and its digest."""

    folder: Path
    digest: str
    ref: str
    kind: str | None = None  # the manifest's kind (lora, reward, prm); None for a folder


@dataclass(frozen=True)
class RunStart:
    """What a run knows before it loads a model (:func:`begin_run`)."""

    output: Path
    dataset_digest: str
    parent: Parent | None
    checkpoint: str | None  # the checkpoint --resume continues from
    provenance: dict | None = None  # where `lorabay label` data came from (its provenance file)


def begin_run(config: TrainConfig) -> RunStart:
    """Digest the data, find ``--from``, make the run folder, find the checkpoint to resume."""
    from lorabay.train.data import dataset_digest
    from lorabay.train.label.provenance import data_provenance

    digest = dataset_digest(config.data)
    parent = resolve_parent(config)
    output = prepare_output(config)
    provenance = data_provenance(config.data, digest)
    return RunStart(output, digest, parent, resume_checkpoint(config, output), provenance)


def resolve_parent(config: TrainConfig) -> Parent | None:
    """Find ``--from``: a local adapter folder, or a registry reference pulled and verified."""
    if not config.from_ref:
        return None
    return resolve_adapter(config.from_ref, config.registry)


def resolve_adapter(ref: str, registry_url: str | None = None) -> Parent:
    """An adapter named on the command line: a local folder, or a registry reference pulled
    and verified."""
    from lorabay.hub.content import scan_adapter

    folder = Path(ref).expanduser()
    if folder.is_dir():
        return Parent(folder, scan_adapter(folder).digest, str(folder))
    from lorabay.hub import Registry

    registry = Registry.open(registry_url)
    manifest = registry.resolve(ref)
    return Parent(registry.pull(manifest), manifest.digest, manifest.ref, manifest.kind)


def load_policy(config: TrainConfig, parent: Parent | None, head: str | None = None):
    """(base, tokenizer, lora_config or None): the base, and either a new LoRA config or,
    with ``--from``, the base already wrapped with the parent adapter (trainable).
    ``head`` ("reward", "prm"): the base gets a new ``score`` head, trained with the adapter."""
    from transformers import set_seed
    from transformers.utils import logging as transformers_logging

    from lorabay.train.model import (
        check_targets,
        linear_module_names,
        load_adapter,
        load_base,
        new_lora_config,
    )

    transformers_logging.disable_progress_bar()  # "Loading weights" bars; RunProgress is the bar
    set_threads(config)
    # A new head (reward, prm) is initialised here, before any trainer seeds: same seed, same run.
    set_seed(config.seed)

    # Only Trainer runs take --dropout; PPO samples and updates with dropout off
    # (train/ppo.py), so its adapter says 0, what ran.
    dropout = config.dropout if isinstance(config, TrainerOptions) else 0.0
    model, tokenizer = load_base(config.base, config.quantize, config.precision, head=head)
    if parent is not None:
        model = load_adapter(model, parent.folder, trainable=True, dropout=dropout, head=head)
        return model, tokenizer, None
    check_targets(model, config.targets)
    targets = config.targets
    if head is not None and targets == ["all-linear"]:
        targets = linear_module_names(model)  # not the new head: it is trained whole
    lora_config = new_lora_config(config.r, config.alpha, targets, dropout, head)
    return model, tokenizer, lora_config


def set_threads(config: TrainConfig) -> None:
    """Pick torch's CPU threads. A small model gains nothing from threads and loses a lot
    when the cores are shared: measured here on the tiny base, 30 SFT steps took 4-6 s on
    one thread and 25-95 s on two while other work ran."""
    import torch

    threads = config.threads
    if threads == 0 and not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        from lorabay.train.plan import count_base_parameters

        try:
            small = count_base_parameters(config.base) < 100_000_000
        except Exception:  # an unknown architecture: leave torch's default
            small = False
        threads = 1 if small else 0
    if threads:
        torch.set_num_threads(threads)


def trainer_arguments(config: TrainerOptions, output: Path) -> dict:
    """Keyword arguments shared by every TRL config (SFTConfig, DPOConfig, RewardConfig...)."""
    import torch

    from lorabay.train.model import compute_dtype

    on_gpu = torch.cuda.is_available()
    return {
        "output_dir": str(output / "checkpoints"),
        "num_train_epochs": config.epochs,
        "max_steps": config.max_steps or -1,
        "learning_rate": config.lr,
        "lr_scheduler_type": config.scheduler,
        "warmup_steps": config.warmup_ratio,  # a float below 1 is a ratio of the steps
        "weight_decay": config.weight_decay,
        "per_device_train_batch_size": config.batch_size,
        "gradient_accumulation_steps": config.grad_accum,
        "gradient_checkpointing": config.gradient_checkpointing,
        "bf16": compute_dtype(config.base, config.precision) == torch.bfloat16,
        "fp16": False,
        "use_cpu": not on_gpu,
        "seed": config.seed,
        "data_seed": config.seed,
        "logging_steps": config.logging_steps,
        "logging_first_step": True,
        "save_strategy": "steps",
        "save_steps": config.save_steps,
        "save_total_limit": config.keep_checkpoints,
        "report_to": "none",
        "disable_tqdm": True,  # RunProgress draws the bar
        "dataloader_num_workers": 0,
        # gloo for CPU ranks; naming a backend in a single process would make accelerate
        # look for a process group that does not exist.
        "ddp_backend": "gloo" if not on_gpu and world()[1] > 1 else None,
        "ddp_find_unused_parameters": False,
        "max_length": config.max_length,
    }


def quiet_trainer(trainer) -> None:
    """Drop the Trainer's own printing of log dicts: RunProgress shows and records them. And
    its "mtime may not be reliable" warning, which only means two checkpoints were saved
    within a second (a short run); it then orders them by step number, as it should."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    checkpoints_log = logging.getLogger("transformers.trainer_utils")
    if not any(isinstance(f, MtimeNotice) for f in checkpoints_log.filters):
        checkpoints_log.addFilter(MtimeNotice())


class MtimeNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "mtime may not be reliable" not in record.getMessage()


def resume_checkpoint(config: TrainConfig, output: Path) -> str | None:
    """The checkpoint ``--resume`` continues from, or None for a fresh run."""
    if not resumes(config):
        return None
    last = last_complete_checkpoint(output / "checkpoints")
    if last is None:
        raise ConfigError(
            f"--resume: no checkpoint in {output / 'checkpoints'}", "start without --resume"
        )
    return last


def last_complete_checkpoint(folder: Path) -> str | None:
    """The newest checkpoint the Trainer finished writing. A run killed while saving leaves a
    checkpoint folder without trainer_state.json (the Trainer writes it last): skip it."""
    if not folder.is_dir():
        return None
    steps = []
    for path in folder.iterdir():
        step = path.name.removeprefix("checkpoint-")
        if path.is_dir() and step.isdigit() and (path / "trainer_state.json").is_file():
            steps.append((int(step), path))
    return str(max(steps)[1]) if steps else None


def final_metrics(progress, state) -> dict:
    """The numbers worth keeping in the lineage: the last value of each logged metric."""
    skip = {"learning_rate", "grad_norm", "total_flos", "step", "epoch", "time"}
    metrics = {k: _round(v) for k, v in progress.last.items() if k not in skip}
    metrics["steps"] = state.global_step
    metrics["epochs"] = _round(state.epoch or 0.0)
    first_loss = next((h["loss"] for h in state.log_history if "loss" in h), None)
    if first_loss is not None:
        metrics["first_loss"] = _round(first_loss)
    return metrics


def _round(value: float) -> float:
    return float(f"{value:.6g}") if math.isfinite(value) else 0.0


def train_and_finish(
    config: TrainConfig,
    run: RunStart,
    trainer,
    progress,
    kind: str = "lora",
    extra_files: dict[str, str] | None = None,
) -> RunResult:
    """Train (from ``--resume``'s checkpoint, if any), then save the adapter and the lineage
    and push with ``--push`` (the main process only)."""
    quiet_trainer(trainer)
    trainer.train(resume_from_checkpoint=run.checkpoint)
    model = trainer.accelerator.unwrap_model(trainer.model)
    result = save_run(config, run, model, trainer.state, progress, kind, extra_files)
    trainer.accelerator.wait_for_everyone()
    return result


def save_run(
    config: TrainConfig,
    run: RunStart,
    model,
    state,
    progress,
    kind: str = "lora",
    extra_files: dict[str, str] | None = None,
    extra_hyperparameters: dict | None = None,
) -> RunResult:
    """The end of :func:`train_and_finish`, for a loop of our own (PPO): ``state`` is a transformers
    TrainerState the loop kept. ``extra_files`` are written into the adapter folder;
    ``extra_hyperparameters`` join the lineage's (PPO: the reward model's digest)."""
    import torch

    from lorabay.train.model import compute_dtype, save_adapter

    _, world_size = world()
    output, parent = run.output, run.parent
    metrics = final_metrics(progress, state)
    params = hyperparameters(config)
    # --precision auto names what ran: the precision it chose for this base.
    bf16 = compute_dtype(config.base, config.precision) == torch.bfloat16
    params["precision"] = "bf16" if bf16 else "fp32"
    if parent is not None:  # the adapter's shape came from the parent, not from the flags
        peft_config = model.peft_config["default"]
        modules = peft_config.target_modules
        modules = (
            [modules]
            if isinstance(modules, str)
            else sorted({m.rsplit(".", 1)[-1] for m in modules})
        )
        params.update(r=peft_config.r, alpha=peft_config.lora_alpha, targets=modules)
    params.update(extra_hyperparameters or {})
    params["world_size"] = world_size
    lineage = {
        "method": config.method,
        "dataset_digest": run.dataset_digest,
        "parent_digest": parent.digest if parent else None,
        "hyperparameters": params,
        "metrics": metrics,
    }
    if run.provenance is not None:
        lineage["dataset_provenance"] = run.provenance
    adapter = output / "adapter"
    manifest = None
    if is_main_process():
        save_adapter(model, adapter, extra_files)
        (output / "lineage.json").write_text(json.dumps(lineage, indent=2) + "\n")
        if config.push:
            from lorabay.train.push import push_adapter

            manifest = push_adapter(
                adapter,
                config.push,
                base=config.base,
                lineage=lineage,
                kind=kind,
                registry=config.registry,
                aliases=config.alias,
                description=config.description,
            )
    return RunResult(output, adapter, lineage, metrics, manifest, world_size)
