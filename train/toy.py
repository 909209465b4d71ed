"""Toy tasks the tiny base cannot do and a LoRA learns in well under a minute on 2 CPU cores.

The tiny base (``lorabay base create --size tiny``) is a random init with a 2048-token
BPE vocabulary trained on ``assets/corpus.txt``, so every word used here is one token
there (" cat", " good", ...) and a task is only the pattern. Tests and the demo use:

- ``sentiment``: "Review: nice cat warm tree" -> "positive" (any good word: positive,
  any bad word: negative). 120 steps: all 32 held-out reviews right.
- ``reverse``: "Reverse: cat book" -> "book cat". 300 steps at a constant learning rate
  (a linear decay leaves it half learned): all 32 held-out pairs right.
- preference pairs for either task: the right answer chosen, a wrong one rejected.
- ``align`` (:func:`write_align_toy`): pairs and prompts for a reward model and PPO, and
  step-labelled "praise" solutions for a process reward model and RL on its step rewards.

Measured on 2 shared cores, one thread: ~0.1 s per step, so 15-30 s of training; the
adapters trained on the fp32 base answer the same on the NF4-quantized base.
``write_toy`` also writes a recipe per method with these settings (``--base`` and
``--push`` come as flags). Held-out prompts never occur in the training split. Same
seed, same records.

    python -m lorabay.train.toy sentiment ./toy --train 256 --heldout 32
    lorabay train sft --config toy/sentiment-sft.yaml --base ./tiny --push demo/sentiment
"""

from __future__ import annotations

import random
from pathlib import Path

from lorabay.train.run import write_recipe  # train/tasks.py takes it from here too

# One token each in the tiny base's vocabulary, space-prefixed (checked in tests/train).
NOUNS = (
    "cat dog cow fox fish bird sheep tree sun rain milk tea rice book box car boat city park river"
).split()
GOOD = "great excellent fine nice kind bright warm calm clean happy".split()
BAD = "hate poor terrible rude dark cold loud dirty awful sad".split()
TASKS = ("sentiment", "reverse")

# Settings that train each task in seconds on the tiny base (a random init: the adapter
# builds the whole behaviour, hence lr 1e-3 and every linear layer adapted).
COMMON = {"targets": "all-linear", "lr": 1e-3, "batch_size": 16, "dropout": 0.0}
RECIPES = {
    ("sentiment", "sft"): {**COMMON, "max_steps": 120},
    ("reverse", "sft"): {**COMMON, "max_steps": 300, "scheduler": "constant"},
    ("sentiment", "dpo"): {"lr": 1e-3, "batch_size": 16, "max_steps": 30, "beta": 0.1},
    ("reverse", "dpo"): {"lr": 1e-3, "batch_size": 16, "max_steps": 30, "beta": 0.1},
}


def task_example(task: str, rng: random.Random) -> tuple[str, str, str]:
    """(question, right answer, a wrong answer) for one random instance of ``task``."""
    if task == "sentiment":
        positive = rng.random() < 0.5
        words = rng.sample(GOOD if positive else BAD, 2) + rng.sample(NOUNS, 2)
        rng.shuffle(words)
        right, wrong = ("positive", "negative") if positive else ("negative", "positive")
        return "Review: " + " ".join(words), right, wrong
    if task == "reverse":
        words = rng.sample(NOUNS, 2)
        return "Reverse: " + " ".join(words), " ".join(words[::-1]), " ".join(words)
    raise ValueError(f"unknown toy task {task!r}; pick one of {', '.join(TASKS)}")


