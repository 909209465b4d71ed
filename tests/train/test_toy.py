"""Toy tasks: every word is one token of the tiny base; held-out prompts are never trained on."""

from __future__ import annotations

from lorabay.train import toy


def test_words_are_single_tokens(tiny_base):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    for word in toy.NOUNS + toy.GOOD + toy.BAD:
        assert len(tokenizer(" " + word)["input_ids"]) == 1, word


def test_heldout_prompts_are_unseen_and_answers_right():
    for task in toy.TASKS:
        train, heldout = toy.split_questions(task, 200, 40)
        assert len(train) == 200 and len(heldout) == 40
        assert not {q for q, _, _ in train} & {q for q, _, _ in heldout}
        for question, right, wrong in train + heldout:
            assert right != wrong
            words = question.split(": ", 1)[1].split()
            if task == "reverse":
                assert right.split() == words[::-1]
            else:
                assert right == ("positive" if set(words) & set(toy.GOOD) else "negative")


def test_same_seed_same_files(tmp_path):
    a = toy.write_toy("sentiment", tmp_path / "a", train=20, heldout=5)
    b = toy.write_toy("sentiment", tmp_path / "b", train=20, heldout=5)
    for name in a:
        if not name.endswith("recipe"):  # recipes name their own folder's data
            assert a[name].read_bytes() == b[name].read_bytes()
    assert set(a) == {
        "sft-train", "sft-heldout", "dpo-train", "dpo-heldout", "sft-recipe", "dpo-recipe"
    }  # fmt: skip


def test_recipes_are_valid_configs(tmp_path, tiny_base):
    from lorabay.train.config import DPOConfig, SFTConfig, build_config

    for task in toy.TASKS:
        files = toy.write_toy(task, tmp_path, train=20, heldout=5)
        sft = build_config(SFTConfig, files["sft-recipe"], {"base": str(tiny_base)})
        assert sft.data == str(files["sft-train"].absolute()) and sft.max_steps > 0
        dpo = build_config(DPOConfig, files["dpo-recipe"], {"base": str(tiny_base)})
        assert dpo.beta == 0.1
