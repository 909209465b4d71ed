"""Test-time compute in the gateway: best-of-N, verifier-weighted votes, PRM-guided beam search.

Fields a client adds to an ordinary ``/v1/chat/completions`` or ``/v1/completions`` body
(plain JSON; the openai client's ``extra_body``)::

    "best_of": N, "verifier": REF       N candidates from the policy, best first by the verifier
    "aggregate": "min"|"prod"|"last"    a PRM's solution score from its step scores (prod)
    "weighted_vote": true, "answer_pattern": REGEX
                                        the answer whose candidates' scores sum highest (no
                                        verifier: each counts 1, a majority vote)
    "search": {"strategy": "beam", "width": W, "expand": M, "max_steps": S}, "verifier": PRM

The verifier is an adapter the one engine runs on the one base (lorabay.hub.verifier):
a generative reward model or PRM whose verdict on a step is the softmax over two label
tokens at the position that ends the step. The engine returns exactly those two
log-probabilities for the next token after a prompt (``logprob_token_ids``), so the
gateway sends, in ONE /v1/completions request, every prefix that ends at a step of
every candidate, as token ids, with ``max_tokens: 1``; vLLM's prefix cache shares what
the prefixes have in common. The candidates' own token ids (``return_token_ids``) are
what is read: the gateway tokenizes nothing and loads no model. Chosen over
``prompt_logprobs`` (one read per candidate, but only the token actually in the prompt
and the top-k, so the other label's probability is missing when it is small) and over
``/generative_scoring`` (the same next-token read; the private engine serves only the
OpenAI routes, engine_guard.py).

Best-of-N is one engine request for the policy (``n = best_of``) and one for the
verifier. Beam search (the search-and-learn recipe, arXiv:2408.03314): the first step
samples W x M continuations of the prompt, each stopped at the PRM's step separator;
each later step expands every kept beam by M (one request per beam, batched by the
engine); every partial solution is scored (only its new step: the earlier ones were read
with its parent), finished ones (EOS, the client's stop, the token budget) are kept aside, and the best W unfinished ones go on, until W are
finished, none is left, or S steps were taken. Complete solutions rank first.

The answer is the endpoint's usual object: ``choices`` holds the best ``n`` (1 by
default), each with its ``score`` and ``candidate`` (its index in ``candidates``);
``candidates`` every candidate's text, score, step scores and answer; ``policy`` and
``verifier`` the exact ``name:version@sha256:...`` used; ``selection`` how the choice
was made and what it cost (``sampling_seconds``, ``scoring_seconds``). ``stream: true``
is refused (400): the answer exists only once every candidate is scored.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from dataclasses import dataclass, field

import aiohttp

from lorabay.hub.errors import InvalidAdapter
from lorabay.hub.verifier import VerifierSpec, read_verifier_spec
from lorabay.serve.engine import engine_answer
from lorabay.serve.errors import InvalidRequest
from lorabay.serve.gateway import engine_down
from lorabay.serve.options import SearchLimits
from lorabay.serve.resolve import VERIFIER
from lorabay.serve.validate import CHAT, COMPLETIONS, parse_json

FIELDS = ("best_of", "verifier", "aggregate", "weighted_vote", "answer_pattern", "search")
AGGREGATES = ("min", "prod", "last")
SEARCH_KEYS = ("strategy", "width", "expand", "max_steps")
PATTERN_CHARS = 500
PATTERN_SECONDS = 0.05  # one candidate's answer_pattern match (regex's timeout: no ReDoS)
# What a beam search passes on to its engine requests; anything else is refused (400), since
# its continuations are requests of its own, not the client's.
SEARCH_SAMPLING = (
    "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "stop", "user",
)  # fmt: skip
SEARCH_TOKENS = 512  # a beam's token budget when the request gives no max_tokens
TOKEN_FIELDS = ("token_ids", "prompt_token_ids")  # ours, unless the client asked for them


# -- the request's plan ------------------------------------------------------------------


@dataclass(frozen=True)
class Beam:
    width: int
    expand: int
    max_steps: int


@dataclass(frozen=True)
class Plan:
    """What a request asked of test-time compute (:func:`read_plan`)."""

    n: int  # choices returned
    best_of: int | None = None
    verifier: str | None = None
    aggregate: str | None = None  # None: prod
    pattern: object | None = None  # a compiled regex.Pattern (weighted_vote)
    beam: Beam | None = None
    token_ids: bool = False  # the client asked for return_token_ids itself


def bad(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(message, param=param)


def read_plan(body: dict, endpoint: str, limits: SearchLimits) -> Plan | None:
    """The test-time-compute fields of a parsed request, taken out of ``body`` and checked
    (InvalidRequest naming the field); None for an ordinary request."""
    given = {name: body.pop(name) for name in FIELDS if name in body}
    given = {name: value for name, value in given.items() if value is not None}
    if not given:
        return None
    best_of = given.get("best_of")
    if best_of is not None and not _positive(best_of):
        raise bad(
            f"'best_of' must be a positive integer, got {json.dumps(best_of)[:40]}", "best_of"
        )
    if best_of is not None and best_of > limits.max_best_of:
        raise bad(
            f"'best_of' is {best_of}, above this server's limit of {limits.max_best_of} "
            "(--max-best-of)",
            "best_of",
        )
    verifier = given.get("verifier")
    if verifier is not None and (not isinstance(verifier, str) or not verifier.strip()):
        raise bad("'verifier' must be a reward model or PRM reference", "verifier")
    aggregate = given.get("aggregate")
    if aggregate is not None and aggregate not in AGGREGATES:
        raise bad(f"'aggregate' must be one of {', '.join(AGGREGATES)}", "aggregate")
    vote = given.get("weighted_vote")
    if vote is not None and not isinstance(vote, bool):
        raise bad("'weighted_vote' must be a boolean", "weighted_vote")
    pattern = read_pattern(given.get("answer_pattern"))
    beam = read_beam(given.get("search"), limits)

    if body.get("stream") is True:
        raise bad(
            "'stream' is not available with best_of or search: the answer is chosen only once "
            "every candidate is scored; send stream: false",
            "stream",
        )
    if beam is not None and best_of is not None:
        raise bad("'best_of' and 'search' both given: a beam search samples its own", "search")
    if beam is None and best_of is None:
        first = next(iter(given))
        raise bad(f"'{first}' needs 'best_of' (best-of-N) or 'search' (beam search)", first)
    if beam is not None and verifier is None:
        raise bad(
            "'search' needs a 'verifier': a process reward model scores its steps", "verifier"
        )
    if aggregate is not None and verifier is None:
        raise bad("'aggregate' combines a PRM verifier's step scores: add 'verifier'", "aggregate")
    if vote and pattern is None:
        raise bad(
            "'weighted_vote' needs 'answer_pattern', a regex that finds the answer",
            "answer_pattern",
        )
    if pattern is not None and not vote:
        raise bad(
            "'answer_pattern' is read for 'weighted_vote': add \"weighted_vote\": true",
            "answer_pattern",
        )
    if vote and beam is not None:
        raise bad("'weighted_vote' applies to best_of, not to search", "weighted_vote")
    if best_of is not None and verifier is None and not vote:
        raise bad(
            "'best_of' needs a 'verifier' to choose by (or weighted_vote with answer_pattern "
            "for a majority vote)",
            "verifier",
        )
    if body.get("echo"):
        raise bad("'echo' is not available with best_of or search", "echo")
    if endpoint == COMPLETIONS and not single_prompt(body.get("prompt")):
        raise bad("best_of and search take one prompt, not a list of prompts", "prompt")
    n = body.get("n") or 1
    pool = beam.width if beam is not None else best_of
    if n > pool:
        what = "search width" if beam is not None else "best_of"
        raise bad(f"'n' is {n}, more than the {what} {pool}: it returns the best n of them", "n")
    if beam is not None:
        extra = sorted(set(body) - {"model", "messages", "prompt", "n", "max_tokens",
                                     "max_completion_tokens", "stream", "return_token_ids",
                                     *SEARCH_SAMPLING})  # fmt: skip
        if extra:
            raise bad(
                f"'{extra[0]}' is not available with search (it takes {', '.join(SEARCH_SAMPLING)}, "
                "max_tokens and n)",
                extra[0],
            )
    return Plan(
        n=n,
        best_of=best_of,
        verifier=verifier.strip() if verifier else None,
        aggregate=aggregate,
        pattern=pattern,
        beam=beam,
        token_ids=body.get("return_token_ids") is True,
    )


def _positive(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def read_pattern(value):
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > PATTERN_CHARS:
        raise bad(
            f"'answer_pattern' must be a regex of 1-{PATTERN_CHARS} characters", "answer_pattern"
        )
    import regex  # the regex module: matches with a timeout, so no pattern can stall the gateway

    try:
        return regex.compile(value)
    except regex.error as error:
        raise bad(f"'answer_pattern' is not a valid regex: {error}", "answer_pattern") from None


def read_beam(value, limits: SearchLimits) -> Beam | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad('\'search\' must be an object, e.g. {"strategy": "beam", "width": 4}', "search")
    unknown = sorted(set(value) - set(SEARCH_KEYS))
    if unknown:
        raise bad(
            f"'search' has no field '{unknown[0]}' (it takes {', '.join(SEARCH_KEYS)})", "search"
        )
    if value.get("strategy", "beam") != "beam":
        raise bad("'search.strategy' must be \"beam\"", "search")
    # Defaults: search-and-learn's smallest setting, within this server's limits.
    numbers = {"width": 4, "expand": 4, "max_steps": min(8, limits.max_search_steps)}
    for key in numbers:
        if key in value:
            if not _positive(value[key]):
                raise bad(f"'search.{key}' must be a positive integer", "search")
            numbers[key] = value[key]
    width, expand, steps = numbers["width"], numbers["expand"], numbers["max_steps"]
    if width * expand > limits.max_search_samples:
        raise bad(
            f"'search' samples width x expand = {width * expand} continuations a step, above "
            f"this server's limit of {limits.max_search_samples} (--max-search-samples)",
            "search",
        )
    if steps > limits.max_search_steps:
        raise bad(
            f"'search.max_steps' is {steps}, above this server's limit of "
            f"{limits.max_search_steps} (--max-search-steps)",
            "search",
        )
    return Beam(width, expand, steps)


def single_prompt(prompt) -> bool:
    if isinstance(prompt, str):
        return True
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return True
    return isinstance(prompt, list) and len(prompt) == 1


# -- the engine ------------------------------------------------------------------------


class EngineRefused(InvalidRequest):
    """The engine refused one of the requests test-time compute sent (its message)."""

    code = "engine_error"

    def __init__(self, status: int, message: str):
        super().__init__(message, http_status=status if 400 <= status < 500 else 502)


async def engine_json(gateway, endpoint: str, body: dict) -> dict:
    """One non-streamed engine request's JSON answer; the engine's refusal or failure as
    a LorabayError (EngineUnavailable when it died under the request)."""
    response = await gateway.send(endpoint, body)
    try:
        content = await response.aread()
    except aiohttp.ClientError as error:
        gateway.supervisor.mark_down()
        raise engine_down(type(error).__name__) from None
    finally:
        await response.aclose()
    if response.status_code == 200:
        return json.loads(content)
    if response.status_code >= 500 and not await gateway.engine_answers():
        gateway.supervisor.mark_down()
        raise engine_down(f"it failed while answering ({engine_answer(response)[:200]})")
    raise EngineRefused(response.status_code, engine_answer(response))


# -- verifiers -------------------------------------------------------------------------

_SPECS: dict[str, VerifierSpec] = {}  # engine name (name@digest: content) -> its spec


@dataclass
class Verifier:
    """A verifier adapter loaded in the engine for one request, and how to read it."""

    target: object  # resolve.Target
    engine_name: str
    spec: VerifierSpec

    @property
    def labels(self) -> tuple[str, str]:
        return self.target.labels


def verifier_spec(lease) -> VerifierSpec:
    """The spec in the verified folder the pool loaded (``verifier.json``), read once per
    content."""
    spec = _SPECS.get(lease.engine_name)
    if spec is None:
        try:
            spec = read_verifier_spec(os.fspath(lease.folder))
        except InvalidAdapter as error:
            raise InvalidRequest(
                f"the verifier cannot be read: {error}", param="verifier"
            ) from None
        if spec is None:
            raise InvalidRequest("the verifier has no verifier.json", param="verifier")
        if len(_SPECS) > 1000:
            _SPECS.clear()
        _SPECS[lease.engine_name] = spec
    return spec


@dataclass
class Session:
    """One test-time-compute request: its gateway, key salt, endpoint, policy, verifier."""

    gateway: object
    salt: str
    endpoint: str
    policy: object  # resolve.Target
    policy_engine_name: str
    verifier: Verifier | None
    plan: Plan
    sampling_seconds: float = 0.0
    scoring_seconds: float = 0.0
    generated: int = 0  # tokens sampled, every request together
    scored_tokens: int = 0

    async def request(self, endpoint: str, body: dict, model: str | None = None) -> dict:
        """One engine request as the policy (or ``model``), with this key's cache salt and
        the token ids of prompt and answer."""
        body = {**body, "model": model or self.policy_engine_name, "cache_salt": self.salt}
        body.update(stream=False, return_token_ids=True)
        body.pop("stream_options", None)
        return await engine_json(self.gateway, endpoint, body)

    async def sample(self, endpoint: str, body: dict) -> dict:
        """Candidates from the policy: counted, timed, their tokens added up."""
        started = time.perf_counter()
        answer = await self.request(endpoint, body)
        self.sampling_seconds += time.perf_counter() - started
        self.generated += int((answer.get("usage") or {}).get("completion_tokens") or 0)
        self.gateway.metrics.candidates.labels(*self.policy.labels).inc(len(answer["choices"]))
        return answer

    async def score(
        self, prompt_ids: list[int], solutions: list[list[list[int]]], known=None
    ) -> list[list[float]]:
        """The verifier's p(right) for every step of every solution (each a list of steps in
        token ids), one engine request for all of them. ``known[i]``: the scores of solution
        i's first steps, read before (a beam's parent): only the steps after them are read."""
        spec = self.verifier.spec
        prefixes, owners = [], []
        found = [list(k) for k in known] if known is not None else [[] for _ in solutions]
        for index, steps in enumerate(solutions):
            for prefix in spec.reading_prefixes(prompt_ids, steps)[len(found[index]) :]:
                prefixes.append(prefix)
                owners.append(index)
        if not prefixes:
            return found
        body = {
            "model": self.verifier.engine_name,
            "prompt": prefixes,
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": 2,
            "logprob_token_ids": spec.label_ids,
            "return_tokens_as_token_ids": True,  # top_logprobs keyed "token_id:N"
            "cache_salt": self.salt,
        }
        started = time.perf_counter()
        answer = await engine_json(self.gateway, COMPLETIONS, body)
        seconds = time.perf_counter() - started
        self.scoring_seconds += seconds
        self.scored_tokens += int((answer.get("usage") or {}).get("prompt_tokens") or 0)
        metrics = self.gateway.metrics
        metrics.scorings.labels(*self.verifier.labels).inc(len(solutions))
        metrics.scoring_seconds.labels(*self.verifier.labels).observe(seconds)
        choices = sorted(answer["choices"], key=lambda c: c["index"])
        for owner, choice in zip(owners, choices, strict=True):
            found[owner].append(label_probability(choice, spec))
        return found

    def solution_score(self, steps: list[float]) -> float:
        if not steps:
            return 0.0  # nothing to judge: the worst score
        if self.verifier.spec.kind == "reward":
            return steps[0]
        aggregate = self.plan.aggregate or "prod"
        return {"min": min, "prod": math.prod, "last": lambda s: s[-1]}[aggregate](steps)


def label_probability(choice: dict, spec: VerifierSpec) -> float:
    """sigmoid(logprob[good] - logprob[bad]) of one next-token read: the softmax over the
    two labels (full-vocabulary log-probabilities differ from logits by one constant)."""
    try:
        top = choice["logprobs"]["top_logprobs"][0]
        good, bad_ = top[f"token_id:{spec.good_id}"], top[f"token_id:{spec.bad_id}"]
    except (KeyError, IndexError, TypeError):
        raise EngineRefused(
            502, "the engine's answer lacks the verifier's label log-probabilities"
        ) from None
    return 1.0 / (1.0 + math.exp(min(bad_ - good, 700.0)))


# -- candidates --------------------------------------------------------------------------


@dataclass
class Candidate:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    choice: dict | None = None  # the engine's own choice (best-of-N)
    steps: list[float] = field(default_factory=list)
    score: float | None = None
    answer: str | None = None
    finished: bool = True
    step_count: int = 0
    known: list[float] = field(default_factory=list)  # step scores read before (the parent's)

    def card(self) -> dict:
        card = {
            "index": self.index,
            "text": self.text,
            "score": self.score,
            "steps": self.steps,
            "finish_reason": self.finish_reason,
        }
        if self.answer is not None:
            card["answer"] = self.answer
        return card


def choice_text(choice: dict, endpoint: str) -> str:
    if endpoint == CHAT:
        return (choice.get("message") or {}).get("content") or ""
    return choice.get("text") or ""


def prompt_token_ids(answer: dict) -> list[int]:
    """The prompt as the engine tokenized it (chat: the template applied)."""
    ids = answer.get("prompt_token_ids")
    if ids is None and answer.get("choices"):
        ids = answer["choices"][0].get("prompt_token_ids")
    if not isinstance(ids, list):
        raise EngineRefused(502, "the engine's answer lacks the prompt's token ids")
    return ids


def find_answer(pattern, text: str) -> str | None:
    """The answer ``pattern`` finds in ``text``: its first group, else the whole match."""
    try:
        match = pattern.search(text, timeout=PATTERN_SECONDS, concurrent=True)  # GIL released
    except TimeoutError:
        raise bad(
            f"'answer_pattern' took over {PATTERN_SECONDS * 1000:.0f} ms on one candidate: "
            "simplify it",
            "answer_pattern",
        ) from None
    if match is None:
        return None
    return (match.group(1) if pattern.groups else match.group(0)).strip()


def rank(session: Session, candidates: list[Candidate]) -> tuple[list[Candidate], dict]:
    """The candidates best first, and how they were ranked (``selection``)."""
    plan = session.plan
    if plan.pattern is None:
        ordered = sorted(candidates, key=lambda c: -(c.score or 0.0))  # stable: ties in order
        return ordered, {"strategy": "best_of"}
    votes: dict[str, float] = {}
    for candidate in candidates:
        candidate.answer = find_answer(plan.pattern, candidate.text)
        if candidate.answer is not None:
            weight = candidate.score if session.verifier is not None else 1.0
            votes[candidate.answer] = votes.get(candidate.answer, 0.0) + weight
    ordered = sorted(
        candidates,
        key=lambda c: (
            -votes.get(c.answer, -1.0) if c.answer is not None else 1.0,
            -(c.score or 0.0),
        ),
    )
    strategy = "weighted_vote" if session.verifier is not None else "majority_vote"
    tally = dict(sorted(votes.items(), key=lambda kv: -kv[1]))
    return ordered, {"strategy": strategy, "votes": tally}


# -- best-of-N ---------------------------------------------------------------------------


async def best_of(session: Session, body: dict) -> dict:
    plan = session.plan
    answer = await session.sample(session.endpoint, {**body, "n": plan.best_of})
    choices = sorted(answer["choices"], key=lambda c: c["index"])
    candidates = [
        Candidate(
            index=choice["index"],
            text=choice_text(choice, session.endpoint),
            token_ids=list(choice.get("token_ids") or []),
            finish_reason=choice.get("finish_reason"),
            choice=choice,
        )
        for choice in choices
    ]
    if session.verifier is not None:
        prompt_ids = prompt_token_ids(answer)
        solutions = [session.verifier.spec.split_steps(c.token_ids) for c in candidates]
        found = await session.score(prompt_ids, solutions)
        for candidate, steps in zip(candidates, found, strict=True):
            candidate.steps = steps
            candidate.score = session.solution_score(steps)
    # A vote's regex runs in a thread: even a slow pattern (each match has its timeout)
    # never holds the gateway's event loop.
    ordered, selection = await asyncio.to_thread(rank, session, candidates)
    chosen = []
    for position, candidate in enumerate(ordered[: plan.n]):
        choice = dict(candidate.choice)
        if not plan.token_ids:
            for key in TOKEN_FIELDS:
                choice.pop(key, None)
        choice.update(index=position, score=candidate.score, candidate=candidate.index)
        chosen.append(choice)
    result = {key: value for key, value in answer.items() if key not in TOKEN_FIELDS}
    if plan.token_ids and "prompt_token_ids" in answer:
        result["prompt_token_ids"] = answer["prompt_token_ids"]
    result["choices"] = chosen
    return finish(session, result, candidates, {**selection, "best_of": plan.best_of})


# -- beam search -------------------------------------------------------------------------


@dataclass
class Partial:
    """A solution being searched: its tokens and text so far."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    steps: int = 0
    scores: list[float] = field(default_factory=list)  # its steps' scores, read already


