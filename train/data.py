"""Training data: read JSONL or Parquet, check its shape, digest it, hand TRL a Dataset.

Shapes (one record per line or row):

    sft          {"prompt": "...", "completion": "..."}       text; loss on the completion
                 {"prompt": [msgs], "completion": [msgs]}     chat; loss on the completion
                 {"messages": [msgs]}                         chat; loss on assistant turns
    preference   {"prompt": ..., "chosen": ..., "rejected": ...}   text or message lists
                 {"chosen": [msgs], "rejected": [msgs]}            chat, shared prompt implicit
    steps        {"prompt": ..., "completions": [step, ...], "labels": [bool, ...]}   PRM
    prompts      {"prompt": ...}                              RLHF: the policy answers

A message is ``{"role": "system"|"user"|"assistant", "content": "..."}``; chat
records are rendered with the base's chat template. Every bad record is reported
(up to a few), with its line number, in one :class:`ConfigError`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from lorabay.hub.atomic import write_atomically
from lorabay.hub.errors import ConfigError

ROLES = ("system", "user", "assistant", "tool")
SHAPES = {
    # shape -> (fields, the one-line spelling shown in errors)
    "prompt_completion": (("prompt", "completion"), '{"prompt": ..., "completion": ...}'),
    "messages": (("messages",), '{"messages": [{"role": ..., "content": ...}, ...]}'),
    "preference": (
        ("prompt", "chosen", "rejected"),
        '{"prompt": ..., "chosen": ..., "rejected": ...}',
    ),
    "implicit_preference": (("chosen", "rejected"), '{"chosen": [msgs], "rejected": [msgs]}'),
    "steps": (
        ("prompt", "completions", "labels"),
        '{"prompt": ..., "completions": ["step", ...], "labels": [true, ...]}',
    ),
    "prompt_only": (("prompt",), '{"prompt": "..."}  (or a message list)'),
}
METHOD_SHAPES = {
    "sft": ("prompt_completion", "messages"),
    "preference": ("preference", "implicit_preference"),
    "steps": ("steps",),  # process reward model: one label per solution step
    "prompts": ("prompt_only",),  # RLHF: the policy writes the responses
}
MAX_REPORTED = 5  # bad records listed in one error; the count says how many more


def dataset_digest(path: str | os.PathLike) -> str:
    """``sha256:<hex>`` of the data file's bytes: the lineage names exactly what was trained on."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")


def records_file_problem(flag: str, path: str | os.PathLike) -> str | None:
    """Why ``path`` (given as ``flag``) cannot be read as records, or None: checked with the
    options, before anything loads."""
    if not Path(path).is_file():
        return f"{flag} {path}: no such file"
    if Path(path).suffix not in RECORD_SUFFIXES:
        return f"{flag} {path}: use a .jsonl or .parquet file"
    return None


