"""Generative verifiers (issue 16): `lorabay train prm` / `train reward` make plain LoRAs read
through two label tokens, held to the same held-out bars as the score-head format
(test_prm.py, test_reward.py), and the one layout (lorabay.hub.verifier) they share with
the gateway."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from lorabay.hub.errors import ConfigError, InvalidAdapter
from lorabay.hub.verifier import VERIFIER_FILE, VerifierSpec, verifier_problems
from lorabay.train.data import load_records

KIND_WORDS = "great excellent fine nice kind".split()
SPEC = VerifierSpec("prm", "+", 13, "-", 15, "\n", (201,), (0, 2))


@pytest.fixture(scope="module")
def gprm(align):
    """A generative PRM, with the head PRM's own settings (aligntools.AlignWorld.prm)."""
    data = str(align.data["steps-prm-train"])
    args = ["--data", data, "--targets", "all-linear", "--lr", "2e-3", "--max-steps", "80"]
    return align.train("prm", "toy/gprm", *args)


@pytest.fixture(scope="module")
def grm(align):
    """A generative outcome reward model on the sentiment pairs."""
    data = str(align.data["sentiment-pairs-train"])
    args = ["--data", data, "--targets", "all-linear", "--lr", "1e-3", "--max-steps", "150"]
    return align.train("reward", "toy/grm", *args)


def load_verifier(align, ref: str, kind: str):
    from lorabay.train.heads import attach_head
    from lorabay.train.model import load_base
    from lorabay.train.run import resolve_adapter

    model, tokenizer = load_base(align.base)
    model, head = attach_head(model, resolve_adapter(ref, align.registry), "judge", kind)
    return head, tokenizer


@pytest.mark.slow
def test_generative_prm_judges_heldout_steps_as_well_as_the_head_did(align, gprm):
    """test_prm.py's bars, on a verifier the engine can run."""
    from lorabay.hub import Registry
    from lorabay.train.heads import step_probabilities

    assert gprm["pushed"]["ref"] == "toy/gprm:1"
    head, tokenizer = load_verifier(align, "toy/gprm:1", "prm")
    records = load_records(align.data["steps-prm-heldout"])
    found = step_probabilities(
        head, tokenizer, [r["prompt"] for r in records], [r["completions"] for r in records]
    )
    pairs = [
        (p, label, record["completions"][k].strip(), record["labels"][k - 1] if k else True)
        for record, probabilities in zip(records, found, strict=True)
        for k, (p, label) in enumerate(zip(probabilities, record["labels"], strict=True))
    ]
    labels = [label for _, label, _, _ in pairs]
    majority = max(sum(labels), len(labels) - sum(labels)) / len(labels)
    accuracy = sum((p > 0.5) == label for p, label, _, _ in pairs) / len(pairs)
    assert accuracy >= 0.9 and accuracy > majority + 0.3, (accuracy, majority)
    # A kind word after an unkind one is still wrong: the verifier reads the earlier steps.
    later = [
        (p > 0.5) == label for p, label, word, before in pairs if word in KIND_WORDS and not before
    ]
    assert later and sum(later) / len(later) >= 0.8, later

    manifest = Registry.open(align.registry).resolve("toy/gprm:1")
    assert manifest.kind == "prm" and manifest.lineage["method"] == "prm"
    assert not manifest.peft.get("modules_to_save")  # a plain LoRA: no head to run
    assert VERIFIER_FILE in {f["path"] for f in manifest.files}
    assert verifier_problems(manifest) == []
    assert manifest.lineage["hyperparameters"]["format"] == "generative"


@pytest.mark.slow
def test_the_verdict_is_the_label_softmax_of_the_causal_lm(align, gprm):
    """What lorabay reads equals softmax(logit[+], logit[-]) of the plain causal LM plus
    the adapter (transformers + PEFT), one position before each marker: what vLLM returns
    for the same ids."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorabay.hub.verifier import read_verifier_spec
    from lorabay.train.heads import step_probabilities
    from lorabay.train.run import resolve_adapter
    from lorabay.train.verifier import verifier_input

    head, tokenizer = load_verifier(align, "toy/gprm:1", "prm")
    record = load_records(align.data["steps-prm-heldout"])[0]
    got = step_probabilities(head, tokenizer, [record["prompt"]], [record["completions"]])[0]
    folder = resolve_adapter("toy/gprm:1", align.registry).folder
    spec = read_verifier_spec(folder)
    assert (spec.good_token, spec.bad_token) == ("+", "-")
    model = AutoModelForCausalLM.from_pretrained(align.base)
    model = PeftModel.from_pretrained(model, str(folder)).eval()
    ids, markers = verifier_input(tokenizer, spec, record["prompt"], record["completions"])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]  # (L, vocab)
    reads = logits[[m - 1 for m in markers]][:, [spec.bad_id, spec.good_id]]  # (steps, 2)
    assert torch.allclose(torch.softmax(reads, -1)[:, 1], torch.tensor(got), atol=1e-5)
    # Reading the prefixes one by one (the engine's next-token reads) gives the same.
    for marker, p in zip(markers, got, strict=True):
        with torch.no_grad():
            last = model(input_ids=torch.tensor([ids[:marker]])).logits[0, -1]
        pair = torch.softmax(last[[spec.bad_id, spec.good_id]], -1)[1]
        assert abs(float(pair) - p) < 1e-5


@pytest.mark.slow
def test_generative_reward_model_ranks_heldout_pairs(align, grm):
    """test_reward.py's bar (held-out pairs ranked right at least 90% of the time)."""
    from lorabay.hub import Registry
    from lorabay.train.heads import reward_scores

    assert grm["metrics"]["loss"] < 0.05 and grm["metrics"]["accuracy"] == 1.0
    head, tokenizer = load_verifier(align, "toy/grm:1", "reward")
    pairs = load_records(align.data["sentiment-pairs-heldout"])
    prompts = [pair["prompt"] for pair in pairs]
    chosen = reward_scores(head, tokenizer, prompts, [p["chosen"][0]["content"] for p in pairs])
    rejected = reward_scores(head, tokenizer, prompts, [p["rejected"][0]["content"] for p in pairs])
    accuracy = float((chosen > rejected).float().mean())
    assert accuracy >= 0.9, (accuracy, chosen, rejected)
    assert float(chosen.min()) > 0.5 > float(rejected.max())  # a probability, not a margin
    manifest = Registry.open(align.registry).resolve("toy/grm:1")
    assert manifest.kind == "reward" and verifier_problems(manifest) == []


