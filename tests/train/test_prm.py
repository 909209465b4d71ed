"""The process reward model, `lorabay score`, and RL on the PRM's step rewards."""

from __future__ import annotations

import json
import math

import pytest
from aligntools import sample_texts
from click.testing import CliRunner

from lorabay.cli.main import cli
from lorabay.train.data import load_records

STEP_RL = ["--temperature", "0.2", "--lr", "3e-4", "--max-new-tokens", "12"]
STEP_RL += ["--max-steps", "12", "--logging-steps", "1"]


def load_prm(align):
    from lorabay.train.heads import attach_head
    from lorabay.train.model import load_base
    from lorabay.train.run import resolve_adapter

    model, tokenizer = load_base(align.base)
    model, head = attach_head(model, resolve_adapter("toy/prm:1", align.registry), "prm", "prm")
    return head, tokenizer


@pytest.mark.slow
def test_prm_judges_heldout_steps_by_the_rule(align):
    from lorabay.hub import Registry
    from lorabay.train.heads import step_probabilities

    run = align.prm
    assert run["pushed"]["ref"] == "toy/prm:1"
    head, tokenizer = load_prm(align)
    records = load_records(align.data["steps-prm-heldout"])
    probabilities = step_probabilities(
        head, tokenizer, [r["prompt"] for r in records], [r["completions"] for r in records]
    )
    judged = [
        (p > 0.5) == label
        for record, found in zip(records, probabilities, strict=True)
        for p, label in zip(found, record["labels"], strict=True)
    ]
    labels = [label for record in records for label in record["labels"]]
    majority = max(sum(labels), len(labels) - sum(labels)) / len(labels)
    accuracy = sum(judged) / len(judged)
    assert accuracy >= 0.9 and accuracy > majority + 0.3, (accuracy, majority)
    # The rule needs the earlier steps: a kind word after an unkind one is still wrong.
    later = [
        (p > 0.5) == label
        for record, found in zip(records, probabilities, strict=True)
        for k, (p, label) in enumerate(zip(found, record["labels"], strict=True))
        if k
        and record["completions"][k].strip() in ("great excellent fine nice kind").split()
        and not record["labels"][k - 1]
    ]
    assert later and sum(later) / len(later) >= 0.8, later

    manifest = Registry.open(align.registry).resolve("toy/prm:1")
    assert manifest.kind == "prm" and manifest.lineage["method"] == "prm"
    assert manifest.peft["modules_to_save"] == ["score"]


@pytest.mark.slow
def test_the_head_reads_what_the_token_classifier_trained(align):
    """PPO and `lorabay score` read the PRM over the causal LM; training used a token
    classifier: the same probabilities."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForTokenClassification

    from lorabay.train.heads import step_input, step_probabilities
    from lorabay.train.run import resolve_adapter

    head, tokenizer = load_prm(align)
    record = load_records(align.data["steps-prm-heldout"])[0]
    got = step_probabilities(head, tokenizer, [record["prompt"]], [record["completions"]])[0]
    classifier = AutoModelForTokenClassification.from_pretrained(
        align.base, num_labels=2, pad_token_id=tokenizer.pad_token_id
    )
    folder = resolve_adapter("toy/prm:1", align.registry).folder
    classifier = PeftModel.from_pretrained(classifier, str(folder)).eval()
    ids, ends = step_input(tokenizer, record["prompt"], record["completions"], "\n")
    with torch.no_grad():
        logits = classifier(input_ids=torch.tensor([ids])).logits[0, ends]  # (steps, 2)
    assert torch.allclose(torch.softmax(logits, -1)[:, 1], torch.tensor(got), atol=1e-5)


@pytest.mark.slow
def test_score_prints_the_probability_of_each_step(align, tmp_path):
    assert align.prm
    steps = tmp_path / "steps.txt"
    steps.write_text(" kind\n warm\n loud\n")
    args = ["score", "--base", str(align.base), "--prm", "toy/prm:1", "--registry", align.registry]
    args += ["--prompt", "Praise: cat tree\nSteps:", "--steps", str(steps)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["step", "p(right)", "text"]
    rows = [line.split() for line in lines[1:4]]
    assert [row[0] for row in rows] == ["1", "2", "3"]
    assert [row[2] for row in rows] == ["kind", "warm", "loud"]
    probabilities = [float(row[1]) for row in rows]
    assert probabilities[0] > 0.9 and probabilities[1] > 0.9 and probabilities[2] < 0.1
    assert lines[4].startswith("solution score ")

    as_json = json.loads(CliRunner().invoke(cli, [*args, "--json"]).stdout)
    found = [step["probability"] for step in as_json["steps"]]
    assert as_json["score"] == pytest.approx(math.prod(found), abs=1e-5)
    assert as_json["digest"] == align.prm["pushed"]["digest"]

    # A reward model is not a PRM: one line that says what to give instead.
    assert align.reward_model
    wrong = [*args[:4], "toy/rm:1", *args[5:]]
    result = CliRunner().invoke(cli, wrong)
    assert result.exit_code == 1
    assert "is a reward model, not a process reward model" in result.stderr


@pytest.mark.slow
def test_rl_on_step_rewards_raises_the_prm_score_of_heldout_solutions(align):
    from lorabay.train.heads import split_steps, step_probabilities

    assert align.prm and align.steps_policy
    output = align.root / "runs" / "rl-prm"
    prompts = str(align.data["steps-prompts-train"])
    args = ["train", "rlhf", "--base", str(align.base), "--registry", align.registry]
    args += ["--policy", "toy/steps-sft:1", "--reward", "prm:toy/prm:1", "--prompts", prompts]
    args += ["--output", str(output), "--threads", "1", *STEP_RL]
    result = align.run(*args)
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert all("solution_score" in row and "steps" in row for row in rows[:-1])
    assert result["lineage"]["hyperparameters"]["reward_kind"] == "prm"

    # Held-out prompts, two samples each, judged by the PRM: the product of its step scores.
    heldout = align.prompts("steps-prompts-heldout") * 2
    head, tokenizer = load_prm(align)

    def judged(adapter) -> tuple[float, float]:
        texts = sample_texts(align.base, adapter, heldout, temperature=0.2)
        steps = [split_steps(text, "\n") for text in texts]
        found = step_probabilities(head, tokenizer, heldout, steps)
        scores = [math.prod(p) if p else 0.0 for p in found]
        return sum(scores) / len(scores), sum(map(len, steps)) / len(steps)

    before, steps_before = judged(align.steps_policy["adapter"])
    after, steps_after = judged(result["adapter"])
    assert after > before + 0.15 and after > 0.8, (before, after)
    # Fewer steps would be the way to game a product of probabilities: none were dropped.
    assert steps_after >= 2.9 and steps_before >= 2.9, (steps_before, steps_after)