async def beam_search(session: Session, body: dict) -> dict:
    plan, spec = session.plan, session.verifier.spec
    beam = plan.beam
    sampling = {key: body[key] for key in SEARCH_SAMPLING if key in body}
    client_stops = sampling.pop("stop", None)
    client_stops = [client_stops] if isinstance(client_stops, str) else list(client_stops or [])
    # A step ends at the separator: one token stops on its id, a longer one on its text.
    single = len(spec.separator_ids) == 1
    stop = {"stop_token_ids": list(spec.separator_ids)} if single else {}
    stops = client_stops + ([] if single else [spec.step_separator])
    if stops:
        stop["stop"] = stops
    step_request = {**sampling, **stop, "include_stop_str_in_output": True}
    budget = body.get("max_tokens") or body.get("max_completion_tokens") or SEARCH_TOKENS

    first = {key: body[key] for key in ("messages", "prompt") if key in body}
    answer = await session.sample(
        session.endpoint,
        {**first, **step_request, "n": beam.width * beam.expand, "max_tokens": budget},
    )
    prompt_ids = prompt_token_ids(answer)
    model = answer.get("model")
    pool = grow(Partial(), answer, session.endpoint, spec, client_stops, budget)
    done: list[Candidate] = []
    steps = 0
    while True:
        steps += 1
        session.gateway.metrics.search_steps.labels(*session.policy.labels).inc()
        pool = unique(pool)
        solutions = [spec.split_steps(c.token_ids) for c in pool]
        found = await session.score(prompt_ids, solutions, [c.known for c in pool])
        for candidate, read in zip(pool, found, strict=True):
            candidate.steps, candidate.score = read, session.solution_score(read)
        done += [c for c in pool if c.finished]
        active = sorted((c for c in pool if not c.finished), key=lambda c: -c.score)[: beam.width]
        if not active or steps >= beam.max_steps or len(done) >= beam.width:
            break
        answers = await asyncio.gather(
            *(
                session.sample(
                    COMPLETIONS,
                    {
                        **step_request,
                        "prompt": prompt_ids + c.token_ids,
                        "n": beam.expand,
                        "max_tokens": budget - len(c.token_ids),
                    },
                )
                for c in active
            )
        )
        pool = [
            grown
            for candidate, answered in zip(active, answers, strict=True)
            for grown in grow(
                as_partial(candidate), answered, COMPLETIONS, spec, client_stops, budget
            )
        ]
    for candidate in active:
        candidate.finish_reason = "length"  # the search stopped before it did
    final = sorted(done + active, key=lambda c: (not c.finished, -c.score))
    for index, candidate in enumerate(final):
        candidate.index = index
    chosen = [
        synthesized_choice(session.endpoint, position, c)
        for position, c in enumerate(final[: plan.n])
    ]
    result = {
        "id": f"search-{answer.get('id', '')}",
        "object": answer.get("object"),
        "created": answer.get("created", int(time.time())),
        "model": model,
        "choices": chosen,
    }
    selection = {
        "strategy": "beam",
        "width": beam.width,
        "expand": beam.expand,
        "max_steps": beam.max_steps,
        "steps": steps,
    }
    return finish(session, result, final, selection, prompt_tokens=len(prompt_ids))


