"""Two data-parallel processes (accelerate launch, gloo on CPU) train one adapter.

Sharding alone would also give 16 steps: what makes it one run is that the processes
synchronise their gradients, so each takes the same update and ends with the same
weights. Each process reports a digest of its trainable weights after training, through
a ``sitecustomize`` module on PYTHONPATH (Python imports it at start in every process
``accelerate launch`` starts), without any hook in lorabay itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

WEIGHTS_DIGEST = """
import os

if os.environ.get("RANK") is not None and os.environ.get("LORABAY_TEST_DIGESTS"):
    import transformers

    _train = transformers.Trainer.train

    def train(self, *args, **kwargs):
        result = _train(self, *args, **kwargs)
        import hashlib
        from pathlib import Path

        digest = hashlib.sha256()
        model = self.accelerator.unwrap_model(self.model)
        for name, param in sorted(model.named_parameters()):
            if param.requires_grad:
                digest.update(name.encode() + param.detach().cpu().numpy().tobytes())
        folder = Path(os.environ["LORABAY_TEST_DIGESTS"])
        (folder / f"rank-{os.environ['RANK']}").write_text(digest.hexdigest())
        return result

    transformers.Trainer.train = train
"""


@pytest.mark.slow
def test_two_processes_train_one_adapter(tiny_base, toy_dir, tmp_path):
    output = tmp_path / "run"
    data = toy_dir / "chat" / "sentiment-sft-train.jsonl"  # 256 records
    hook, digests = tmp_path / "hook", tmp_path / "digests"
    hook.mkdir()
    digests.mkdir()
    (hook / "sitecustomize.py").write_text(WEIGHTS_DIGEST)
    env = {**os.environ, "LORABAY_TEST_DIGESTS": str(digests)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "lorabay.cli.main", "train", "sft", "--base", str(tiny_base)]
    command += ["--data", str(data), "--output", str(output), "--epochs", "1", "--batch-size", "8"]
    command += ["--lr", "1e-3", "--targets", "all-linear", "--threads", "1", "--nproc", "2"]
    done = subprocess.run(
        [*command, "--json"], capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, done.stdout  # one result, from rank 0
    result = json.loads(lines[0])

    assert result["world_size"] == 2
    assert result["lineage"]["hyperparameters"]["world_size"] == 2
    # Each step takes 8 records on each of 2 ranks: one epoch of 256 is 16 steps, not 32.
    assert result["metrics"]["steps"] == 16
    assert result["metrics"]["loss"] < result["metrics"]["first_loss"] - 1
    # The gradients were synchronised: both ranks saw different records and hold the same
    # weights (each alone would have drifted its own way).
    ranks = {path.name: path.read_text() for path in digests.iterdir()}
    assert sorted(ranks) == ["rank-0", "rank-1"] and len(set(ranks.values())) == 1, ranks
    adapter = output / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
