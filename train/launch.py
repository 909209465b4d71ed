"""``--nproc N``: the same run as N data-parallel processes, through ``accelerate launch``.

The resolved config is written to a recipe and every process runs
``lorabay train <method> --config RECIPE``; on a CPU the processes talk over gloo.
It is exactly what a user would type:

    accelerate launch --multi_gpu --num_processes 2 -m lorabay.cli.main train sft --config r.yaml

(``--multi_gpu`` is accelerate's name for "start one process per rank with torchrun";
without a GPU the ranks use the CPU and gloo. Plain ``--num_processes 2`` without it
starts a single process.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from lorabay.hub.errors import LorabayError
from lorabay.hub.ports import free_port
from lorabay.train.config import TrainConfig
from lorabay.train.options import recipe_values
from lorabay.train.run import default_output, write_recipe


class LaunchFailed(LorabayError):
    """A process of a data-parallel run exited with an error (it printed its own above)."""

    def __init__(self, exit_code: int):
        self.exit_code = exit_code
        super().__init__(
            f"a process of the data-parallel run exited with code {exit_code}",
            "its error is above; fix it and run the same command again",
        )


def launch_command(recipe: Path, method: str, nproc: int, as_json: bool) -> list[str]:
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", str(nproc), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
        "-m", "lorabay.cli.main", "train", method, "--config", str(recipe),
    ]  # fmt: skip
    return command + (["--json"] if as_json else [])


def launch_data_parallel(config: TrainConfig, as_json: bool = False) -> None:
    """Run ``config`` (a Trainer run: :class:`TrainerOptions`) in ``config.nproc`` processes;
    LaunchFailed when one fails."""
    values = recipe_values(config, leave_out=("nproc",))  # each process is one of the N
    values["output"] = config.output or str(default_output(config.method))
    with tempfile.TemporaryDirectory(prefix="lorabay-launch-") as folder:
        recipe = write_recipe(values, Path(folder) / "recipe.yaml")
        env = dict(os.environ)
        # One compute thread per process unless the user chose: N processes share the cores.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // config.nproc)))
        code = subprocess.call(
            launch_command(recipe, config.method, config.nproc, as_json), env=env
        )
    if code:
        raise LaunchFailed(code)
