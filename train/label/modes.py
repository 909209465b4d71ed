"""The two labelling modes, one prompt at a time (train/label/run.py drives many at once).

``prefs`` (RLAIF; Constitutional AI's RL phase, arXiv:2212.08073 section 4): K responses
from the policy; every pair of different responses is compared by the judge under a
principle drawn from the constitution, in both orders; the soft label is the mean
probability that a response is the better one (train/label/judge.py); a pair whose label
is closer to 0.5 than ``threshold`` allows is dropped and counted. A kept pair is a DPO
record ``{"prompt", "chosen", "rejected", "score", "principle", "orders"}``.

``revise`` (Constitutional AI's supervised phase): a response from the policy, the
judge's critique of it under a principle, then the judge's revision given that critique;
the revision becomes an SFT record ``{"prompt", "completion", "principle", "response",
"critique"}``.

Records are chat-shaped (message lists) whatever the prompt file holds: the responses
were sampled through the chat endpoint, so training must render them with the same
chat template.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections import Counter
from dataclasses import dataclass, field

from lorabay.train.label.client import Endpoint, PinnedModel
from lorabay.train.label.constitution import (
    Constitution,
    as_messages,
    comparison_messages,
    critique_messages,
    revision_messages,
)
from lorabay.train.label.judge import TOP_LOGPROBS, PairJudgement, verdict_from_choice

MAX_SAMPLE_REQUESTS = 4  # servers that ignore `n` are asked again, this many times at most


@dataclass(frozen=True)
class Job:
    """What every prompt of a run shares."""

    endpoint: Endpoint
    policy: PinnedModel
    judge: PinnedModel
    constitution: Constitution
    samples: int
    temperature: float
    top_p: float
    max_tokens: int
    judge_max_tokens: int
    judge_temperature: float
    threshold: float
    principles: tuple[str, ...]
    seed: int
    seeded_sampling: bool = False

    def rng(self, *parts) -> random.Random:
        """A generator for one decision of one prompt: same seed, same draws, resumed or not."""
        return random.Random("-".join(map(str, (self.seed, *parts))))

    def request_seed(self, *parts) -> dict:
        """``{"seed": N}`` for one request with --seeded-sampling, else nothing."""
        if not self.seeded_sampling:
            return {}
        return {"seed": self.rng("request", *parts).randrange(2**31)}


@dataclass
class Outcome:
    records: list[dict] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)


async def sample_responses(job: Job, index: int, messages: list[dict]) -> list[str]:
    """``job.samples`` responses of the policy to ``messages``."""
    texts: list[str] = []
    for attempt in range(MAX_SAMPLE_REQUESTS):
        answer = await job.endpoint.chat(
            job.policy.served,
            messages,
            n=job.samples - len(texts),
            temperature=job.temperature,
            top_p=job.top_p,
            max_tokens=job.max_tokens,
            **job.request_seed("sample", index, attempt),
        )
        texts += [message_text(choice) for choice in answer["choices"]]
        if len(texts) >= job.samples:
            break
    return texts[: job.samples]


def message_text(choice: dict) -> str:
    content = (choice.get("message") or {}).get("content")
    return content if isinstance(content, str) else ""


# ---------------------------------------------------------------- prefs


async def judge_pair(job: Job, principle, prompt, x: str, y: str) -> PairJudgement | None:
    """Both orders of the comparison, asked at once; None when an order gave no A or B."""
    first, second = await asyncio.gather(
        *(
            job.endpoint.chat(
                job.judge.served,
                comparison_messages(job.constitution, principle, prompt, a, b),
                max_tokens=1,
                temperature=0,
                logprobs=True,
                top_logprobs=TOP_LOGPROBS,
            )
            for a, b in ((x, y), (y, x))
        )
    )
    x_first = verdict_from_choice(first["choices"][0]) if first["choices"] else None
    x_second = verdict_from_choice(second["choices"][0]) if second["choices"] else None
    if x_first is None or x_second is None:
        return None
    return PairJudgement(x_first, x_second)


async def label_prefs(job: Job, index: int, prompt) -> Outcome:
    messages = as_messages(prompt)
    texts = await sample_responses(job, index, messages)
    outcome = Outcome(counts=Counter(prompts=1, samples=len(texts)))
    counts = outcome.counts
    asked = []
    for number, (x, y) in enumerate(itertools.combinations(texts, 2)):
        counts["pairs"] += 1
        if not x.strip() or not y.strip():
            counts["dropped_empty"] += 1
        elif x.strip() == y.strip():
            counts["dropped_identical"] += 1
        else:
            principle = job.constitution.pick(job.rng("principle", index, number), job.principles)
            asked.append((x, y, principle))
    judgements = await asyncio.gather(*(judge_pair(job, p, prompt, x, y) for x, y, p in asked))
    for (x, y, principle), judgement in zip(asked, judgements, strict=True):
        counts["judged"] += 1
        counts["judgements"] += 2  # one request per order
        if judgement is None:
            counts["dropped_no_verdict"] += 1
            continue
        counts["first_position_sum"] += judgement.x_first.p_a + judgement.x_second.p_a
        counts["answer_mass_sum"] += judgement.x_first.mass + judgement.x_second.mass
        counts["orders_agree"] += judgement.orders_agree
        if judgement.confidence < job.threshold:
            counts["dropped_low_confidence"] += 1
            continue
        outcome.records.append(preference_record(messages, x, y, principle.name, judgement))
    counts["records"] = len(outcome.records)
    return outcome


def preference_record(messages, x: str, y: str, principle: str, judgement: PairJudgement):
    x_wins = judgement.p_x >= 0.5
    chosen, rejected = (x, y) if x_wins else (y, x)
    if x_wins:  # p(chosen is better) in each order, chosen shown as A, then as B
        as_a, as_b = judgement.x_first.p_a, 1 - judgement.x_second.p_a
    else:
        as_a, as_b = judgement.x_second.p_a, 1 - judgement.x_first.p_a
    return {
        "prompt": messages,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "score": round(judgement.confidence, 6),
        "principle": principle,
        "orders": {"chosen_as_a": round(as_a, 6), "chosen_as_b": round(as_b, 6)},
    }


# ---------------------------------------------------------------- revise


async def revise_response(job: Job, index: int, number: int, prompt, response: str):
    """(principle, critique, revision) for one response."""
    principle = job.constitution.pick(job.rng("principle", index, number), job.principles)
    params = {"max_tokens": job.judge_max_tokens, "temperature": job.judge_temperature}
    critique_asked = critique_messages(job.constitution, principle, prompt, response)
    answer = await job.endpoint.chat(
        job.judge.served, critique_asked, **job.request_seed("critique", index, number), **params
    )
    critique = message_text(answer["choices"][0]).strip() if answer["choices"] else ""
    revision_asked = revision_messages(job.constitution, principle, prompt, response, critique)
    answer = await job.endpoint.chat(
        job.judge.served, revision_asked, **job.request_seed("revise", index, number), **params
    )
    revision = message_text(answer["choices"][0]).strip() if answer["choices"] else ""
    return principle, critique, revision


async def label_revise(job: Job, index: int, prompt) -> Outcome:
    messages = as_messages(prompt)
    texts = await sample_responses(job, index, messages)
    outcome = Outcome(counts=Counter(prompts=1, samples=len(texts)))
    counts = outcome.counts
    kept = [(n, text) for n, text in enumerate(texts) if text.strip()]
    counts["dropped_empty"] += len(texts) - len(kept)
    revised = await asyncio.gather(*(revise_response(job, index, n, prompt, t) for n, t in kept))
    for (_, response), (principle, critique, revision) in zip(kept, revised, strict=True):
        counts["revisions"] += 1
        if not revision:
            counts["dropped_empty_revision"] += 1
            continue
        outcome.records.append(
            {
                "prompt": messages,
                "completion": [{"role": "assistant", "content": revision}],
                "principle": principle.name,
                "response": response,
                "critique": critique,
            }
        )
    counts["records"] = len(outcome.records)
    return outcome


MODES = {"prefs": label_prefs, "revise": label_revise}
