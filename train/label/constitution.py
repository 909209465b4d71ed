"""A constitution: the written principles `lorabay label` judges and revises by.

A small YAML file (``train/assets/constitution.yaml`` is the example lorabay ships)::

    name: lorabay-assistant
    description: What we want from an assistant served by lorabay.
    principles:
      - name: concise
        comparison: Which response answers the request in fewer words, leaving nothing needed out?
        critique: Point out every word, sentence or repetition the response could do without.
        revision: Rewrite the response to say the same in as few words as it needs.
        weight: 2          # optional: drawn twice as often as a principle of weight 1
    templates:             # optional: how a principle's question is put to the judge
      comparison: "{question}\\n\\nRequest: {prompt}\\nA: {a}\\nB: {b}\\nAnswer A or B."

Each principle carries the question every mode asks: ``comparison`` (prefs: which of two
responses follows the principle better, answered with the letter A or B), ``critique``
and ``revision`` (revise: Constitutional AI's supervised phase, arXiv:2212.08073). A bad
file is refused with one line per problem, each naming its line in the file.

    constitution = load_constitution("constitution.yaml")
    comparison_messages(constitution, constitution.principles[0], "2+2?", "4", "It is 4.")
"""

from __future__ import annotations

import hashlib
import random
import string
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from lorabay.hub.errors import ConfigError

EXAMPLE = "assets/constitution.yaml"  # package data of lorabay.train
QUESTIONS = ("comparison", "critique", "revision")
PRINCIPLE_KEYS = ("name", *QUESTIONS, "weight")
TOP_KEYS = ("name", "description", "principles", "templates")
MAX_PRINCIPLES = 256

# How a principle's question reaches the judge. {a} and {b} are the two responses;
# {prompt} is the request they answer (a conversation is written one "role: text" line
# per message). Critique and revision are asked as further user turns of the
# conversation that holds the response (CAI's format), so they need only {question}.
DEFAULT_TEMPLATES = {
    "comparison": (
        "Here is a request and two responses to it.\n\n"
        "Request:\n{prompt}\n\n"
        "Response A:\n{a}\n\n"
        "Response B:\n{b}\n\n"
        "{question}\n"
        "Answer with the single letter A or B."
    ),
    "critique": "{question}",
    "revision": "{question}\nWrite only the revised response, nothing else.",
}
PLACEHOLDERS = {  # template -> (required, allowed)
    "comparison": ({"question", "a", "b"}, {"question", "a", "b", "prompt"}),
    "critique": ({"question"}, {"question"}),
    "revision": ({"question"}, {"question"}),
}


class ConstitutionError(ConfigError):
    """A constitution file with problems: printed one line per problem."""

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        super().__init__(problems, "fix the file; train/assets/constitution.yaml is an example")

    def __str__(self) -> str:
        count = len(self.problems)
        head = f"constitution {self.path}: {count} problem{'s' if count > 1 else ''} ({self.hint})"
        return "\n".join([head, *(f"  {p}" for p in self.problems)])


@dataclass(frozen=True)
class Principle:
    name: str
    comparison: str
    critique: str
    revision: str
    weight: float = 1.0


@dataclass(frozen=True)
class Constitution:
    name: str
    description: str
    principles: tuple[Principle, ...]
    templates: dict
    path: str
    digest: str  # sha256:<hex> of the file's bytes: the provenance names exactly these words

    def principle(self, name: str) -> Principle:
        for principle in self.principles:
            if principle.name == name:
                return principle
        names = ", ".join(p.name for p in self.principles)
        raise ConfigError(f"the constitution has no principle {name!r}", f"pick one of {names}")

    def pick(self, rng: random.Random, names: tuple[str, ...] = ()) -> Principle:
        """A principle drawn by weight (among ``names`` when given)."""
        pool = [p for p in self.principles if not names or p.name in names]
        return rng.choices(pool, weights=[p.weight for p in pool])[0]

    def to_provenance(self) -> dict:
        return {
            "name": self.name,
            "file": self.path,
            "sha256": self.digest,
            "principles": [p.name for p in self.principles],
        }


def example_path() -> Path:
    """The example constitution shipped with lorabay."""
    return Path(str(resources.files("lorabay.train").joinpath(EXAMPLE)))


