"""The training methods, and how a run starts: in this process or in ``--nproc`` processes.

    from lorabay.train.config import build_config
    from lorabay.train.methods import METHODS, run_training

    config = build_config(METHODS["sft"].config, recipe="sft.yaml", flags={"lr": "1e-3"})
    result = run_training(config)   # a RunResult; None where another process reports the run

``lorabay train NAME`` is this table and this function (cli/train.py only parses and
prints). Each method's module imports torch only inside its function, so the table is
cheap to import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lorabay.train.config import (
    DPOConfig,
    PRMConfig,
    RewardConfig,
    RLHFConfig,
    SFTConfig,
    TrainConfig,
    TrainerOptions,
)
from lorabay.train.dpo import train_dpo
from lorabay.train.ppo import train_rlhf
from lorabay.train.prm import train_prm
from lorabay.train.reward import train_reward
from lorabay.train.run import RunResult, is_main_process
from lorabay.train.sft import train_sft


@dataclass(frozen=True)
class Method:
    """A training method: its command name, its config, and what trains a built config."""

    name: str
    config: type[TrainConfig]
    train: Callable[..., RunResult]  # (config, show_progress=True) -> RunResult


METHODS = {
    method.name: method
    for method in (
        Method("sft", SFTConfig, train_sft),
        Method("dpo", DPOConfig, train_dpo),
        Method("reward", RewardConfig, train_reward),
        Method("rlhf", RLHFConfig, train_rlhf),
        Method("prm", PRMConfig, train_prm),
    )
}


def run_training(
    config: TrainConfig, *, show_progress: bool = True, as_json: bool = False
) -> RunResult | None:
    """Train ``config`` (built by ``build_config``). With ``--nproc N`` (a Trainer run):
    ``accelerate launch`` starts N processes, each running ``lorabay train`` on the same
    recipe, and the main one prints the run's result (as JSON with ``as_json``); None
    here then, and LaunchFailed if a process failed. In one process: the RunResult, or
    None on a rank other than the main one (the main rank reports the run)."""
    if isinstance(config, TrainerOptions) and config.nproc > 1:
        from lorabay.train.launch import launch_data_parallel

        launch_data_parallel(config, as_json)
        return None
    result = METHODS[config.method].train(config, show_progress=show_progress)
    return result if is_main_process() else None
