"""Two data-parallel processes (accelerate launch, gloo on CPU) train one adapter."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_two_processes_train_one_adapter(tiny_base, toy_dir, tmp_path):
    output = tmp_path / "run"
    data = toy_dir / "chat" / "sentiment-sft-train.jsonl"  # 256 records
    command = [sys.executable, "-m", "lorabay.cli.main", "train", "sft", "--base", str(tiny_base)]
    command += ["--data", str(data), "--output", str(output), "--epochs", "1", "--batch-size", "8"]
    command += [
        "--lr",
        "1e-3",
        "--targets",
        "all-linear",
        "--threads",
        "1",
        "--nproc",
        "2",
        "--json",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, done.stdout  # one result, from rank 0
    result = json.loads(lines[0])

    assert result["world_size"] == 2
    assert result["lineage"]["hyperparameters"]["world_size"] == 2
    # Each step takes 8 records on each of 2 ranks: one epoch of 256 is 16 steps, not 32.
    assert result["metrics"]["steps"] == 16
    assert result["metrics"]["loss"] < result["metrics"]["first_loss"] - 1
    adapter = output / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