def load_constitution(path: str | Path | None = None) -> Constitution:
    """Read and check a constitution (the shipped example when ``path`` is None)."""
    path = Path(path) if path else example_path()
    if not path.is_file():
        raise ConfigError(
            f"--constitution {path}: no such file",
            "write a YAML file of principles; train/assets/constitution.yaml is an example",
        )
    raw = path.read_bytes()
    data, problems = _read_yaml(raw)
    constitution = None
    if not problems:
        constitution, problems = _build(
            data, str(path), "sha256:" + hashlib.sha256(raw).hexdigest()
        )
    if problems:
        raise ConstitutionError(str(path), problems)
    return constitution


# ---------------------------------------------------------------- the prompts the judge sees


def render_prompt(prompt) -> str:
    """The request as text: itself, or a conversation one "role: text" line per message."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and prompt[0]["role"] == "user":
        return prompt[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def as_messages(prompt) -> list[dict]:
    """A prompt (text or a message list) as the message list the chat endpoint takes."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def comparison_messages(constitution: Constitution, principle: Principle, prompt, a: str, b: str):
    """The judge's question: which of responses ``a`` and ``b`` follows ``principle`` better.
    The responses are shown without their surrounding whitespace, which is not content."""
    text = constitution.templates["comparison"].format(
        question=principle.comparison, prompt=render_prompt(prompt), a=a.strip(), b=b.strip()
    )
    return [{"role": "user", "content": text}]


def critique_messages(constitution: Constitution, principle: Principle, prompt, response: str):
    """The conversation that asks for a critique of ``response`` under ``principle``."""
    ask = constitution.templates["critique"].format(question=principle.critique)
    return [
        *as_messages(prompt),
        {"role": "assistant", "content": response},
        {"role": "user", "content": ask},
    ]


def revision_messages(
    constitution: Constitution, principle: Principle, prompt, response: str, critique: str
):
    """The critique conversation continued: the critique given, a revision asked for."""
    ask = constitution.templates["revision"].format(question=principle.revision)
    return [
        *critique_messages(constitution, principle, prompt, response),
        {"role": "assistant", "content": critique},
        {"role": "user", "content": ask},
    ]


# ---------------------------------------------------------------- reading and checking


class _LineDict(dict):
    """A YAML mapping that remembers where it and each of its keys stand in the file."""

    line = 0
    key_lines: dict


def _read_yaml(raw: bytes) -> tuple[object, list[str]]:
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader, node):
        loader.flatten_mapping(node)
        keys = [loader.construct_object(k, deep=True) for k, _ in node.value]
        result = _LineDict(loader.construct_mapping(node, deep=True))
        result.line = node.start_mark.line + 1
        result.key_lines = {}
        result.repeated = []
        for key, (key_node, _) in zip(keys, node.value, strict=True):
            if key in result.key_lines:
                result.repeated.append((key, key_node.start_mark.line + 1))
            result.key_lines.setdefault(key, key_node.start_mark.line + 1)
        return result

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, ["not UTF-8 text"]
    try:
        return yaml.load(text, Loader=Loader), []  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        return None, [f"{where}not valid YAML ({getattr(error, 'problem', None) or error})"]


def _line(mapping, key=None) -> str:
    if not isinstance(mapping, _LineDict):
        return ""
    number = mapping.key_lines.get(key, mapping.line) if key is not None else mapping.line
    return f"line {number}: "