def load_records(path: str | os.PathLike) -> list[dict]:
    """Every record of a .jsonl (or .json list) or .parquet file, as dicts."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as error:  # pyarrow raises several types for a damaged file
            raise ConfigError(f"--data {path}: not a readable Parquet file ({error})") from error
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"--data {path}: not valid JSON ({error})") from error
        return records
    records, problems = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            problems.append(f"--data {path} line {number}: not valid JSON ({error.msg})")
    if problems:
        raise ConfigError(_cap(problems), "write one JSON object per line")
    return records


def detect_shape(records: list[dict], kind: str, path: str = "data") -> str:
    """The shape every record of ``records`` has, for ``kind`` "sft" or "preference"; else ConfigError."""
    allowed = METHOD_SHAPES[kind]
    spelled = " or ".join(SHAPES[shape][1] for shape in allowed)
    if not records:
        raise ConfigError(f"--data {path}: no records", f"write records like {spelled}")
    first = records[0]
    shape = next(
        (s for s in allowed if isinstance(first, dict) and all(k in first for k in SHAPES[s][0])),
        None,
    )
    if shape is None:
        keys = sorted(first) if isinstance(first, dict) else type(first).__name__
        raise ConfigError(
            f"--data {path} record 1 has {keys}, not a {kind} record",
            f"write records like {spelled}",
        )
    problems = []
    for number, record in enumerate(records, 1):
        problems += [f"--data {path} record {number}: {p}" for p in _record_problems(record, shape)]
    if problems:
        raise ConfigError(_cap(problems), f"every record must look like {SHAPES[shape][1]}")
    return shape


def _record_problems(record: object, shape: str) -> list[str]:
    if not isinstance(record, dict):
        return [f"is a {type(record).__name__}, not an object"]
    fields = SHAPES[shape][0]
    missing = [key for key in fields if key not in record]
    if missing:
        return [f"missing {', '.join(missing)}"]
    if shape == "steps":
        return _prompt_problems(record["prompt"]) + _step_problems(record)
    problems = []
    chat = None
    for key in fields:
        value = record[key]
        is_chat = isinstance(value, list)
        if shape == "messages" or shape == "implicit_preference":
            is_chat = True
            if not isinstance(value, list):
                problems.append(f"{key} must be a list of messages")
                continue
        if chat is None:
            chat = is_chat
        elif chat != is_chat:
            problems.append(f"{key} mixes text and message lists: use one or the other")
            continue
        if is_chat:
            problems += [f"{key}: {p}" for p in _message_problems(value)]
        elif not isinstance(value, str) or not value:
            problems.append(f"{key} must be non-empty text")
    if shape == "messages" and not problems:
        if not any(m["role"] == "assistant" for m in record["messages"]):
            problems.append("messages has no assistant turn to learn from")
    return problems


def _prompt_problems(prompt) -> list[str]:
    if isinstance(prompt, list):
        return [f"prompt: {p}" for p in _message_problems(prompt)]
    return [] if isinstance(prompt, str) and prompt else ["prompt must be non-empty text"]


def _step_problems(record: dict) -> list[str]:
    steps, labels = record["completions"], record["labels"]
    if not isinstance(steps, list) or not steps:
        return ["completions must be a non-empty list of steps (text)"]
    if not all(isinstance(step, str) and step.strip() for step in steps):
        return ["every step in completions must be non-empty text"]
    if not isinstance(labels, list) or not all(isinstance(label, bool) for label in labels):
        return ["labels must be a list of true/false, one per step"]
    if len(labels) != len(steps):
        return [f"{len(steps)} steps but {len(labels)} labels: give one label per step"]
    return []


def _message_problems(messages: list) -> list[str]:
    problems = []
    if not messages:
        return ["is an empty message list"]
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            problems.append(f"message {index} needs a text content")
        elif message.get("role") not in ROLES:
            problems.append(f"message {index} role {message.get('role')!r} is not one of {ROLES}")
    return problems


def _cap(problems: list[str]) -> list[str]:
    if len(problems) <= MAX_REPORTED:
        return problems
    return problems[:MAX_REPORTED] + [f"... and {len(problems) - MAX_REPORTED} more"]


def load_dataset(path: str | os.PathLike, kind: str):
    """(datasets.Dataset with only the shape's columns, shape) for TRL's trainers."""
    from datasets import Dataset

    records = load_records(path)
    shape = detect_shape(records, kind, str(path))
    fields = SHAPES[shape][0]
    return Dataset.from_list([{key: record[key] for key in fields} for record in records]), shape


def tokenize_conversations(dataset, tokenizer):
    """``{"messages"}`` records as TRL's pre-tokenized shape: ``input_ids`` and
    ``assistant_masks`` (1 on the tokens of assistant turns, which alone carry the loss).

    TRL finds assistant tokens through ``{% generation %}`` markers, which few real chat
    templates have (SmolLM2's has none; TRL patches only the templates it knows). This
    works with any template that renders a conversation prefix by prefix: an assistant
    turn is the text between the conversation before it with the generation prompt and
    the conversation through it, mapped to tokens by the tokenizer's character offsets
    over the one rendering of the whole conversation (so boundaries tokenize as in use).
    """
    from datasets import Dataset

    rows = []
    for number, record in enumerate(dataset, 1):
        text, spans = assistant_spans(tokenizer, record["messages"], number)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        mask = [
            int(any(start <= first < end for start, end in spans))
            for first, _ in encoded["offset_mapping"]
        ]
        if 1 not in mask:
            raise ConfigError(f"record {number}: its assistant turns are empty")
        rows.append({"input_ids": encoded["input_ids"], "assistant_masks": mask})
    return Dataset.from_list(rows)


def assistant_spans(
    tokenizer, messages: list[dict], number: int
) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, [start, end) character spans of its assistant turns)."""

    def render(turns: list[dict], prompt: bool = False) -> str:
        if not turns:
            return ""
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=prompt)

    text = render(messages)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:index], prompt=True), render(messages[: index + 1])
        if not (through.startswith(before) and text.startswith(through)):
            raise ConfigError(
                f"record {number}: the base's chat template does not render this conversation "
                "prefix by prefix, so its assistant turns cannot be found",
                'write {"prompt": [msgs], "completion": [msgs]} records instead',
            )
        # The turn's end-of-turn token is learned (the model must stop); the whitespace a
        # template puts between turns is not.
        spans.append((len(before), len(through.rstrip())))
    return text, spans


def write_jsonl(records: list[dict], path: str | os.PathLike) -> Path:
    """Write ``records`` as JSONL, whole or not at all (temporary file, then rename)."""
    return write_atomically(path, "".join(json.dumps(record) + "\n" for record in records))
