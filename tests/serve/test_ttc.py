"""Test-time compute through the gateway (issue 16), with the openai client on the tiny base.

One `lorabay serve` for the module. The world: train/toy.py's praise policy (SFT: three
words a line, kind or not), served; its own samples, drawn through the gateway and
labelled by the task's rule (train/ttc_toy.py), train a generative PRM with
`lorabay train prm`, pushed while the gateway runs as toy/prm and as judges/prm (the team
key may use toy/* only). Then: best-of-N picks a right answer where greedy is wrong, beam
search returns a complete solution, a forbidden verifier is the 404 of a missing one, the
bounds hold, the metrics count, `lorabay score --endpoint` reads what transformers reads,
and only the engine holds the base.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal

import httpx
import openai
import psutil
import pytest
from click.testing import CliRunner
from servetools import GatewayProcess, metric, tiny_serve_args

from lorabay.cli.main import cli
from lorabay.hub import Registry
from lorabay.train import ttc_toy
from lorabay.train.data import write_jsonl

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ADMIN_KEY = "sk-admin-0000"
TOY_KEY = "sk-toy-00000"  # may use toy/* only
TINY = ["--threads", "1", "--batch-size", "16", "--dropout", "0", "--logging-steps", "10"]
SAMPLING = {"temperature": ttc_toy.TEMPERATURE, "max_tokens": 12}
PROMPT = "Praise: cat tree\nSteps:"


class World:
    def __init__(self, gateway: GatewayProcess, root, base, registry: str):
        self.gateway, self.root, self.base, self.registry = gateway, root, base, registry
        self.url = gateway.url

    def client(self, key: str = ADMIN_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=600)

    def run(self, *args: str, key: str = ADMIN_KEY) -> dict:
        """``lorabay ARGS --json`` in-process (the key where `score --endpoint` reads it)."""
        result = CliRunner(env={"OPENAI_API_KEY": key}).invoke(cli, [*args, "--json"])
        if result.exit_code != 0:
            raise AssertionError(result.output[-3000:]) from result.exception
        return json.loads(result.stdout.strip().splitlines()[-1])

    def train(self, method: str, name: str, *args: str) -> dict:
        output = str(self.root / "runs" / name.replace("/", "-"))
        common = ["--base", str(self.base), "--output", output, "--registry", self.registry]
        return self.run("train", method, *common, *TINY, *args, "--push", name)


def sample_through(world: World, prompts: list[str], n: int) -> list[list[str]]:
    """``n`` sampled solutions per prompt, through the gateway, all requests at once."""

    async def draw():
        client = openai.AsyncOpenAI(
            base_url=f"{world.url}/v1", api_key=ADMIN_KEY, max_retries=0, timeout=600
        )
        async with client:
            answers = await asyncio.gather(
                *(
                    client.completions.create(model="toy/policy", prompt=p, n=n, seed=i, **SAMPLING)
                    for i, p in enumerate(prompts)
                )
            )
        return [[c.text for c in sorted(a.choices, key=lambda c: c.index)] for a in answers]

    return asyncio.run(draw())


@pytest.fixture(scope="module")
def world(tiny_base, make_lora, tmp_path_factory):
    from lorabay.train.toy import step_records

    root = tmp_path_factory.mktemp("ttc")
    registry = f"file://{root / 'registry'}"
    train, heldout = ttc_toy.task_prompts(256, 32)
    sft = write_jsonl(ttc_toy.sft_records(train), root / "sft.jsonl")
    keys = root / "keys.yaml"
    keys.write_text(f"keys:\n  {ADMIN_KEY}: '*'\n  {TOY_KEY}: ['toy/*']\n")
    # An old-format PRM (a score head): the gateway refuses it with the command to retrain.
    head = root / "head-prm"
    shutil.copytree(make_lora(seed=31), head)
    (head / "head.json").write_text('{"kind": "prm", "module": "score", "outputs": 2}\n')
    Registry.open(registry).push(head, "toy/head-prm", base=tiny_base, kind="prm")
    gateway = GatewayProcess(
        [
            *tiny_serve_args(tiny_base, registry),
            *("--api-keys", str(keys), "--max-best-of", "32"),
            *("--max-search-samples", "16", "--max-search-steps", "6"),
        ],
        env={"LORABAY_HOME": str(root / "home")},
    )
    try:
        placeholder = World(gateway, root, tiny_base, registry)
        placeholder.train("sft", "toy/policy", "--data", str(sft), *ttc_toy.POLICY_RECIPE)
        gateway.start()
        assert gateway.url, gateway.output
        world = World(gateway, root, tiny_base, registry)
        # The PRM's data: 4 samples per training prompt, each step labelled by the rule,
        # and train/toy.py's labelled solutions (every word one of 20 kind or unkind ones).
        prompts = train[:128]
        sampled = sample_through(world, prompts, 4)
        records = ttc_toy.step_records(
            [p for p in prompts for _ in range(4)], [t for texts in sampled for t in texts]
        )
        records += step_records(256, 0)[0]
        write_jsonl(records, root / "prm.jsonl")
        prm = ["--data", str(root / "prm.jsonl"), "--targets", "all-linear"]
        world.prm = world.train("prm", "toy/prm", *prm, "--lr", "2e-3", "--max-steps", "120")
        Registry.open(registry).push(
            root / "runs" / "toy-prm" / "adapter", "judges/prm", base=tiny_base, kind="prm"
        )
        world.heldout = heldout
        yield world
    finally:
        gateway.stop(signal.SIGTERM)
        gateway.kill_leftovers()


def greedy(world: World, prompt: str) -> str:
    answer = world.client().completions.create(
        model="toy/policy", prompt=prompt, temperature=0, max_tokens=12
    )
    return answer.choices[0].text


# -- best-of-N -----------------------------------------------------------------------------


def test_the_prm_picks_a_right_answer_where_greedy_is_wrong(world):
    """Held-out prompts whose greedy answer has a line that is no kind word: best of 32
    by the PRM is a right one (three kind words) whenever the 32 hold one."""
    wrong = [p for p in world.heldout[:6] if not ttc_toy.is_right(greedy(world, p))]
    assert len(wrong) >= 3, "the policy's greedy answers should often be wrong"
    picked_right = 0
    for seed, prompt in enumerate(wrong):
        answer = world.client(TOY_KEY).completions.create(
            model="toy/policy",
            prompt=prompt,
            seed=seed,
            **SAMPLING,
            extra_body={"best_of": 32, "verifier": "toy/prm", "aggregate": "min"},
        )
        extra = answer.model_extra
        candidates = extra["candidates"]
        assert len(candidates) == 32 and all(c["score"] is not None for c in candidates)
        chosen = answer.choices[0]
        assert chosen.model_extra["score"] == max(c["score"] for c in candidates)
        assert candidates[chosen.model_extra["candidate"]]["text"] == chosen.text
        if any(ttc_toy.is_right(c["text"]) for c in candidates):
            # Every step of the pick is a kind word on its own line (what a PRM can see).
            assert all(ttc_toy.step_labels(ttc_toy.solution_steps(chosen.text))), chosen.text
            picked_right += ttc_toy.is_right(chosen.text)
        # What answered, exactly: the policy and the verifier, name:version@digest.
        assert extra["policy"].startswith("toy/policy:1@sha256:")
        assert extra["verifier"] == f"toy/prm:1@{world.prm['pushed']['digest']}"
        assert extra["selection"]["strategy"] == "best_of"
        assert answer.usage.completion_tokens >= 32  # every candidate's tokens
    assert picked_right >= 2, picked_right


def test_best_of_returns_the_top_n_and_votes(world):
    client = world.client(TOY_KEY)
    answer = client.completions.create(
        model="toy/policy",
        prompt=PROMPT,
        n=3,
        seed=7,
        **SAMPLING,
        extra_body={"best_of": 8, "verifier": "toy/prm"},
    )
    scores = [c.model_extra["score"] for c in answer.choices]
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert scores == sorted(scores, reverse=True)
    assert answer.usage.completion_tokens >= 8  # every candidate's tokens are counted
    # A PRM-weighted vote: the answer whose candidates' scores add up highest.
    answer = client.completions.create(
        model="toy/policy",
        prompt=PROMPT,
        seed=7,
        **SAMPLING,
        extra_body={
            "best_of": 8,
            "verifier": "toy/prm",
            "weighted_vote": True,
            "answer_pattern": ttc_toy.ANSWER_PATTERN,
        },
    )
    voted = answer.model_extra
    votes = voted["selection"]["votes"]
    assert voted["selection"]["strategy"] == "weighted_vote"
    top = next(iter(votes))
    assert votes[top] == max(votes.values())
    assert voted["candidates"][answer.choices[0].model_extra["candidate"]]["answer"] == top
    # Without a verifier every candidate counts one: a majority vote.
    majority = client.completions.create(
        model="toy/policy",
        prompt=PROMPT,
        seed=7,
        **SAMPLING,
        extra_body={"best_of": 8, "weighted_vote": True, "answer_pattern": ttc_toy.ANSWER_PATTERN},
    ).model_extra
    assert majority["selection"]["strategy"] == "majority_vote"
    assert sum(majority["selection"]["votes"].values()) <= 8
    assert "verifier" not in majority


def test_chat_best_of_reads_the_templated_prompt(world):
    """On /v1/chat/completions the verifier reads the chat-templated prompt the policy saw:
    each candidate's score is what /v1/verify gives for the same messages and text."""
    messages = [{"role": "user", "content": PROMPT}]
    answer = world.client().chat.completions.create(
        model="toy/policy",
        messages=messages,
        seed=3,
        temperature=1.0,
        max_tokens=6,
        extra_body={"best_of": 4, "verifier": "toy/prm", "aggregate": "last"},
    )
    extra = answer.model_extra
    assert (
        answer.choices[0].message.content
        == extra["candidates"][answer.choices[0].model_extra["candidate"]]["text"]
    )
    scored = [c for c in extra["candidates"] if c["steps"]]
    if scored:
        checked = httpx.post(
            f"{world.url}/v1/verify",
            json={
                "verifier": "toy/prm",
                "prompt": messages,
                "responses": [c["text"] for c in scored],
                "aggregate": "last",
            },
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            timeout=120,
        ).json()
        for candidate, row in zip(scored, checked["data"], strict=True):
            if len(row["steps"]) == len(candidate["steps"]):  # the same split of the text
                assert row["score"] == pytest.approx(candidate["score"], abs=2e-3)