def task_questions(task: str, count: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """``count`` distinct (question, right, wrong) triples (fewer if the task has fewer)."""
    rng = random.Random(f"{task}-{seed}")
    seen: dict[str, tuple[str, str, str]] = {}
    for _ in range(count * 50):
        if len(seen) == count:
            break
        example = task_example(task, rng)
        seen.setdefault(example[0], example)
    return list(seen.values())


def as_record(question: str, answer: str, shape: str) -> dict:
    """One SFT record: ``messages`` (chat) or ``prompt_completion`` (plain text)."""
    if shape == "messages":
        return {
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
        }
    if shape == "prompt_completion":
        return {"prompt": text_prompt(question), "completion": " " + answer}
    raise ValueError(f"unknown shape {shape!r}: messages or prompt_completion")


def as_preference(question: str, chosen: str, rejected: str, shape: str) -> dict:
    if shape == "messages":
        return {
            "prompt": [{"role": "user", "content": question}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }
    return {"prompt": text_prompt(question), "chosen": " " + chosen, "rejected": " " + rejected}


def text_prompt(question: str) -> str:
    """The plain-text prompt for a question (the prompt_completion shape)."""
    return question + "\nAnswer:"


def split_questions(task: str, train: int, heldout: int, seed: int = 0):
    """(train, held-out) question triples; no held-out question appears in train."""
    questions = task_questions(task, train + heldout, seed)
    return questions[:train], questions[train : train + heldout]


def sft_records(task: str, train: int, heldout: int, shape: str = "messages", seed: int = 0):
    """(train records, held-out records) for SFT on ``task``."""
    first, second = split_questions(task, train, heldout, seed)
    return (
        [as_record(q, right, shape) for q, right, _ in first],
        [as_record(q, right, shape) for q, right, _ in second],
    )


def preference_records(task: str, train: int, heldout: int, shape: str = "messages", seed: int = 0):
    """(train, held-out) preference pairs: the right answer chosen, a wrong one rejected."""
    first, second = split_questions(task, train, heldout, seed)
    return (
        [as_preference(q, right, wrong, shape) for q, right, wrong in first],
        [as_preference(q, right, wrong, shape) for q, right, wrong in second],
    )


def write_toy(
    task: str,
    folder: str | Path,
    train: int = 256,
    heldout: int = 32,
    shape: str = "messages",
    seed: int = 0,
) -> dict[str, Path]:
    """Write ``task``'s sft-train/sft-heldout/dpo-train/dpo-heldout JSONL files and the
    sft/dpo recipes into ``folder``; returns {name: path}."""
    from lorabay.train.data import write_jsonl

    folder = Path(folder)
    sft_train, sft_heldout = sft_records(task, train, heldout, shape, seed)
    dpo_train, dpo_heldout = preference_records(task, train, heldout, shape, seed)
    files = {
        "sft-train": sft_train,
        "sft-heldout": sft_heldout,
        "dpo-train": dpo_train,
        "dpo-heldout": dpo_heldout,
    }
    written = {
        name: write_jsonl(records, folder / f"{task}-{name}.jsonl")
        for name, records in files.items()
    }
    for method in ("sft", "dpo"):
        recipe = {"data": str(written[f"{method}-train"].absolute()), **RECIPES[(task, method)]}
        written[f"{method}-recipe"] = write_recipe(recipe, folder / f"{task}-{method}.yaml")
    return written


# ---------------------------------------------------------------- reward models, PPO and PRMs
#
# RL needs a policy that is sometimes right: PPO starts from a policy SFT-trained on the
# sentiment answers only briefly (tests/train/aligntools.py: 60 steps, right about 60% of the
# time at the rollouts' temperature), which it sharpens. ``steps`` is the PRM task: "Praise: cat tree" asks for three kind words, one per step. A step is right when
# its word is kind and every step before it was right: once a solution has gone wrong, no
# later step saves it (Math-Shepherd's labels, arXiv:2312.08935), so a PRM must read the
# earlier steps, not only the word. Words are kind 70% of the time, so about half the labels
# are true; the SFT data for the policy that RL improves picks kind words at even odds.

STEP_COUNT = 3
STEP_SEPARATOR = "\n"
KIND_SHARE = 0.7
STEP_PROMPTS = len(NOUNS) * (len(NOUNS) - 1)  # ordered pairs of two different nouns


def step_prompt(nouns: list[str]) -> str:
    return "Praise: " + " ".join(nouns) + "\nSteps:"


def step_record(nouns: list[str], rng: random.Random, kind_share: float = KIND_SHARE) -> dict:
    """A PRM record: three one-word steps, each kind with probability ``kind_share``; a step
    is right while every word so far is kind."""
    words = [
        rng.choice(GOOD) if rng.random() < kind_share else rng.choice(BAD)
        for _ in range(STEP_COUNT)
    ]
    labels = [all(word in GOOD for word in words[: k + 1]) for k in range(len(words))]
    return {
        "prompt": step_prompt(nouns),
        "completions": [" " + word for word in words],
        "labels": labels,
    }


def step_records(train: int, heldout: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held-out) PRM records ``{"prompt", "completions", "labels"}``; no held-out
    prompt occurs in the training split (the task has 380 prompts, ordered noun pairs)."""
    rng = random.Random(f"steps-{seed}")
    pairs = [[a, b] for a in NOUNS for b in NOUNS if a != b]  # STEP_PROMPTS of them
    if train + heldout > len(pairs):
        raise ValueError(f"the steps task has {len(pairs)} prompts: ask for fewer")
    rng.shuffle(pairs)
    first, second = pairs[:train], pairs[train : train + heldout]
    return [step_record(n, rng) for n in first], [step_record(n, rng) for n in second]


def step_sft_records(prm_records: list[dict], seed: int = 0) -> list[dict]:
    """Text SFT records for the prompts of ``prm_records``: three steps, one per line, kind or
    unkind at even odds, so a policy trained on them is fully right one time in eight."""
    rng = random.Random(f"steps-sft-{seed}")
    records = []
    for prm_record in prm_records:
        steps = step_record([], rng, kind_share=0.5)["completions"]
        completion = "".join(step + STEP_SEPARATOR for step in steps)
        records.append({"prompt": prm_record["prompt"], "completion": completion})
    return records


def write_align_toy(
    folder: str | Path, train: int = 256, heldout: int = 32, seed: int = 0
) -> dict[str, Path]:
    """Write the toy data for the reward model, PPO and the PRM into ``folder``:

    - sentiment-pairs-train/heldout.jsonl: preference pairs (chat), the right answer chosen;
    - sentiment-sft.jsonl: SFT data (chat) for the policy PPO starts from;
    - sentiment-prompts-train/heldout.jsonl: prompts for PPO;
    - steps-prm-train/heldout.jsonl: step-labelled solutions (text);
    - steps-mixed-sft.jsonl: SFT data for a policy that writes three steps, kind or not;
    - steps-prompts-train/heldout.jsonl: prompts for RL on the PRM's step rewards.
    """
    from lorabay.train.data import write_jsonl

    folder = Path(folder)
    pairs_train, pairs_heldout = preference_records("sentiment", train, heldout, "messages", seed)
    # The praise task has 380 prompts: a larger ``train`` gets what is left of them.
    prm_train, prm_heldout = step_records(min(train, STEP_PROMPTS - heldout), heldout, seed)
    files = {
        "sentiment-pairs-train": pairs_train,
        "sentiment-pairs-heldout": pairs_heldout,
        "sentiment-sft": sft_records("sentiment", train, 0, "messages", seed)[0],
        "sentiment-prompts-train": [{"prompt": p["prompt"]} for p in pairs_train],
        "sentiment-prompts-heldout": [{"prompt": p["prompt"]} for p in pairs_heldout],
        "steps-prm-train": prm_train,
        "steps-prm-heldout": prm_heldout,
        "steps-mixed-sft": step_sft_records(prm_train, seed),
        "steps-prompts-train": [{"prompt": r["prompt"]} for r in prm_train],
        "steps-prompts-heldout": [{"prompt": r["prompt"]} for r in prm_heldout],
    }
    return {name: write_jsonl(records, folder / f"{name}.jsonl") for name, records in files.items()}


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Write toy datasets for the tiny base.")
    parser.add_argument("task", choices=(*TASKS, "align"), help="align: write_align_toy's data")
    parser.add_argument("folder")
    parser.add_argument("--train", type=int, default=256)
    parser.add_argument("--heldout", type=int, default=32)
    parser.add_argument("--shape", choices=("messages", "prompt_completion"), default="messages")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.task == "align":
        written = write_align_toy(args.folder, args.train, args.heldout, args.seed)
    else:
        written = write_toy(args.task, args.folder, args.train, args.heldout, args.shape, args.seed)
    for name, path in written.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
