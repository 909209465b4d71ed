"""DPO from an SFT adapter in the registry raises the chosen-over-rejected margin on held-out pairs."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from lorabay.cli.main import cli
from lorabay.train.data import dataset_digest
from lorabay.train.data import load_records as read_jsonl
from lorabay.train.evaluate import load_policy_for_eval, preference_margin


def heldout_margin(base, adapter, pairs) -> float:
    model, tokenizer = load_policy_for_eval(base, adapter)
    return preference_margin(model, tokenizer, pairs)


@pytest.mark.slow
def test_dpo_from_registry_adapter_raises_margin(train, tiny_base, toy_dir, tmp_path):
    # An SFT adapter, pushed: DPO starts from it by reference. (Its held-out margin is small,
    # ~1.6 nats, though its greedy answers are right: the random base's lm_head caps logits.)
    sft = train(
        "sft",
        data=str(toy_dir / "chat" / "sentiment-sft-train.jsonl"),
        output=str(tmp_path / "sft"),
        max_steps=120,
        push="toy/sentiment",
    )
    data = toy_dir / "chat" / "sentiment-dpo-train.jsonl"
    args = [
        "train",
        "dpo",
        "--base",
        str(tiny_base),
        "--data",
        str(data),
        "--from",
        "toy/sentiment:1",
    ]
    args += [
        "--output",
        str(tmp_path / "dpo"),
        "--max-steps",
        "30",
        "--lr",
        "1e-3",
        "--beta",
        "0.1",
    ]
    args += ["--batch-size", "16", "--threads", "1", "--push", "toy/sentiment", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    dpo = json.loads(result.stdout)

    # The reference is the parent adapter, frozen beside the trained copy: at step 1 policy and
    # reference agree, so the DPO loss is exactly -log sigmoid(0) = ln 2.
    assert dpo["reference"] == "frozen adapter 'ref' (the parent)"
    assert math.isclose(dpo["metrics"]["first_loss"], math.log(2), abs_tol=1e-4)
    assert dpo["metrics"]["rewards/margins"] > 0

    pairs = read_jsonl(toy_dir / "chat" / "sentiment-dpo-heldout.jsonl")
    before = heldout_margin(tiny_base, sft.adapter, pairs)
    after = heldout_margin(tiny_base, dpo["adapter"], pairs)
    assert after > before + 5.0, (before, after, dpo["metrics"])  # nats, mean over 32 pairs

    assert dpo["pushed"]["ref"] == "toy/sentiment:2"
    lineage = dpo["lineage"]
    assert lineage["method"] == "dpo"
    assert lineage["parent_digest"] == sft.manifest.digest
    assert lineage["dataset_digest"] == dataset_digest(data)
    assert lineage["hyperparameters"]["beta"] == 0.1
    assert lineage["hyperparameters"]["targets"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )  # the parent's shape


@pytest.mark.slow
def test_fresh_dpo_uses_the_base_with_the_adapter_disabled(train, toy_dir, tmp_path):
    result = train(
        "dpo",
        data=str(toy_dir / "text" / "sentiment-dpo-train.jsonl"),
        output=str(tmp_path / "d"),
        max_steps=5,
    )
    assert result.extra["reference"] == "base with the adapter disabled"
    assert math.isclose(result.metrics["first_loss"], math.log(2), abs_tol=1e-4)
    assert result.lineage["parent_digest"] is None