def as_partial(candidate: Candidate) -> Partial:
    return Partial(candidate.token_ids, candidate.text, candidate.step_count, candidate.steps)


def grow(
    partial: Partial,
    answer: dict,
    endpoint: str,
    spec: VerifierSpec,
    client_stops: list,
    budget: int,
) -> list[Candidate]:
    """The candidates one expansion made of ``partial``: a step ended at the separator
    goes on; EOS, the client's own stop or the token budget finish it."""
    grown = []
    for choice in sorted(answer["choices"], key=lambda c: c["index"]):
        ids = partial.token_ids + list(choice.get("token_ids") or [])
        reason, stopped_by = choice.get("finish_reason"), choice.get("stop_reason")
        at_separator = (
            reason == "stop"
            and (stopped_by in spec.separator_ids or stopped_by == spec.step_separator)
            and stopped_by not in client_stops
        )
        finished = not at_separator or len(ids) >= budget
        grown.append(
            Candidate(
                index=len(grown),
                text=partial.text + choice_text(choice, endpoint),
                token_ids=ids,
                finish_reason=("length" if at_separator else reason) if finished else None,
                finished=finished,
                step_count=partial.steps + 1,
                known=partial.scores,  # a beam ends at a separator: its steps stay as they were
            )
        )
    return grown


