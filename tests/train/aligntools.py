"""The toy alignment world the reward, PPO and PRM tests share (one per session).

Two tasks on the tiny base (train/toy.py ``write_align_toy``):

- sentiment: a reward model learns "the answer names the review's sentiment" from
  preference pairs; a policy SFT-trained on the answers only briefly (60 steps, right
  about 60% of the time when sampled at 0.3) is what PPO improves;
- praise: a PRM learns "a step is right while every word so far is kind"; a policy
  SFT-trained to write three words, kind or not at even odds, is what RL on the PRM's
  step rewards improves.

Each model is trained on first use through the same `lorabay train ...` command a user
runs (in-process, click's CliRunner), pushed to the session registry, and reused.

Sampling temperatures: the tiny base is a random init whose lm_head caps how far one
logit can rise above the 2047 others (a token gets at most ~7% at temperature 1), so
rollouts sample at 0.2-0.3, where the trained answers hold nearly all the mass.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from click.testing import CliRunner

# Settings that train a toy task in seconds on the tiny base (see tests/train/conftest.py FAST).
TINY = ["--threads", "1", "--batch-size", "16", "--dropout", "0", "--logging-steps", "5"]
NEW_ADAPTER = ["--targets", "all-linear", "--lr", "1e-3"]
# PPO on the sentiment task: answers are 3-5 tokens.
SENTIMENT_PPO = ["--temperature", "0.3", "--lr", "5e-4", "--max-new-tokens", "8"]
SENTIMENT_PPO += ["--max-steps", "30", "--logging-steps", "1"]


class AlignWorld:
    def __init__(self, base: Path, root: Path):
        from lorabay.train.toy import write_align_toy

        self.base = base
        self.root = root
        self.registry = f"file://{root / 'registry'}"
        self.data = write_align_toy(root / "toy")

    def run(self, *args: str) -> dict:
        """``lorabay ARGS --json`` in-process; its JSON answer (fails the test on an error)."""
        from lorabay.cli.main import cli

        result = CliRunner().invoke(cli, [*args, "--json"])
        if result.exit_code != 0:  # with the traceback of what failed, not only the output
            raise AssertionError(result.output[-2000:]) from result.exception
        return json.loads(result.stdout.strip().splitlines()[-1])

    def train(self, method: str, name: str, *args: str) -> dict:
        """``lorabay train METHOD`` on the tiny base, pushed to the session registry as NAME."""
        output = str(self.root / "runs" / name.replace("/", "-"))
        common = ["--base", str(self.base), "--output", output, "--registry", self.registry]
        return self.run("train", method, *common, *TINY, *args, "--push", name)

    @functools.cached_property
    def reward_model(self) -> dict:
        data = str(self.data["sentiment-pairs-train"])
        # The score-head format (--format head): test_reward.py holds its bars and its
        # agreement with TRL's sequence classifier; the generative default: test_verifier.py.
        args = ["--data", data, "--format", "head", *NEW_ADAPTER, "--max-steps", "60"]
        return self.train("reward", "toy/rm", *args)

    @functools.cached_property
    def sentiment_policy(self) -> dict:
        """60 SFT steps on the right answers: half learned, PPO's starting policy. (At 80 steps
        it is right 98% of the time when sampled at 0.3, leaving PPO nothing to do.)"""
        data = str(self.data["sentiment-sft"])
        args = ["--data", data, *NEW_ADAPTER, "--scheduler", "constant", "--max-steps", "60"]
        return self.train("sft", "toy/sentiment-sft", *args)

    @functools.cached_property
    def prm(self) -> dict:
        data = str(self.data["steps-prm-train"])
        args = ["--data", data, "--format", "head", "--targets", "all-linear", "--lr", "2e-3"]
        return self.train("prm", "toy/prm", *args, "--max-steps", "80")

    @functools.cached_property
    def steps_policy(self) -> dict:
        """SFT on three words a line each, kind at even odds: RL on step rewards starts here."""
        data = str(self.data["steps-mixed-sft"])
        args = ["--data", data, *NEW_ADAPTER, "--scheduler", "constant", "--max-steps", "80"]
        return self.train("sft", "toy/steps-sft", *args)

    def prompts(self, name: str) -> list:
        from lorabay.train.data import load_records

        return [record["prompt"] for record in load_records(self.data[name])]


def sample_texts(base: Path, adapter, prompts: list, temperature: float, seed: int = 0) -> list:
    """One sampled response per prompt from the base with ``adapter`` (as PPO samples)."""
    import torch

    from lorabay.train.evaluate import load_policy_for_eval
    from lorabay.train.ppo import generate_rollouts

    model, tokenizer = load_policy_for_eval(base, adapter)
    torch.manual_seed(seed)
    return generate_rollouts(model, tokenizer, prompts, temperature, max_new_tokens=12).texts