# -- beam search ---------------------------------------------------------------------------


def test_beam_search_returns_a_complete_solution(world):
    before = metric(world.gateway.metrics(), "lorabay_ttc_search_steps_total", adapter="toy/policy")
    answer = world.client(TOY_KEY).completions.create(
        model="toy/policy",
        prompt=PROMPT,
        n=2,
        seed=11,
        temperature=0.3,
        max_tokens=24,
        extra_body={
            "search": {"strategy": "beam", "width": 4, "expand": 4, "max_steps": 6},
            "verifier": "toy/prm",
        },
    )
    extra = answer.model_extra
    best = answer.choices[0]
    assert best.finish_reason == "stop", (best, extra)  # it ended (EOS), not cut off
    steps = ttc_toy.solution_steps(best.text)
    assert len(steps) >= 1 and all(ttc_toy.step_labels(steps)), best.text  # every step kind
    selection = extra["selection"]
    assert selection["strategy"] == "beam" and 1 <= selection["steps"] <= 6
    assert len(answer.choices) == 2
    assert best.model_extra["score"] >= answer.choices[1].model_extra["score"] or (
        answer.choices[1].finish_reason != "stop"
    )
    assert extra["verifier"].startswith("toy/prm:1@sha256:")
    after = metric(world.gateway.metrics(), "lorabay_ttc_search_steps_total", adapter="toy/policy")
    assert after - before == selection["steps"]