def _build(data, path: str, digest: str) -> tuple[Constitution | None, list[str]]:
    problems: list[str] = []
    if not isinstance(data, dict):
        return None, ["the file must be a mapping with a 'principles' list (see the example)"]
    problems += _mapping_problems(data, TOP_KEYS, "")
    name = data.get("name", Path(path).stem)
    if not isinstance(name, str) or not name.strip():
        problems.append(f"{_line(data, 'name')}'name' must be text")
    description = data.get("description", "")
    if not isinstance(description, str):
        problems.append(f"{_line(data, 'description')}'description' must be text")
    templates, template_problems = _templates(data)
    problems += template_problems
    principles: list[Principle] = []
    raw_principles = data.get("principles")
    if raw_principles is None:
        problems.append("'principles' is missing: give a list of principles")
    elif not isinstance(raw_principles, list) or not raw_principles:
        problems.append(f"{_line(data, 'principles')}'principles' must be a non-empty list")
    elif len(raw_principles) > MAX_PRINCIPLES:
        problems.append(f"{_line(data, 'principles')}more than {MAX_PRINCIPLES} principles")
    else:
        seen: dict[str, int] = {}
        for number, item in enumerate(raw_principles, 1):
            principle, found = _principle(item, number)
            problems += found
            given = item.get("name") if isinstance(item, dict) else None
            if isinstance(given, str) and given.strip() in seen:
                problems.append(
                    f"{_line(item, 'name')}principle {number}: name {given.strip()!r} is "
                    f"already principle {seen[given.strip()]}'s; names must differ"
                )
            elif isinstance(given, str) and given.strip():
                seen[given.strip()] = number
            if principle is not None:
                principles.append(principle)
    if problems:
        return None, problems
    constitution = Constitution(
        name=name.strip(),
        description=description.strip(),
        principles=tuple(principles),
        templates=templates,
        path=path,
        digest=digest,
    )
    return constitution, []


def _mapping_problems(mapping: dict, known: tuple[str, ...], what: str) -> list[str]:
    what = f"{what}: " if what else ""
    problems = [
        f"line {line}: {what}key {key!r} is given twice"
        for key, line in getattr(mapping, "repeated", [])
    ]
    for key in mapping:
        if key not in known:
            import difflib

            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(known)})"
            problems.append(f"{_line(mapping, key)}{what}unknown key {key!r}{hint}")
    return problems


def _principle(item, number: int) -> tuple[Principle | None, list[str]]:
    where = f"principle {number}"
    if not isinstance(item, dict):
        return None, [f"{where} must be a mapping of name, comparison, critique, revision"]
    if isinstance(item.get("name"), str) and item["name"].strip():
        where += f" ({item['name'].strip()})"
    problems = _mapping_problems(item, PRINCIPLE_KEYS, where)
    for key in ("name", *QUESTIONS):
        value = item.get(key)
        if value is None:
            problems.append(f"{_line(item)}{where}: {key!r} is missing")
        elif not isinstance(value, str) or not value.strip():
            problems.append(f"{_line(item, key)}{where}: {key!r} must be non-empty text")
    name = item.get("name")
    if isinstance(name, str) and name.strip() and not _is_name(name.strip()):
        problems.append(
            f"{_line(item, 'name')}{where}: name {name!r} may hold only letters, digits, '-', '_'"
        )
    weight = item.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
        problems.append(f"{_line(item, 'weight')}{where}: 'weight' must be a number above 0")
    if problems:
        return None, problems
    return Principle(
        name=name.strip(),
        comparison=item["comparison"].strip(),
        critique=item["critique"].strip(),
        revision=item["revision"].strip(),
        weight=float(weight),
    ), []


def _is_name(name: str) -> bool:
    return len(name) <= 64 and all(c.isalnum() or c in "-_" for c in name)


def _templates(data: dict) -> tuple[dict, list[str]]:
    templates = dict(DEFAULT_TEMPLATES)
    given = data.get("templates")
    if given is None:
        return templates, []
    if not isinstance(given, dict):
        return templates, [f"{_line(data, 'templates')}'templates' must be a mapping"]
    problems = _mapping_problems(given, tuple(PLACEHOLDERS), "templates")
    for key, value in given.items():
        if key not in PLACEHOLDERS:
            continue
        where = f"{_line(given, key)}templates.{key}"
        if not isinstance(value, str) or not value.strip():
            problems.append(f"{where} must be non-empty text")
            continue
        try:
            used = {
                field for _, field, _, _ in string.Formatter().parse(value) if field is not None
            }
        except ValueError as error:
            problems.append(f"{where}: {error} (write a literal brace as {{{{ or }}}})")
            continue
        required, allowed = PLACEHOLDERS[key]
        for field in sorted(used - allowed):
            shown = ", ".join("{" + f + "}" for f in sorted(allowed))
            problems.append(f"{where}: unknown placeholder {{{field}}} (allowed: {shown})")
        for field in sorted(required - used):
            problems.append(f"{where}: needs the placeholder {{{field}}}")
        templates[key] = value
    return templates, problems
