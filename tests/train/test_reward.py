"""The reward model: a LoRA plus a scalar head, Bradley-Terry on preference pairs."""

from __future__ import annotations

import pytest

from lorabay.hub import Registry
from lorabay.train.data import load_records


@pytest.mark.slow
def test_reward_model_ranks_heldout_pairs_by_the_rule(align, tiny_base):
    from lorabay.train.heads import HEAD_FILE, attach_head, reward_scores
    from lorabay.train.model import load_base
    from lorabay.train.run import resolve_adapter

    run = align.reward_model
    # The loss is -log sigmoid(r_chosen - r_rejected): ln 2 at the start, near 0 at the end.
    assert 0.6 < run["metrics"]["first_loss"] < 0.8
    assert run["metrics"]["loss"] < 0.05 and run["metrics"]["accuracy"] == 1.0

    # Held-out reviews, never trained on: the right sentiment scores above the wrong one.
    pairs = load_records(align.data["sentiment-pairs-heldout"])
    model, tokenizer = load_base(tiny_base)
    model, head = attach_head(model, resolve_adapter("toy/rm:1", align.registry), "rm", "reward")
    prompts = [pair["prompt"] for pair in pairs]
    chosen = reward_scores(head, tokenizer, prompts, [p["chosen"][0]["content"] for p in pairs])
    rejected = reward_scores(head, tokenizer, prompts, [p["rejected"][0]["content"] for p in pairs])
    accuracy = float((chosen > rejected).float().mean())
    assert accuracy >= 0.9, (accuracy, chosen, rejected)  # chance: 0.5

    # One base, two readings agree: the head over the causal LM's decoder (what PPO uses)
    # gives what the sequence classifier TRL trained gives.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    folder = resolve_adapter("toy/rm:1", align.registry).folder
    classifier = AutoModelForSequenceClassification.from_pretrained(
        tiny_base, num_labels=1, pad_token_id=tokenizer.pad_token_id
    )
    classifier = PeftModel.from_pretrained(classifier, str(folder)).eval()
    from lorabay.train.heads import reward_input

    ids = torch.tensor([reward_input(tokenizer, prompts[0], "positive")])
    with torch.no_grad():
        expected = float(classifier(input_ids=ids).logits[0, 0])
    got = float(reward_scores(head, tokenizer, prompts[:1], ["positive"])[0])
    assert abs(expected - got) < 1e-4

    # In the registry: kind reward, the head saved with the adapter, fit for the base.
    registry = Registry.open(align.registry)
    manifest = registry.resolve("toy/rm:1")
    assert manifest.kind == "reward"
    assert manifest.peft["modules_to_save"] == ["score"]
    assert {f["path"] for f in manifest.files} >= {"adapter_model.safetensors", HEAD_FILE}
    assert manifest.lineage["method"] == "reward"
    assert registry.check(manifest, tiny_base) == []


def test_reward_needs_preference_pairs(tmp_path, tiny_base):
    from lorabay.hub.errors import ConfigError
    from lorabay.train.config import RewardConfig, build_config
    from lorabay.train.reward import train_reward

    data = tmp_path / "sft.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    config = build_config(
        RewardConfig,
        flags={"base": str(tiny_base), "data": str(data), "output": str(tmp_path / "o")},
    )
    with pytest.raises(ConfigError, match="not a preference record"):
        train_reward(config, show_progress=False)