# -- tenancy and bounds --------------------------------------------------------------------


def test_a_forbidden_verifier_is_the_404_of_a_missing_one(world):
    client = world.client(TOY_KEY)
    messages = {}
    for verifier in ("judges/prm", "toy/nothing"):
        with pytest.raises(openai.NotFoundError) as caught:
            client.completions.create(
                model="toy/policy",
                prompt=PROMPT,
                **SAMPLING,
                extra_body={"best_of": 2, "verifier": verifier},
            )
        body = caught.value.body
        assert body["code"] == "model_not_found"
        messages[verifier] = body["message"].replace(verifier, "X")
    assert messages["judges/prm"] == messages["toy/nothing"]
    # The admin key may use it: it is there.
    allowed = world.client().completions.create(
        model="toy/policy",
        prompt=PROMPT,
        **SAMPLING,
        extra_body={"best_of": 2, "verifier": "judges/prm"},
    )
    assert allowed.model_extra["verifier"].startswith("judges/prm:1@")


@pytest.mark.parametrize(
    "fields, param, words",
    [
        ({"best_of": 33, "verifier": "toy/prm"}, "best_of", "--max-best-of"),
        (
            {"search": {"width": 4, "expand": 5}, "verifier": "toy/prm"},
            "search",
            "--max-search-samples",
        ),
        ({"search": {"max_steps": 7}, "verifier": "toy/prm"}, "search", "--max-search-steps"),
        ({"best_of": 4, "verifier": "toy/prm", "stream": True}, "stream", "chosen only once"),
        ({"best_of": 4}, "verifier", "needs a 'verifier'"),
        ({"verifier": "toy/prm"}, "verifier", "needs 'best_of'"),
        ({"best_of": 2, "search": {}, "verifier": "toy/prm"}, "search", "both given"),
        ({"best_of": 2, "verifier": "toy/prm", "n": 3}, "n", "more than the best_of"),
        (
            {"best_of": 2, "verifier": "toy/prm", "answer_pattern": "x"},
            "answer_pattern",
            "weighted_vote",
        ),
        (
            {"best_of": 2, "weighted_vote": True, "answer_pattern": "("},
            "answer_pattern",
            "not a valid regex",
        ),
        ({"search": {"strategy": "mcts"}, "verifier": "toy/prm"}, "search", "beam"),
    ],
)
def test_bounds_and_conflicts_are_400_naming_the_field(world, fields, param, words):
    body = {"model": "toy/policy", "prompt": PROMPT, **SAMPLING, **fields}
    response = httpx.post(
        f"{world.url}/v1/completions",
        json=body,
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        timeout=120,
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_verifiers_the_engine_cannot_run_are_refused_with_the_fix(world):
    client = world.client()
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(
            model="toy/policy",
            prompt=PROMPT,
            **SAMPLING,
            extra_body={"best_of": 2, "verifier": "toy/head-prm"},
        )
    body = caught.value.body
    assert body["code"] == "incompatible_adapter"
    assert (
        "score head" in body["message"]
        and "lorabay train prm --format generative" in body["message"]
    )
    with pytest.raises(openai.BadRequestError) as caught:  # a policy is no verifier
        client.completions.create(
            model="toy/policy",
            prompt=PROMPT,
            **SAMPLING,
            extra_body={"best_of": 2, "verifier": "toy/policy"},
        )
    assert "not a verifier" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:  # and a verifier no policy
        client.completions.create(model="toy/prm", prompt=PROMPT, max_tokens=2)
    assert '"verifier"' in caught.value.body["message"]
    # /v1/models shows the verifier (kind prm) beside the policy, not the old head.
    cards = {card.id: card.model_extra for card in client.models.list()}
    assert cards["toy/prm:1"]["kind"] == "prm" and "toy/head-prm:1" not in cards


# -- scoring text, metrics, the one base -----------------------------------------------------


def test_score_through_the_gateway_reads_what_transformers_reads(world, tmp_path):
    steps = tmp_path / "steps.txt"
    steps.write_text(" kind\n warm\n loud\n")
    common = ["--prm", "toy/prm:1", "--prompt", PROMPT, "--steps", str(steps)]
    remote = world.run("score", "--endpoint", world.url, *common, key=TOY_KEY)
    local = world.run("score", "--base", str(world.base), "--registry", world.registry, *common)
    assert [s["text"] for s in remote["steps"]] == [" kind", " warm", " loud"]
    for far, near in zip(remote["steps"], local["steps"], strict=True):
        assert far["probability"] == pytest.approx(near["probability"], abs=1e-3)
    assert remote["digest"] == local["digest"] == world.prm["pushed"]["digest"]
    probabilities = [s["probability"] for s in remote["steps"]]
    assert probabilities[0] > 0.9 and probabilities[1] > 0.9 and probabilities[2] < 0.1
    # Another key's verifier: the gateway's 404, in one line.
    forbidden = ["score", "--endpoint", world.url, "--prm", "judges/prm", *common[2:]]
    result = CliRunner(env={"OPENAI_API_KEY": TOY_KEY}).invoke(cli, forbidden)
    assert result.exit_code == 1 and "does not exist or you do not have access" in result.stderr


def test_metrics_count_candidates_scorings_and_time(world):
    text = world.gateway.metrics()
    assert metric(text, "lorabay_ttc_candidates_total", adapter="toy/policy") >= 32
    assert metric(text, "lorabay_verifier_scorings_total", adapter="toy/prm") >= 32
    assert metric(text, "lorabay_verifier_seconds_count", adapter="toy/prm") >= 1
    assert metric(text, "lorabay_verifier_seconds_sum", adapter="toy/prm") > 0


def test_only_the_engine_holds_the_base(world):
    """The gateway process never loaded model weights: no torch in it, the weights file
    neither open nor mapped; the engine has both."""
    weights = str(world.base / "model.safetensors")
    gateway = psutil.Process(world.gateway.process.pid)
    maps = [m.path for m in gateway.memory_maps()]
    assert not any("libtorch" in path for path in maps), "the gateway imported torch"
    assert weights not in maps and weights not in [f.path for f in gateway.open_files()]
    engine = world.gateway.engine_process()
    engine_maps = [
        m.path for p in [engine, *engine.children(recursive=True)] for m in p.memory_maps()
    ]
    assert any("libtorch" in path for path in engine_maps)
