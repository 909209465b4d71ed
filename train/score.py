"""Score a solution step by step with a process reward model (``lorabay score``).

Each step's probability of being right is the PRM's judgement at the step separator,
given the prompt and every step before it; the solution's score is their product, as
"Let's Verify Step by Step" (arXiv:2305.20050) ranks solutions. In-process
(:func:`score_steps`: the base and the PRM loaded here, either format) or through a
lorabay gateway (:func:`score_steps_at`: its engine reads a generative PRM on the base
it holds; the same probabilities, tests/serve/test_ttc.py).

    result = score_steps("./tiny", "team/prm:1", "Praise: cat tree\\nSteps:", [" kind", " warm"])
    result.probabilities, result.score     # [0.998, 0.997], 0.995
    score_steps_at("http://127.0.0.1:8000", "team/prm:1", "Praise: cat tree\\nSteps:", [" kind"])
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from lorabay.hub.errors import ConfigError


@dataclass
class StepScores:
    """A solution's steps, the PRM's probability that each is right, and the product."""

    prompt: str
    steps: list[str]
    probabilities: list[float]
    prm: str  # the reference or folder the PRM came from
    digest: str
    extra: dict = field(default_factory=dict)

    @property
    def score(self) -> float:
        return math.prod(self.probabilities)

    def to_dict(self) -> dict:
        return {
            **self.extra,
            "prm": self.prm,
            "digest": self.digest,
            "prompt": self.prompt,
            "steps": [
                {"step": index, "text": text, "probability": round(p, 6)}
                for index, (text, p) in enumerate(
                    zip(self.steps, self.probabilities, strict=True), 1
                )
            ],
            "score": round(self.score, 6),
        }


def read_steps(path: str | os.PathLike) -> list[str]:
    """A solution's steps from a file: a JSON list of strings, or one step per line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--steps {path}: no such file", "write one step per line")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            steps = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"--steps {path}: not valid JSON ({error.msg})") from error
        if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
            raise ConfigError(f"--steps {path}: a .json file holds a list of step texts")
    else:
        steps = text.splitlines()
    steps = [step for step in steps if step.strip()]
    if not steps:
        raise ConfigError(f"--steps {path}: no steps", "write one step per line")
    return steps


def score_steps_at(
    endpoint: str, prm: str, prompt: str, steps: list[str], api_key: str | None = None
) -> StepScores:
    """Judge ``steps`` with the PRM ``prm`` through a lorabay gateway (its ``/v1/verify``):
    the engine behind it reads the verifier on the base it already holds."""
    from lorabay.hub.errors import LorabayError
    from lorabay.train.label.client import api_base, display_url, import_httpx

    httpx = import_httpx()
    url = api_base(endpoint) + "/verify"
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"verifier": prm, "prompt": prompt, "steps": [steps]}
    try:
        response = httpx.post(url, json=body, headers=headers, timeout=600)
    except httpx.HTTPError as error:
        raise LorabayError(
            f"--endpoint {display_url(endpoint)}: {type(error).__name__} ({error})",
            "is a lorabay gateway listening there? (`lorabay serve`)",
        ) from None
    try:
        answer = response.json()
    except ValueError:
        answer = {}
    if response.status_code != 200:
        error = answer.get("error") if isinstance(answer, dict) else None
        message = error.get("message") if isinstance(error, dict) else response.text[:200]
        raise LorabayError(
            f"--endpoint {display_url(endpoint)} answered {response.status_code}: {message}"
        )
    pinned = answer["verifier"]  # name:version@sha256:...
    ref, _, digest = pinned.partition("@")
    read = answer["data"][0]["steps"]
    extra = {"endpoint": display_url(endpoint), "verifier": pinned}
    return StepScores(prompt, steps, [step["probability"] for step in read], ref, digest, extra)


def score_steps(
    base: str | os.PathLike,
    prm: str,
    prompt: str,
    steps: list[str],
    registry: str | None = None,
    quantize: str = "none",
) -> StepScores:
    """Load ``base`` with the PRM ``prm`` (registry reference or folder) and judge ``steps``."""
    from transformers.utils import logging as transformers_logging

    from lorabay.train.heads import attach_head, step_probabilities
    from lorabay.train.model import load_base
    from lorabay.train.run import resolve_adapter

    if not (Path(base) / "config.json").is_file():
        raise ConfigError(
            f"--base {base}: no config.json there",
            "give a base folder (`lorabay base create DIR` makes one)",
        )
    transformers_logging.disable_progress_bar()
    source = resolve_adapter(prm, registry)
    model, tokenizer = load_base(base, quantize)
    model, head = attach_head(model, source, "prm", kind="prm", flag="--prm")
    model.eval()
    probabilities = step_probabilities(head, tokenizer, [prompt], [steps])[0]
    return StepScores(prompt, steps, probabilities, source.ref, source.digest)
