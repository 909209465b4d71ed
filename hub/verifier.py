"""The generative verifier format (``verifier.json``): one layout for training, scoring and serving.

A generative verifier (``lorabay train reward`` / ``lorabay train prm``, the default
``--format generative``) is a plain causal-LM LoRA, so the serving engine runs it like any
other adapter, on the same base. Its judgement is read from two label tokens of the base's
own vocabulary, as Math-Shepherd's PRM reads "+" and "-" (arXiv:2312.08935). What it reads,
in token ids::

    prompt | step 1, separator, GOOD | step 2, separator, GOOD | ...

Each GOOD token is a *marker*: the verdict on step k is the next-token distribution at the
position just before marker k (the separator's last token), over the two labels only:

    p(step k is right) = softmax(logit[good], logit[bad])[good] = sigmoid(logit[good] - logit[bad])

The marker in the input is GOOD whatever the step's label, so no step ever sees an earlier
label: what training teaches is what reading asks. An outcome reward model is the same
with one step, the whole response. A softmax over the two labels (not the whole
vocabulary) because a base's final norm bounds how far one logit can rise above the rest:
on the random tiny base no token ever gets more than ~7% of the full softmax.

Old verifiers carry a ``score`` head in ``modules_to_save`` and a ``head.json``
(:data:`HEAD_FILE`): vLLM cannot run the head. They are still read in-process
(``lorabay score``, ``lorabay train rlhf --reward``); the gateway refuses them with the
command that retrains them (:func:`verifier_problems`).

    spec = VerifierSpec.from_json(json.loads(Path(folder, VERIFIER_FILE).read_text()))
    steps = spec.split_steps(candidate_ids)            # token ids of each step
    prefixes = spec.reading_prefixes(prompt_ids, steps)  # one read at the end of each
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lorabay.hub.errors import InvalidAdapter

VERIFIER_FILE = "verifier.json"
HEAD_FILE = "head.json"  # the older format: a LoRA plus a score head vLLM cannot run
FORMAT = "generative"
KINDS = ("reward", "prm")
MAX_IDS = 16  # longest separator or end-token list a spec may carry
RETRAIN = {
    "reward": "lorabay train reward --format generative",
    "prm": "lorabay train prm --format generative",
}


@dataclass(frozen=True)
class VerifierSpec:
    """What ``verifier.json`` says: the kind, the two label tokens, the step separator's token
    ids and the tokens that end a response (stripped before a response is read)."""

    kind: str  # reward | prm
    good_token: str
    good_id: int
    bad_token: str
    bad_id: int
    step_separator: str
    separator_ids: tuple[int, ...]
    end_ids: tuple[int, ...] = ()

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "kind": self.kind,
            "good_token": self.good_token,
            "good_id": self.good_id,
            "bad_token": self.bad_token,
            "bad_id": self.bad_id,
            "step_separator": self.step_separator,
            "separator_ids": list(self.separator_ids),
            "end_ids": list(self.end_ids),
        }

    @classmethod
    def from_json(cls, data, source: str = VERIFIER_FILE) -> VerifierSpec:
        """The spec, or InvalidAdapter listing every problem (the file comes from an adapter,
        which anyone may have pushed: nothing in it is trusted unchecked)."""
        problems = spec_problems(data)
        if problems:
            raise InvalidAdapter(source, "; ".join(problems), "retrain the verifier")
        return cls(
            kind=data["kind"],
            good_token=data["good_token"],
            good_id=data["good_id"],
            bad_token=data["bad_token"],
            bad_id=data["bad_id"],
            step_separator=data["step_separator"],
            separator_ids=tuple(data["separator_ids"]),
            end_ids=tuple(data.get("end_ids") or ()),
        )

    @property
    def label_ids(self) -> list[int]:
        return [self.good_id, self.bad_id]

    # -- the layout, in token ids --------------------------------------------------------
    def marked_input(self, prompt_ids: list[int], steps: list[list[int]]):
        """(ids, markers): the prompt, then each step followed by the separator and a GOOD
        marker; ``markers[k]`` is the index of step k's marker (its verdict is read one
        position earlier)."""
        ids, markers = list(prompt_ids), []
        for step in steps:
            ids += list(step) + list(self.separator_ids)
            markers.append(len(ids))
            ids.append(self.good_id)
        return ids, markers

    def reading_prefixes(self, prompt_ids: list[int], steps: list[list[int]]) -> list[list[int]]:
        """One sequence per step, ending where that step's verdict is read (before its
        marker): an engine that reads only the next token after a prompt reads them all."""
        ids, markers = self.marked_input(prompt_ids, steps)
        return [ids[:marker] for marker in markers]

    def split_steps(self, response_ids: list[int]) -> list[list[int]]:
        """A response's steps, in token ids (:func:`split_step_text` on text): its end
        tokens stripped; an outcome reward model's one step is the whole response."""
        ids = list(response_ids)
        while ids and ids[-1] in self.end_ids:
            ids.pop()
        if self.kind == "reward":
            return [ids]
        separator = list(self.separator_ids)
        width = len(separator)
        steps, current, content, at = [], [], False, 0
        while at < len(ids):
            if ids[at : at + width] == separator:
                if content:
                    steps.append(current)
                    current, content = [], False
                else:
                    current += separator
                at += width
                continue
            current.append(ids[at])
            content = True
            at += 1
        if content:
            steps.append(current)
        return steps

    def split_text(self, response: str) -> list[str]:
        """The same steps of a response's text."""
        if self.kind == "reward":
            return [response]
        return split_step_text(response, self.step_separator)


