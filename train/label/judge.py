"""The judge's verdict on a pair, as a soft label, with position bias cancelled.

The judge is asked the principle's comparison twice, once with each response first
(RLAIF, Lee et al. 2023, arXiv:2309.00267, section 2.1): a judge that simply likes the
first position says A both times, and the two answers cancel. Each answer is read from
the log-probabilities of the first generated token, not from its text: the label is
p(A) / (p(A) + p(B)) at that position, and the pair's soft label is the mean over the
two orders of the probability that x is the better one.

    p_first = answer_probability(choice_x_as_a)      # p(A) when x is shown as A
    p_second = 1 - answer_probability(choice_x_as_b) # p(B) when x is shown as B
    p_x_better = combine_orders(p_first, p_second)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ANSWERS = ("A", "B")
TOP_LOGPROBS = 20  # the most OpenAI's API (and vLLM by default) returns per position


@dataclass(frozen=True)
class Verdict:
    """One order's answer: p(A) renormalised over {A, B}, and how much mass A and B had."""

    p_a: float
    mass: float  # p(A) + p(B) before renormalising: low means the judge wanted to say else


def verdict_from_choice(choice: dict) -> Verdict | None:
    """The verdict in an OpenAI chat completion choice asked with ``logprobs`` and
    ``top_logprobs``; None when neither A nor B is among the first token's top tokens.

    Tokens are compared with their surrounding whitespace stripped ("A", " A" and "A\\n"
    all count as A); their probabilities add up.
    """
    content = (choice.get("logprobs") or {}).get("content") or []
    if not content:
        return None
    first = content[0]
    candidates = list(first.get("top_logprobs") or [])
    candidates.append({"token": first.get("token"), "logprob": first.get("logprob")})
    seen: set[str] = set()
    mass = {answer: 0.0 for answer in ANSWERS}
    for entry in candidates:
        token, logprob = entry.get("token"), entry.get("logprob")
        if not isinstance(token, str) or not isinstance(logprob, int | float) or token in seen:
            continue
        seen.add(token)  # the sampled token is usually among the top ones too: count it once
        if token.strip() in mass and math.isfinite(logprob):
            mass[token.strip()] += math.exp(logprob)
    total = mass["A"] + mass["B"]
    if total <= 0:
        return None
    return Verdict(p_a=mass["A"] / total, mass=total)


def combine_orders(x_first: float, x_second: float) -> float:
    """P(x is better) from p(A) with x shown first and p(B) with x shown second."""
    return (x_first + x_second) / 2


@dataclass(frozen=True)
class PairJudgement:
    """Both orders of one comparison, in terms of x (the pair's first response)."""

    x_first: Verdict  # x shown as A
    x_second: Verdict  # x shown as B

    @property
    def p_x(self) -> float:
        return combine_orders(self.x_first.p_a, 1.0 - self.x_second.p_a)

    @property
    def orders_agree(self) -> bool:
        """Both orders name the same winner (a judge led by position names A twice)."""
        return (self.x_first.p_a >= 0.5) == (self.x_second.p_a < 0.5)

    @property
    def confidence(self) -> float:
        return max(self.p_x, 1.0 - self.p_x)
