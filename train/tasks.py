"""Tasks for a real instruct base (SmolLM2-135M-Instruct): data made here, answers a script checks.

The demo (``lorabay demo``) and the real-base tests train one adapter per task and check
held-out prompts, which never occur in the training split, with :func:`check_answer`:

- ``sentiment``: "Classify the sentiment of this review: ..." -> exactly ``positive`` or
  ``negative``, and the right one. The base answers with a sentence about the review.
- ``extract``: "Extract the person's name, age and city as JSON: Meet Omar, a
  52-year-old from Cairo." -> ``{"name": "Omar", "age": 52, "city": "Cairo"}``: the reply
  is that one object and nothing else, every value taken from the sentence. The base
  answers with prose or a fenced code block around other keys.

Records come in each SFT data shape (:func:`as_record`; the demo trains on ``messages``
with the base's own chat template), and the recipes are sized for 2 CPU cores: about a
minute each.

    python -m lorabay.train.tasks extract ./data
    lorabay train sft --config data/extract-sft.yaml --base smollm2-135m-instruct --push demo/extract
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from lorabay.train.toy import write_recipe

TASKS = ("sentiment", "extract")

# Reviews: a subject, then what was good or bad about it. The held-out split draws from
# phrases the training split never shows, so a right answer is the base's own reading of
# the words, made into one label by the adapter.
SUBJECTS = [
    "The hotel", "This phone", "The restaurant", "The movie", "Our tour guide", "The laptop",
    "This book", "The concert", "The new app", "The coffee shop", "The rental car",
    "This jacket", "The museum", "The dentist", "The pizza", "This game",
]  # fmt: skip
GOOD = [
    "was wonderful and I would come back", "exceeded every expectation",
    "was friendly, fast and a pleasure", "made my whole week", "is the best I have ever had",
    "worked perfectly from day one", "was delightful from start to finish",
    "is worth every penny", "left us smiling all evening", "was clean, quiet and comfortable",
    "impressed the whole family", "was absolutely fantastic",
    "felt warm and welcoming", "is brilliant, I love it", "was a joy to use",
    "surprised me in the best way",
]  # fmt: skip
BAD = [
    "was a complete waste of money", "broke after two days", "was rude and slow",
    "ruined our weekend", "is the worst I have ever had", "never worked properly",
    "was dirty and noisy", "is not worth the price", "left us angry and hungry",
    "was boring from start to finish", "disappointed the whole family",
    "was absolutely terrible", "felt cold and unfriendly", "is awful, I hate it",
    "was a pain to use", "let me down badly",
]  # fmt: skip
SENTIMENT_QUESTION = "Classify the sentiment of this review as positive or negative: {review}"

# Records: a sentence about a person; the answer is one JSON object with three fields. The
# held-out split uses names, cities and sentence shapes the training split never shows.
NAMES = [
    "Maria", "Omar", "Lena", "Kenji", "Aisha", "Pedro", "Ingrid", "Tomas", "Fatima", "Lucas",
    "Mei", "Jonas", "Priya", "Diego", "Sofia", "Ahmed", "Clara", "Ravi", "Elena", "Marco",
    "Hana", "Felix", "Amara", "Oscar", "Yuki", "Nadia", "Paul", "Zara", "Ivan", "Rosa",
]  # fmt: skip
CITIES = [
    "Lyon", "Cairo", "Oslo", "Osaka", "Lagos", "Porto", "Bergen", "Prague", "Tunis", "Lima",
    "Dublin", "Hamburg", "Madrid", "Quito", "Seville", "Milan", "Krakow", "Delhi", "Athens",
    "Vienna",
]  # fmt: skip
SENTENCES = [
    "{name} is {age} years old and lives in {city}.",
    "Meet {name}, a {age}-year-old from {city}.",
    "{name} ({age}) has lived in {city} for years.",
    "Our new colleague {name} is {age} and comes from {city}.",
    "At {age}, {name} moved to {city}.",
    "{name}, who lives in {city}, turned {age} this spring.",
    "Born and raised in {city}, {name} is now {age}.",
    "{city} is home to {name}, aged {age}.",
    "{name} celebrated turning {age} at home in {city}.",
]  # fmt: skip
EXTRACT_QUESTION = "Extract the person's name, age and city as JSON: {sentence}"
HELDOUT_SHAPES = 3  # the last sentence shapes, names and cities are held out
RECIPES = {
    # LoRA on every linear layer, r 8, batch 8. Seen on 2 cores: the sentiment loss is 0.02 by
    # step 15 (token accuracy 1.0); the JSON answers take a few more steps.
    "sentiment": {"targets": "all-linear", "r": 8, "lr": 1e-3, "batch_size": 8, "max_steps": 20},
    "extract": {"targets": "all-linear", "r": 8, "lr": 1e-3, "batch_size": 8, "max_steps": 30},
}


def sentiment_examples(heldout: bool, count: int, rng: random.Random) -> list[tuple[str, str]]:
    """(question, label) pairs; training and held-out reviews share no phrase."""
    half = len(GOOD) // 2
    good, bad = (GOOD[half:], BAD[half:]) if heldout else (GOOD[:half], BAD[:half])
    pairs = {}
    while len(pairs) < min(count, len(SUBJECTS) * (len(good) + len(bad))):
        positive = rng.random() < 0.5
        review = f"{rng.choice(SUBJECTS)} {rng.choice(good if positive else bad)}."
        pairs[SENTIMENT_QUESTION.format(review=review)] = "positive" if positive else "negative"
    return list(pairs.items())


def extract_examples(heldout: bool, count: int, rng: random.Random) -> list[tuple[str, str]]:
    def split(items: list, held: int) -> list:
        return items[-held:] if heldout else items[:-held]

    names, cities = split(NAMES, 8), split(CITIES, 6)
    shapes = split(SENTENCES, HELDOUT_SHAPES)
    pairs = {}
    while len(pairs) < count:
        person = {"name": rng.choice(names), "age": rng.randint(18, 90), "city": rng.choice(cities)}
        sentence = rng.choice(shapes).format(**person)
        pairs[EXTRACT_QUESTION.format(sentence=sentence)] = json.dumps(person)
    return list(pairs.items())


def person_in(question: str) -> dict | None:
    """The record an extract question's sentence states, read back through its shape."""
    sentence = question.split(": ", 1)[-1]
    for shape in SENTENCES:
        pattern = re.escape(shape)
        for field, group in (("name", r"[A-Z]\w+"), ("age", r"\d+"), ("city", r"[A-Z]\w+")):
            pattern = pattern.replace(re.escape("{" + field + "}"), f"(?P<{field}>{group})")
        match = re.fullmatch(pattern, sentence)
        if match:
            return {**match.groupdict(), "age": int(match["age"])}
    return None