def split_step_text(text: str, separator: str) -> list[str]:
    """A solution's steps: a step ends at a separator that follows something else; a
    separator with nothing before it (an empty line) starts the next step, so a verifier
    sees it; a last piece without a separator is a step too, a trailing run of
    separators is none: ``"a\\n\\nb\\n"`` -> ``["a", "\\nb"]``."""
    steps, current = [], ""
    pieces = text.split(separator)
    for index, piece in enumerate(pieces):
        current += piece
        if index == len(pieces) - 1:
            break  # no separator after the last piece
        if current.replace(separator, ""):
            steps.append(current)
            current = ""
        else:
            current += separator
    if current.replace(separator, ""):
        steps.append(current)
    return steps


def spec_problems(data) -> list[str]:
    if not isinstance(data, dict):
        return ["verifier.json must hold an object"]
    problems = []
    if data.get("format") != FORMAT:
        problems.append(f"format {data.get('format')!r} is not {FORMAT!r}")
    if data.get("kind") not in KINDS:
        problems.append(f"kind {data.get('kind')!r} is not one of {', '.join(KINDS)}")
    for key in ("good_id", "bad_id"):
        value = data.get(key)
        if not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31):
            problems.append(f"{key} must be a token id, got {str(value)[:40]!r}")
    if data.get("good_id") == data.get("bad_id"):
        problems.append("good_id and bad_id must differ")
    for key in ("good_token", "bad_token", "step_separator"):
        value = data.get(key)
        if not isinstance(value, str) or not value or len(value) > 64:
            problems.append(f"{key} must be text of 1-64 characters")
    for key, required in (("separator_ids", True), ("end_ids", False)):
        value = data.get(key, [] if not required else None)
        if (
            not isinstance(value, list)
            or (required and not value)
            or len(value) > MAX_IDS
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
        ):
            problems.append(f"{key} must be a list of at most {MAX_IDS} token ids")
    return problems


def read_verifier_spec(folder: str | Path) -> VerifierSpec | None:
    """The spec in an adapter folder, None when it has no ``verifier.json``."""
    path = Path(folder) / VERIFIER_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as error:
        raise InvalidAdapter(str(path), f"not readable JSON ({error})") from None
    return VerifierSpec.from_json(data, str(path))


def verifier_problems(manifest) -> list[str]:
    """Why ``manifest`` cannot be a verifier the engine runs (from the manifest alone: its
    kind and file list); [] when it can."""
    kind = manifest.kind
    if kind not in KINDS:
        return [f"kind {kind!r} is not a verifier: give a reward model or a PRM"]
    paths = {f["path"] for f in manifest.files}
    head = HEAD_FILE in paths or (manifest.peft or {}).get("modules_to_save")
    if head:
        return [
            f"it is a {kind} with a score head (the older format), which the engine cannot run; "
            f"`lorabay score` still reads it in-process. Retrain it as a generative verifier: "
            f"`{RETRAIN[kind]}`"
        ]
    if VERIFIER_FILE not in paths:
        return [
            f"kind {kind!r} but no {VERIFIER_FILE}: not trained by lorabay; train one with "
            f"`{RETRAIN[kind]}`"
        ]
    return []
