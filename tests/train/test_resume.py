"""A run killed midway continues from its last complete checkpoint with --resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from lorabay.cli.main import cli
from lorabay.train.progress import read_metrics


@pytest.mark.slow
def test_killed_run_resumes_from_its_last_checkpoint(tiny_base, toy_dir, tmp_path):
    output = tmp_path / "run"
    data = toy_dir / "chat" / "sentiment-sft-train.jsonl"
    command = [sys.executable, "-m", "lorabay.cli.main", "train", "sft", "--base", str(tiny_base)]
    command += ["--data", str(data), "--output", str(output), "--max-steps", "80"]
    command += ["--save-steps", "10", "--logging-steps", "1", "--lr", "1e-3", "--batch-size", "16"]
    command += ["--targets", "all-linear", "--dropout", "0", "--threads", "1"]
    log = (tmp_path / "first.log").open("w")
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    checkpoint = output / "checkpoints" / "checkpoint-20" / "trainer_state.json"
    try:
        deadline = time.monotonic() + 300
        while not checkpoint.exists():
            assert process.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint-20 within 300 s"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # as a crash would: no cleanup, maybe mid-save
        process.wait()
    assert not (output / "adapter").exists()
    before = read_metrics(output / "metrics.jsonl")
    killed_at = before[-1]["step"]
    assert 20 <= killed_at < 80

    # --output and --resume alone: the run's own recipe.yaml supplies the rest.
    result = CliRunner().invoke(
        cli, ["train", "sft", "--output", str(output), "--resume", "--json"]
    )
    assert result.exit_code == 0, result.output
    finished = json.loads(result.stdout)
    assert finished["metrics"]["steps"] == 80
    assert (output / "adapter" / "adapter_model.safetensors").is_file()

    records = read_metrics(output / "metrics.jsonl")
    resumed = records[len(before) :]
    # It went on from a checkpoint at or after step 20, not from step 1 ...
    assert 20 < resumed[0]["step"] <= killed_at + 1, (killed_at, resumed[0])
    assert resumed[-1]["step"] == 80
    # ... with the trained weights: the loss picks up where it was, far below the start.
    assert resumed[0]["loss"] < before[0]["loss"] - 2, (before[0], resumed[0])