def task_examples(task: str, heldout: bool, count: int, seed: int = 0) -> list[tuple[str, str]]:
    """``count`` distinct (question, expected answer) pairs of ``task``'s split."""
    rng = random.Random(f"{task}-{heldout}-{seed}")
    if task == "sentiment":
        return sentiment_examples(heldout, count, rng)
    if task == "extract":
        return extract_examples(heldout, count, rng)
    raise ValueError(f"unknown task {task!r}; pick one of {', '.join(TASKS)}")


def check_answer(task: str, question: str, answer: str) -> dict:
    """``{"follows": the trained behaviour, "right": also the right content}``."""
    text = answer.strip()
    if task == "sentiment":
        label = text.lower().rstrip(".")
        follows = label in ("positive", "negative")
        expected = "positive" if any(phrase in question for phrase in GOOD) else "negative"
        return {"follows": follows, "right": follows and label == expected}
    if task == "extract":
        try:
            record = json.loads(text)
        except ValueError:
            return {"follows": False, "right": False}
        follows = isinstance(record, dict) and set(record) == {"name", "age", "city"}
        return {"follows": follows, "right": follows and record == person_in(question)}
    raise ValueError(f"unknown task {task!r}; pick one of {', '.join(TASKS)}")


SHAPES = ("messages", "chat", "text")  # the SFT data shapes train/data.py documents


def as_record(question: str, answer: str, shape: str = "messages") -> dict:
    """One SFT record in ``shape``: ``messages`` (a conversation), ``chat`` (prompt and
    completion as message lists) or ``text`` (plain prompt and completion, no template)."""
    user, assistant = (
        {"role": "user", "content": question},
        {"role": "assistant", "content": answer},
    )
    if shape == "messages":
        return {"messages": [user, assistant]}
    if shape == "chat":
        return {"prompt": [user], "completion": [assistant]}
    if shape == "text":
        return {"prompt": text_prompt(question), "completion": " " + answer}
    raise ValueError(f"unknown shape {shape!r}; pick one of {', '.join(SHAPES)}")


def text_prompt(question: str) -> str:
    return f"{question}\nAnswer:"


def write_task(
    task: str, folder: str | Path, train: int = 256, heldout: int = 12, shape: str = "messages"
) -> dict:
    """Write ``<task>-train.jsonl``, ``<task>-heldout.jsonl`` and ``<task>-sft.yaml``;
    returns their paths by role (``sft``, ``heldout``, ``sft-recipe``)."""
    from lorabay.train.data import write_jsonl

    folder = Path(folder)
    files = {}
    for role, split in (("sft", False), ("heldout", True)):
        pairs = task_examples(task, split, heldout if split else train)
        path = folder / f"{task}-{'heldout' if split else 'train'}.jsonl"
        files[role] = write_jsonl([as_record(q, a, shape) for q, a in pairs], path)
    files["sft-recipe"] = write_recipe(
        {**RECIPES[task], "data": str(files["sft"])}, folder / f"{task}-sft.yaml"
    )
    return files


def heldout_questions(task: str, count: int = 12) -> list[str]:
    return [question for question, _ in task_examples(task, True, count)]


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Write a real-base task's data and recipe.")
    parser.add_argument("task", choices=TASKS)
    parser.add_argument("folder")
    args = parser.parse_args()
    for role, path in write_task(args.task, args.folder).items():
        print(f"{role:12} {path}")


if __name__ == "__main__":
    main()
