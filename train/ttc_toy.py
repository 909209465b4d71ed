"""The praise step task for test-time compute on the tiny base: labels from sampled solutions.

The prompts are train/toy.py's praise prompts ("Praise: cat tree\\nSteps:"); the policy
is SFT-trained on three words a line, each " rude" or one of two kind words
(:func:`sft_records`). Its greedy answer is "rude" on every line, always wrong; a sample
is fully right (:func:`is_right`: three lines, every one a kind word) about one time in
eight, and some lines are stray tokens. That is what best-of-N and search are for, and
what a verifier must judge: so its training data are the policy's own samples, each
step labelled by the task's rule (Math-Shepherd's automatic process labels,
arXiv:2312.08935), a step right while every line so far is a kind word. :func:`step_records` gives a PRM's records,
:func:`preference_records` an outcome reward model's pairs (a right solution chosen over
a wrong one for the same prompt).

    texts = [...]                       # sampled through the gateway, n per prompt
    write_jsonl(step_records(prompts, texts), "prm.jsonl")
    lorabay train prm --base ./tiny --data prm.jsonl --push toy/prm
"""

from __future__ import annotations

import random

from lorabay.hub.verifier import split_step_text
from lorabay.train.toy import GOOD, STEP_COUNT, STEP_SEPARATOR, step_prompt

# The policy's SFT data: each line one unkind word (" rude") with RUDE_SHARE, else one of two
# kind words. " rude" is the most likely single token, so greedy decoding writes it every line
# and is always wrong, while a sample is fully right some of the time. Measured on the tiny
# base (120 steps, lr 1e-3 constant, 256 prompts): sampled at 0.3, 94% of the samples are
# three of these words and 12% fully right. The window is narrow: at 0.40 greedy already
# writes "warm", at 0.47 no sample is right (the tiny base's capped logits, aligntools.py).
RUDE = " rude"
KIND_WORDS = (" kind", " warm")
RUDE_SHARE = 0.42
POLICY_RECIPE = ["--targets", "all-linear", "--lr", "1e-3", "--scheduler", "constant"]
POLICY_RECIPE += ["--max-steps", "120"]
TEMPERATURE = 0.3

# What a vote counts as one answer: the solution's lines, stripped (weighted_vote's
# answer_pattern; the gateway takes group 1).
ANSWER_PATTERN = r"(?s)\A\s*(.*?)\s*\Z"


def solution_steps(text: str) -> list[str]:
    """The steps of a sampled solution as a verifier reads them (lorabay.hub.verifier):
    its lines as sampled (the leading space of " kind" kept), an empty line glued to the
    front of the next step."""
    return split_step_text(text, STEP_SEPARATOR)


def step_labels(steps: list[str]) -> list[bool]:
    """A step is right while every step so far is one kind word on its own line."""
    labels, right = [], True
    for step in steps:
        right = right and step.strip() in GOOD and STEP_SEPARATOR not in step
        labels.append(right)
    return labels


def is_right(text: str) -> bool:
    """Three steps, every one a kind word on its own line."""
    steps = solution_steps(text)
    return len(steps) == STEP_COUNT and all(step_labels(steps))


def answer_of(text: str) -> str:
    """The answer a vote counts: the solution's steps, stripped, one space apart (what
    :data:`ANSWER_PATTERN` finds, but for the spacing)."""
    return " ".join(step.strip() for step in solution_steps(text))


def step_records(prompts: list[str], texts: list[str]) -> list[dict]:
    """PRM records ``{"prompt", "completions", "labels"}`` from sampled solutions (one
    prompt per text); solutions without a step are left out."""
    records = []
    for prompt, text in zip(prompts, texts, strict=True):
        steps = solution_steps(text)
        if steps and all(step.strip() for step in steps):  # a PRM record's steps have text
            records.append({"prompt": prompt, "completions": steps, "labels": step_labels(steps)})
    return records


def preference_records(prompts: list[str], texts: list[list[str]]) -> list[dict]:
    """Pairs ``{"prompt", "chosen", "rejected"}``: for each prompt, each right solution
    sampled for it against a wrong one (in turn), text prompts and responses."""
    pairs = []
    for prompt, sampled in zip(prompts, texts, strict=True):
        right = [t for t in sampled if is_right(t)]
        wrong = [t for t in sampled if not is_right(t) and t.strip()]
        for index, chosen in enumerate(right):
            if wrong:
                pairs.append(
                    {"prompt": prompt, "chosen": chosen, "rejected": wrong[index % len(wrong)]}
                )
    return pairs


def sft_records(prompts: list[str], seed: int = 0, rude_share: float = RUDE_SHARE) -> list[dict]:
    """Text SFT records for the policy: three lines per prompt, each " rude" with
    ``rude_share``, else a kind word (:data:`KIND_WORDS`)."""
    rng = random.Random(f"ttc-sft-{seed}")
    records = []
    for prompt in prompts:
        lines = [
            RUDE if rng.random() < rude_share else rng.choice(KIND_WORDS) for _ in range(STEP_COUNT)
        ]
        records.append({"prompt": prompt, "completion": "".join(w + STEP_SEPARATOR for w in lines)})
    return records


def task_prompts(train: int, heldout: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, held-out) praise prompts: ordered pairs of two different nouns, no held-out
    pair in the training split (train/toy.py's 380)."""
    from lorabay.train.toy import NOUNS

    pairs = [[a, b] for a in NOUNS for b in NOUNS if a != b]
    random.Random(f"ttc-prompts-{seed}").shuffle(pairs)
    if train + heldout > len(pairs):
        raise ValueError(f"the praise task has {len(pairs)} prompts: ask for fewer")
    prompts = [step_prompt(pair) for pair in pairs]
    return prompts[:train], prompts[train : train + heldout]
