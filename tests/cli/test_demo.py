"""`lorabay demo --base tiny` (the toy loop of what `make demo` runs on the real base), end
to end: real training, registry, vLLM engine. The real-base demo is the same code with
train/tasks.py's tasks; it is run by hand (`make demo`, ~7 min) and its table is in the README."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.vllm
def test_demo_trains_pushes_serves_and_moves_an_alias(tmp_path, lorabay_home):
    env = dict(os.environ)
    # As a user runs it: vLLM-CPU's KV cache left for `lorabay serve` to size.
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    done = subprocess.run(
        [
            *(sys.executable, "-m", "lorabay.cli.main", "demo", "--base", "tiny"),
            *("--workdir", str(tmp_path / "demo")),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    # The demo itself checks each adapter's held-out answers, the base's, and the alias move.
    assert "held-out prompts answered right" in output
    assert "new requests got version 2 within" in output
    assert "everything stopped" in output

    shown = subprocess.run(
        [sys.executable, "-m", "lorabay.cli.main", "hub", "show", "demo/sentiment", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    lineage = json.loads(shown.stdout)["lineage"]
    assert lineage["method"] == "sft" and lineage["dataset_digest"].startswith("sha256:")
    assert lineage["hyperparameters"]["quantize"] == "nf4"