def unique(candidates: list[Candidate]) -> list[Candidate]:
    """One of each token sequence: low temperatures sample the same step many times."""
    seen, kept = set(), []
    for candidate in candidates:
        key = tuple(candidate.token_ids)
        if key not in seen:
            seen.add(key)
            kept.append(candidate)
    return kept


def synthesized_choice(endpoint: str, position: int, candidate: Candidate) -> dict:
    choice = {"index": position}
    if endpoint == CHAT:
        choice["message"] = {"role": "assistant", "content": candidate.text}
    else:
        choice["text"] = candidate.text
    choice.update(
        logprobs=None,
        finish_reason=candidate.finish_reason,
        score=candidate.score,
        candidate=candidate.index,
    )
    return choice


# -- the answer --------------------------------------------------------------------------


def finish(session: Session, result: dict, candidates, selection: dict, prompt_tokens=None) -> dict:
    usage = dict(result.get("usage") or {})
    if prompt_tokens is not None:
        usage["prompt_tokens"] = prompt_tokens
    usage["completion_tokens"] = session.generated
    usage["total_tokens"] = int(usage.get("prompt_tokens") or 0) + session.generated
    result["usage"] = usage
    result["policy"] = session.policy.pinned
    if session.verifier is not None:
        result["verifier"] = session.verifier.target.pinned
        selection["aggregate"] = (
            None if session.verifier.spec.kind == "reward" else session.plan.aggregate or "prod"
        )
    selection.update(
        sampling_seconds=round(session.sampling_seconds, 4),
        scoring_seconds=round(session.scoring_seconds, 4),
        scored_tokens=session.scored_tokens,
    )
    result["candidates"] = [candidate.card() for candidate in candidates]
    result["selection"] = selection
    return result


