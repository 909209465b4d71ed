"""SFT learns a toy task the tiny base cannot do, with LoRA and with QLoRA (NF4 base)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from lorabay.cli.main import cli
from lorabay.train.data import load_records as read_jsonl
from lorabay.train.evaluate import greedy_answers, load_policy_for_eval, record_prompt
from lorabay.train.progress import read_metrics


def heldout_accuracy(base, adapter, records, quantize="none") -> tuple[float, list[str]]:
    model, tokenizer = load_policy_for_eval(base, adapter, quantize)
    answers = greedy_answers(model, tokenizer, records)
    expected = [record_prompt(r)[1].strip() for r in records]
    return sum(a == e for a, e in zip(answers, expected, strict=True)) / len(records), answers


def losses(output) -> tuple[float, float]:
    logged = [r["loss"] for r in read_metrics(output / "metrics.jsonl") if "loss" in r]
    return logged[0], logged[-1]


@pytest.mark.slow
def test_lora_learns_sentiment_from_prompt_completion(tiny_base, toy_dir, tmp_path):
    """Through the CLI, with --push: loss falls, held-out reviews are classified, lineage lands."""
    data = toy_dir / "text" / "sentiment-sft-train.jsonl"
    output = tmp_path / "run"
    args = ["train", "sft", "--base", str(tiny_base), "--data", str(data), "--output", str(output)]
    args += ["--max-steps", "120", "--lr", "1e-3", "--batch-size", "16", "--targets", "all-linear"]
    args += ["--dropout", "0", "--threads", "1", "--push", "toy/sentiment", "--alias", "dev"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output

    # One line: the adapter folder, NAME:VERSION and digest, steps and loss.
    line = result.stdout.strip()
    assert line.startswith(f"{output / 'adapter'} -> toy/sentiment:1 sha256:"), line
    first, last = losses(output)
    assert last < first / 2, (first, last)  # ~7.8 (uniform over 2048 tokens) -> ~2.8

    heldout = read_jsonl(toy_dir / "text" / "sentiment-sft-heldout.jsonl")
    accuracy, answers = heldout_accuracy(tiny_base, output / "adapter", heldout)
    assert accuracy >= 0.9, answers
    base_accuracy, base_answers = heldout_accuracy(tiny_base, None, heldout)
    assert base_accuracy == 0, base_answers

    shown = CliRunner().invoke(cli, ["hub", "show", "toy/sentiment:dev"])
    assert shown.exit_code == 0, shown.output
    assert "method=sft" in shown.output and "dataset_digest=sha256:" in shown.output
    assert "'lr': 0.001" in shown.output and "'steps': 120" in shown.output


@pytest.mark.slow
def test_qlora_learns_to_reverse_from_messages(tiny_base, toy_dir, tmp_path):
    """The base in 4-bit NF4 (double quantization), loss on the assistant turn only, and the
    toy recipe the demo uses: held-out word pairs come back reversed."""
    from lorabay.train.config import SFTConfig, build_config
    from lorabay.train.sft import train_sft
    from lorabay.train.toy import write_toy

    files = write_toy("reverse", tmp_path / "toy", train=256, heldout=32, shape="messages")
    flags = {"base": str(tiny_base), "output": str(tmp_path / "run"), "quantize": "nf4"}
    config = build_config(SFTConfig, files["sft-recipe"], {**flags, "threads": 1})
    result = train_sft(config, show_progress=False)
    assert result.lineage["hyperparameters"]["quantize"] == "nf4"
    first, last = losses(result.output)
    assert last < first / 2, (first, last)

    heldout = read_jsonl(files["sft-heldout"])
    accuracy, answers = heldout_accuracy(tiny_base, result.adapter, heldout, quantize="nf4")
    assert accuracy >= 0.9, answers
    base_accuracy, _ = heldout_accuracy(tiny_base, None, heldout, quantize="nf4")
    assert base_accuracy == 0