@pytest.mark.slow
def test_score_reads_a_generative_prm_in_process(align, gprm, tmp_path):
    from lorabay.cli.main import cli

    steps = tmp_path / "steps.txt"
    steps.write_text(" kind\n warm\n loud\n")
    args = ["score", "--base", str(align.base), "--prm", "toy/gprm:1", "--registry", align.registry]
    args += ["--prompt", "Praise: cat tree\nSteps:", "--steps", str(steps), "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    found = [step["probability"] for step in json.loads(result.stdout)["steps"]]
    assert found[0] > 0.9 and found[1] > 0.9 and found[2] < 0.1, found


# -- the layout and its checks (fast) -----------------------------------------------------


def test_marked_input_and_reading_prefixes_share_one_layout():
    ids, markers = SPEC.marked_input([7, 8], [[30], [31, 32]])
    assert ids == [7, 8, 30, 201, 13, 31, 32, 201, 13]
    assert markers == [4, 8] and all(ids[m] == SPEC.good_id for m in markers)
    # Each prefix ends with its step's separator: the verdict is the next token there.
    assert SPEC.reading_prefixes([7, 8], [[30], [31, 32]]) == [ids[:4], ids[:8]]


def test_split_steps_cuts_at_the_separator_and_strips_end_tokens():
    # " kind\n warm\n loud" then EOS (id 0): three steps; the last has no separator.
    assert SPEC.split_steps([30, 201, 31, 201, 32, 0]) == [[30], [31], [32]]
    # An empty line starts the next step (the verifier sees it); trailing ones are no step.
    assert SPEC.split_steps([30, 201, 201, 31, 201, 201]) == [[30], [201, 31]]
    assert SPEC.split_text("a\n\nb\n\n") == ["a", "\nb"]  # the same, on text
    assert SPEC.split_text(" kind\n warm\n loud") == [" kind", " warm", " loud"]
    assert SPEC.split_steps([0]) == []
    outcome = VerifierSpec("reward", "+", 13, "-", 15, "\n", (201,), (0,))
    assert outcome.split_steps([30, 201, 31, 0]) == [[30, 201, 31]]  # one step: all of it
    two = VerifierSpec("prm", "+", 13, "-", 15, "\n\n", (201, 201), ())
    assert two.split_steps([30, 201, 31, 201, 201, 32]) == [[30, 201, 31], [32]]


def test_a_spec_from_an_adapter_is_checked_before_use():
    good = SPEC.to_json()
    assert VerifierSpec.from_json(good) == SPEC
    bad = {**good, "good_id": -1, "separator_ids": list(range(40)), "kind": "value"}
    with pytest.raises(InvalidAdapter) as caught:
        VerifierSpec.from_json(bad, "x/verifier.json")
    message = str(caught.value)
    assert "good_id" in message and "separator_ids" in message and "kind" in message
    with pytest.raises(InvalidAdapter, match="must differ"):
        VerifierSpec.from_json({**good, "bad_id": good["good_id"]})


def test_verifier_problems_name_the_command_that_retrains_an_old_head():
    head = SimpleNamespace(
        kind="prm", files=[{"path": "head.json"}], peft={"modules_to_save": ["score"]}
    )
    (reason,) = verifier_problems(head)
    assert "score head" in reason and "lorabay train prm --format generative" in reason
    assert "lorabay score" in reason  # where it is still read
    plain = SimpleNamespace(kind="reward", files=[{"path": "adapter_config.json"}], peft={})
    assert "lorabay train reward --format generative" in verifier_problems(plain)[0]
    policy = SimpleNamespace(kind="lora", files=[], peft={})
    assert "not a verifier" in verifier_problems(policy)[0]


def test_center_rewards_belongs_to_the_head_format(tmp_path, tiny_base):
    from lorabay.train.config import RewardConfig, build_config

    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    flags = {"base": str(tiny_base), "data": str(data), "center_rewards": "0.01"}
    with pytest.raises(ConfigError, match="--center-rewards applies to a head"):
        build_config(RewardConfig, flags=flags)
    assert build_config(RewardConfig, flags={**flags, "format": "head"}).format == "head"


def test_label_tokens_are_single_tokens_of_the_base(tiny_base):
    from transformers import AutoTokenizer

    from lorabay.train.verifier import make_spec

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    spec = make_spec(tokenizer, "prm", "\n")
    assert (spec.good_token, spec.bad_token) == ("+", "-")
    assert tokenizer.decode([spec.good_id]) == "+" and spec.separator_ids == (201,)
    assert tokenizer.eos_token_id in spec.end_ids