async def answer_ttc(gateway, endpoint: str, body: dict, plan: Plan, grant, timer) -> dict:
    """Answer a request with best_of or search (its plan): the JSON body. Holds the policy
    and the verifier loaded in the engine from start to end."""
    leases = []
    try:
        policy, lease = await gateway.open_target(body, grant)
        leases.append(lease)
        timer.labels = policy.labels
        verifier = None
        if plan.verifier is not None:
            target, verifier_lease = await gateway.open_target(
                {"model": plan.verifier}, grant, VERIFIER
            )
            leases.append(verifier_lease)
            verifier = Verifier(target, verifier_lease.engine_name, verifier_spec(verifier_lease))
            if verifier.spec.kind != "prm" and (plan.beam is not None or plan.aggregate):
                what = "'search'" if plan.beam is not None else "'aggregate'"
                raise bad(
                    f"{what} reads step scores: {plan.verifier} is an outcome reward model, "
                    "give a process reward model",
                    "search" if plan.beam is not None else "aggregate",
                )
        session = Session(
            gateway=gateway,
            salt=gateway.cache_salt(grant),
            endpoint=endpoint,
            policy=policy,
            policy_engine_name=policy.engine_name if lease is None else lease.engine_name,
            verifier=verifier,
            plan=plan,
        )
        result = await (beam_search if plan.beam is not None else best_of)(session, body)
        timer.usage(result["usage"])
        return result
    finally:
        for held in leases:
            if held is not None:
                gateway.pool.release(held)


