"""serve/ttc.py without an engine: what a request's test-time-compute fields mean, how a
read becomes a probability, how beams grow and rank (the engine tests: test_ttc.py)."""

from __future__ import annotations

import math

import pytest

from lorabay.hub.verifier import VerifierSpec
from lorabay.serve import ttc
from lorabay.serve.errors import InvalidRequest
from lorabay.serve.options import SearchLimits
from lorabay.serve.validate import CHAT, COMPLETIONS

SPEC = VerifierSpec("prm", "+", 13, "-", 15, "\n", (201,), (0,))
LIMITS = SearchLimits(max_best_of=16, max_search_samples=16, max_search_steps=4)


def plan(endpoint=COMPLETIONS, **fields):
    body = {"model": "p", "prompt": "hi", **fields}
    return ttc.read_plan(body, endpoint, LIMITS), body


def test_an_ordinary_request_has_no_plan_and_keeps_its_body():
    found, body = plan(n=2, best_of=None)
    assert found is None and body == {"model": "p", "prompt": "hi", "n": 2}


def test_fields_become_a_plan_and_leave_the_engine_body():
    found, body = plan(best_of=8, verifier=" team/prm ", aggregate="last", n=2)
    assert (found.best_of, found.verifier, found.aggregate, found.n) == (8, "team/prm", "last", 2)
    assert "best_of" not in body and "verifier" not in body and body["n"] == 2
    beam, _ = plan(endpoint=CHAT, search={"width": 2, "expand": 3}, verifier="team/prm")
    assert (beam.beam.width, beam.beam.expand, beam.beam.max_steps) == (2, 3, 4)  # capped default


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"best_of": 0, "verifier": "v"}, "best_of"),
        ({"best_of": True, "verifier": "v"}, "best_of"),
        ({"best_of": 17, "verifier": "v"}, "best_of"),
        ({"best_of": 2, "verifier": ""}, "verifier"),
        ({"best_of": 2, "verifier": "v", "aggregate": "mean"}, "aggregate"),
        ({"best_of": 2, "aggregate": "min"}, "aggregate"),
        ({"best_of": 2, "weighted_vote": True}, "answer_pattern"),
        ({"best_of": 2, "weighted_vote": True, "answer_pattern": "x" * 501}, "answer_pattern"),
        ({"search": {"width": 5, "expand": 4}, "verifier": "v"}, "search"),
        ({"search": {"depth": 3}, "verifier": "v"}, "search"),
        ({"search": [], "verifier": "v"}, "search"),
        ({"search": {}}, "verifier"),
        (
            {"search": {}, "verifier": "v", "weighted_vote": True, "answer_pattern": "x"},
            "weighted_vote",
        ),
        ({"search": {}, "verifier": "v", "logprobs": 2}, "logprobs"),
        ({"best_of": 2, "verifier": "v", "echo": True}, "echo"),
        ({"best_of": 2, "verifier": "v", "prompt": ["a", "b"]}, "prompt"),
    ],
)
def test_every_bad_or_conflicting_field_is_400_naming_it(fields, param):
    with pytest.raises(InvalidRequest) as caught:
        plan(**fields)
    assert caught.value.http_status == 400 and caught.value.param == param, caught.value


def test_a_read_is_the_softmax_over_the_two_labels():
    choice = {
        "logprobs": {
            "top_logprobs": [{"token_id:13": -1.0, "token_id:15": -3.0, "token_id:7": -0.5}]
        }
    }
    assert ttc.label_probability(choice, SPEC) == pytest.approx(1 / (1 + math.exp(-2.0)))
    with pytest.raises(ttc.EngineRefused):
        ttc.label_probability({"logprobs": None}, SPEC)


def test_a_beam_goes_on_at_the_separator_and_ends_at_eos_or_the_budget():
    answer = {
        "choices": [
            {
                "index": 0,
                "text": " kind\n",
                "token_ids": [30, 201],
                "finish_reason": "stop",
                "stop_reason": 201,
            },
            {
                "index": 1,
                "text": " warm",
                "token_ids": [31, 0],
                "finish_reason": "stop",
                "stop_reason": None,
            },
            {
                "index": 2,
                "text": " x y",
                "token_ids": [32, 33],
                "finish_reason": "length",
                "stop_reason": None,
            },
        ]
    }
    start = ttc.Partial([29, 201], " rude\n", 1)
    grown = ttc.grow(start, answer, COMPLETIONS, SPEC, [], budget=8)
    assert [c.finished for c in grown] == [False, True, True]
    assert grown[0].token_ids == [29, 201, 30, 201] and grown[0].text == " rude\n kind\n"
    assert [c.finish_reason for c in grown[1:]] == ["stop", "length"]
    # A step that uses up the budget ends the solution there.
    assert ttc.grow(start, answer, COMPLETIONS, SPEC, [], budget=4)[0].finish_reason == "length"
    assert len(ttc.unique([grown[0], ttc.Candidate(9, "", [29, 201, 30, 201], None)])) == 1


def test_a_vote_adds_scores_per_answer_and_ranks_by_them():
    import regex

    session = ttc.Session(
        None, "", COMPLETIONS, None, "p", object(), ttc.Plan(n=1, pattern=regex.compile(r"= (\d+)"))
    )
    texts = {"a = 4": 0.3, "b = 4": 0.3, "c = 5": 0.5, "no answer": 0.9}
    candidates = [
        ttc.Candidate(i, t, [], "stop", score=s) for i, (t, s) in enumerate(texts.items())
    ]
    ordered, selection = ttc.rank(session, candidates)
    assert selection == {"strategy": "weighted_vote", "votes": {"4": 0.6, "5": 0.5}}
    assert [c.text for c in ordered] == ["a = 4", "b = 4", "c = 5", "no answer"]
