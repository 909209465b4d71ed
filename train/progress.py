"""Progress for any Trainer-based run: a tqdm bar (loss, steps/s) and ``metrics.jsonl``.

:class:`RunProgress` is a ``transformers.TrainerCallback``; every method (SFT, DPO,
and later the reward model) adds it to its trainer. Each log event becomes one JSON
line in ``metrics.jsonl`` (appended, so a resumed run continues the same file), and
the last value of every metric is kept for the lineage. Only the main process
writes or draws.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from transformers import TrainerCallback


class RunProgress(TrainerCallback):
    def __init__(
        self,
        metrics_path: str | os.PathLike,
        show_bar: bool = True,
        bar_keys: tuple[str, ...] = ("loss",),
    ):
        self.metrics_path = Path(metrics_path)
        self.show_bar = show_bar
        self.bar_keys = bar_keys  # the metrics the bar shows beside steps/s
        self.bar = None
        self.last: dict[str, float] = {}  # the latest value of each logged metric
        self._start_time = 0.0
        self._start_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._start_time = time.monotonic()
        self._start_step = state.global_step
        if state.is_world_process_zero and self.show_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=state.max_steps,
                initial=state.global_step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
                # In a log file (not a terminal) a line every 15 s, not one per step.
                mininterval=0.1 if sys.stderr.isatty() else 15,
            )

    def steps_per_second(self, state) -> float:
        elapsed = time.monotonic() - self._start_time
        return (state.global_step - self._start_step) / elapsed if elapsed > 0 else 0.0

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
            self.bar.set_postfix(self._postfix(self.last, state), refresh=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        numbers = {
            k: float(v)
            for k, v in logs.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        }
        self.last.update(numbers)
        record = {
            "step": state.global_step,
            "epoch": round(state.epoch or 0.0, 4),
            "time": round(time.time(), 3),
            "steps_per_second": round(self.steps_per_second(state), 4),
            **numbers,
        }
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.bar is not None and any(key in numbers for key in self.bar_keys):
            # In a log file (no TTY) the bar redraws every `mininterval`, not every log.
            self.bar.set_postfix(self._postfix(numbers, state), refresh=sys.stderr.isatty())

    def _postfix(self, numbers: dict, state) -> dict:
        shown = {key: f"{numbers[key]:.4g}" for key in self.bar_keys if key in numbers}
        return {**shown, "steps/s": f"{self.steps_per_second(state):.2f}"}

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
            self.bar.close()
            self.bar = None


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl, oldest first."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