# -- /v1/verify: scoring given text (lorabay score --endpoint) ---------------------------


def read_verify_request(raw: bytes) -> dict:
    """``{"verifier", "prompt", "steps": [[text, ...], ...]}`` or ``"responses": [text]``."""
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    unknown = sorted(set(body) - {"verifier", "prompt", "steps", "responses", "aggregate"})
    if unknown:
        raise bad(f"unknown field '{unknown[0]}'", unknown[0])
    if not isinstance(body.get("verifier"), str) or not body["verifier"]:
        raise bad("'verifier' is required: a reward model or PRM reference", "verifier")
    prompt = body.get("prompt")
    chat = (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in prompt)
    )
    if not (isinstance(prompt, str) and prompt) and not chat:
        raise bad("'prompt' must be text or a list of messages", "prompt")
    steps, responses = body.get("steps"), body.get("responses")
    if (steps is None) == (responses is None):
        raise bad("give 'steps' (lists of step texts) or 'responses' (texts), one of them", "steps")
    texts = steps if steps is not None else responses
    if not isinstance(texts, list) or not texts or len(texts) > 64:
        raise bad("give 1-64 solutions", "steps" if steps is not None else "responses")
    for item in texts:
        ok = (
            isinstance(item, list) and item and all(isinstance(s, str) and s.strip() for s in item)
            if steps is not None
            else isinstance(item, str)
        )
        if not ok:
            raise bad("every solution must be a list of non-empty step texts (or a text)", "steps")
    if body.get("aggregate") not in (None, *AGGREGATES):
        raise bad(f"'aggregate' must be one of {', '.join(AGGREGATES)}", "aggregate")
    return body


async def verify(gateway, body: dict, grant, timer) -> dict:
    """Score given solutions with a verifier the engine runs: the prompt and the steps are
    tokenized by the engine itself (one-token completions that return their prompts' ids),
    so the gateway loads no tokenizer and the engine serves no other route."""
    lease = None
    try:
        target, lease = await gateway.open_target({"model": body["verifier"]}, grant, VERIFIER)
        timer.labels = target.labels
        spec = verifier_spec(lease)
        session = Session(
            gateway=gateway,
            salt=gateway.cache_salt(grant),
            endpoint=COMPLETIONS,
            policy=target,
            policy_engine_name=lease.engine_name,
            verifier=Verifier(target, lease.engine_name, spec),
            plan=Plan(n=1, aggregate=body.get("aggregate")),
        )
        if body.get("steps") is not None:
            solutions = body["steps"]
        else:
            solutions = [spec.split_text(text) or [text] for text in body["responses"]]
        prompt_ids = await tokenize_prompt(session, body["prompt"])
        texts = sorted({step for steps in solutions for step in steps})
        ids = dict(zip(texts, await tokenize_texts(session, texts), strict=True))
        found = await session.score(prompt_ids, [[ids[s] for s in steps] for steps in solutions])
        data = []
        for index, (steps, read) in enumerate(zip(solutions, found, strict=True)):
            data.append(
                {
                    "index": index,
                    "score": session.solution_score(read),
                    "steps": [
                        {"text": s, "probability": p} for s, p in zip(steps, read, strict=True)
                    ],
                }
            )
        return {
            "object": "list",
            "verifier": target.pinned,
            "kind": spec.kind,
            "aggregate": None if spec.kind == "reward" else body.get("aggregate") or "prod",
            "data": data,
            "usage": {"prompt_tokens": session.scored_tokens},
        }
    finally:
        if lease is not None:
            gateway.pool.release(lease)


async def tokenize_prompt(session: Session, prompt) -> list[int]:
    endpoint, field_ = (CHAT, "messages") if isinstance(prompt, list) else (COMPLETIONS, "prompt")
    body = {field_: prompt, "max_tokens": 1, "temperature": 0.0}
    return prompt_token_ids(await session.request(endpoint, body))


async def tokenize_texts(session: Session, texts: list[str]) -> list[list[int]]:
    body = {"prompt": texts, "max_tokens": 1, "temperature": 0.0, "add_special_tokens": False}
    answer = await session.request(COMPLETIONS, body)
    return [c["prompt_token_ids"] for c in sorted(answer["choices"], key=lambda c: c["index"])]
