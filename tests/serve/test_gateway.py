"""The gateway and the real vLLM engine, through the official `openai` client.

One `lorabay serve` process (tiny base, float32, API keys on) serves the whole
module: starting vLLM costs tens of seconds. Tests run in file order; the last ones
kill the engine and then stop the server with SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from lorabay.hub import Registry
from servetools import GatewayProcess, greedy_reference, tiny_serve_args, wait_gone

pytestmark = pytest.mark.vllm

ADMIN_KEY = "sk-admin-0000"
TEAM_A_KEY = "sk-team-a-0000"
NEW_TOKENS = 16
SENTENCES = [
    "hello",
    "the quick brown fox",
    "a model that answers questions about adapters and bases",
    "one base, many adapters",
    "ship the small adapter alongside the public base; everyone downloads the base once",
    "tokens",
]
# name -> make_lora parameters; the first four are the correctness adapters.
ADAPTERS = {
    "team-a/a": dict(seed=11),
    "team-a/b": dict(seed=12, r=16, alpha=8),
    "team-b/c": dict(seed=13, targets=("q_proj", "k_proj", "v_proj", "o_proj")),
    "team-a/d": dict(seed=14, targets=("gate_proj", "up_proj", "down_proj"), r=4),
}


class Served:
    def __init__(self, gateway: GatewayProcess, registry: Registry, home: Path, adapters: dict):
        self.gateway = gateway
        self.registry = registry
        self.home = home
        self.adapters = adapters  # name -> local folder
        self.url = gateway.url

    def client(self, key: str = ADMIN_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=300)

    def async_client(self, key: str = ADMIN_KEY) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=300
        )

    def post(self, path: str, key: str | None = ADMIN_KEY, **kwargs) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.post(f"{self.url}{path}", headers=headers, timeout=300, **kwargs)

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics").text


def metric(text: str, name: str, **labels) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


@pytest.fixture(scope="module")
def served(tiny_base, make_lora, tmp_path_factory):
    home = tmp_path_factory.mktemp("serve-home")
    registry_url = f"file://{home / 'registry'}"
    registry = Registry.open(registry_url)
    adapters = {}
    for name, params in ADAPTERS.items():
        adapters[name] = make_lora(**params)
        registry.push(adapters[name], name, base=tiny_base)
    registry.push(make_lora(seed=21), "team-a/x", base=tiny_base, aliases=["prod"])
    registry.push(make_lora(seed=22), "team-a/x", base=tiny_base)
    registry.push(make_lora(seed=15, r=32), "team-a/wide", base=tiny_base)
    # A judge (reward model): its kind alone keeps it out of the engine.
    registry.push(make_lora(seed=16), "team-a/judge", base=tiny_base, kind="reward")
    keys = home / "keys.yaml"
    keys.write_text(f"keys:\n  {ADMIN_KEY}: '*'\n  {TEAM_A_KEY}: ['team-a/*']\n")
    gateway = GatewayProcess(
        [
            *tiny_serve_args(tiny_base, registry_url),
            "--api-keys",
            str(keys),
            "--max-loras",
            "3",
            "--max-loaded",
            "5",
            "--max-lora-rank",
            "16",
        ],
        env={"LORABAY_HOME": str(home)},
    )
    try:
        gateway.start()
        assert gateway.url, gateway.output
        yield Served(gateway, registry, home, adapters)
    finally:
        gateway.stop(signal.SIGTERM)
        gateway.kill_leftovers()


@pytest.fixture(scope="module")
def prompts(tiny_base) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    return [tokenizer(s)["input_ids"] for s in SENTENCES]


@pytest.fixture(scope="module")
def reference(served, tiny_base, prompts):
    adapters = {name: served.adapters[name] for name in ADAPTERS}
    return greedy_reference(tiny_base, adapters, prompts, NEW_TOKENS)


def complete_ids(client: openai.OpenAI, model: str, prompt: list[int]) -> list[int]:
    response = client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=NEW_TOKENS,
        temperature=0,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    return response.choices[0].model_extra["token_ids"]


# -- starting ----------------------------------------------------------------------------


def test_logs_one_line_per_stage(served):
    text = served.gateway.output
    for stage in ("engine starting", "engine ready in", "gateway listening on http://127.0.0.1:"):
        assert stage in text, text


def test_health_and_ready(served):
    assert httpx.get(f"{served.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{served.url}/ready").status_code == 200


def test_engine_listens_on_loopback_only_and_wants_the_gateways_token(served):
    engine = served.gateway.engine_process()
    listening = [
        c.laddr
        for p in [engine, *engine.children(recursive=True)]
        for c in p.net_connections(kind="inet")
        if c.status == "LISTEN"
    ]
    assert listening and all(address.ip == "127.0.0.1" for address in listening)
    command = engine.cmdline()
    engine_url = f"http://127.0.0.1:{command[command.index('--port') + 1]}"
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 1}
    assert httpx.post(f"{engine_url}/v1/completions", json=body).status_code == 401
    load = {"lora_name": "mine", "lora_path": "/etc"}
    assert httpx.post(f"{engine_url}/v1/load_lora_adapter", json=load).status_code == 401


# -- the OpenAI surface ----------------------------------------------------------------


def test_models_lists_what_the_key_may_use_with_versions_digests_aliases(served):
    ids = {m.id: m for m in served.client().models.list().data}
    assert "tiny" in ids
    for name in ADAPTERS:
        assert f"{name}:1" in ids
    x1 = ids["team-a/x:1"].model_extra
    assert x1["version"] == 1 and x1["aliases"] == ["prod"]
    assert x1["digest"] == served.registry.resolve("team-a/x:1").digest
    assert ids["team-a/x:2"].model_extra["aliases"] == ["latest"]
    assert "team-a/wide:1" not in ids  # rank 32 does not fit --max-lora-rank 16
    assert "team-a/judge:1" not in ids  # a reward model generates nothing

    team = {m.id for m in served.client(TEAM_A_KEY).models.list().data}
    assert "tiny" in team and "team-a/a:1" in team
    assert not any(i.startswith("team-b/") for i in team)


def test_chat_and_completions_with_and_without_streaming(served):
    client = served.client()
    messages = [{"role": "user", "content": "hello"}]
    chat = client.chat.completions.create(
        model="team-a/a", messages=messages, max_tokens=8, temperature=0
    )
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens == 8
    # The engine name carries the digest: the answer says which content served it.
    assert chat.model == f"team-a/a@{served.registry.resolve('team-a/a').digest}"

    chunks = list(
        client.chat.completions.create(
            model="team-a/a", messages=messages, max_tokens=8, temperature=0, stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert all(c.usage is None for c in chunks)  # the gateway's own usage event is dropped

    stream = client.completions.create(
        model="tiny",
        prompt="one base",
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 6  # asked for: passed through


# -- correctness -------------------------------------------------------------------------


def test_greedy_ids_equal_peft_one_request_at_a_time(served, prompts, reference):
    client = served.client()
    for model, adapter in [("tiny", None)] + [(name, name) for name in ADAPTERS]:
        for prompt, expected in zip(prompts, reference[adapter], strict=True):
            assert complete_ids(client, model, prompt) == expected, (model, prompt)


def test_greedy_ids_equal_peft_under_concurrent_interleaved_requests(served, prompts, reference):
    jobs = [
        (model, adapter, index)
        for model, adapter in [("tiny", None)] + [(name, name) for name in ADAPTERS]
        for index in range(len(prompts))
        for _ in range(4)
    ]
    random.Random(0).shuffle(jobs)
    assert len(jobs) >= 100

    async def run_all():
        client = served.async_client()
        semaphore = asyncio.Semaphore(128)

        async def one(model, index):
            async with semaphore:
                response = await client.completions.create(
                    model=model,
                    prompt=prompts[index],
                    max_tokens=NEW_TOKENS,
                    temperature=0,
                    extra_body={"return_token_ids": True, "ignore_eos": True},
                )
                return response.choices[0].model_extra["token_ids"]

        try:
            return await asyncio.gather(*(one(model, index) for model, _, index in jobs))
        finally:
            await client.close()

    results = asyncio.run(run_all())
    wrong = [
        (model, index)
        for (model, adapter, index), ids in zip(jobs, results, strict=True)
        if ids != reference[adapter][index]
    ]
    assert not wrong, f"{len(wrong)} of {len(jobs)} differ from PEFT: {wrong[:5]}"


# -- the registry behind it --------------------------------------------------------------


def test_twenty_concurrent_first_requests_pull_once_and_load_once(served, make_lora, tiny_base):
    served.registry.push(make_lora(seed=31), "team-a/fresh", base=tiny_base)
    before = served.metrics()
    fetches = metric(before, "lorabay_registry_fetches")

    async def run_all():
        client = served.async_client()
        try:
            return await asyncio.gather(
                *(
                    client.completions.create(model="team-a/fresh", prompt="hi", max_tokens=2)
                    for _ in range(20)
                )
            )
        finally:
            await client.close()

    results = asyncio.run(run_all())
    assert len(results) == 20
    after = served.metrics()
    assert metric(after, "lorabay_adapter_loads_total", adapter="team-a/fresh") == 1
    assert metric(after, "lorabay_registry_fetches") == fetches + 1
    assert metric(after, "lorabay_adapter_load_seconds_count", adapter="team-a/fresh") == 1


def test_moving_an_alias_takes_effect_within_two_seconds(served):
    client = served.client()
    v1, v2 = (f"team-a/x@{served.registry.resolve(f'team-a/x:{v}').digest}" for v in (1, 2))
    first = client.completions.create(model="team-a/x:prod", prompt="hi", max_tokens=2)
    assert first.model == v1
    served.registry.set_alias("team-a/x", "prod", 2)
    moved = time.monotonic()
    answers = []  # (seconds after the move the request was sent, the content that served it)
    while len(answers) < 60 and [m for _, m in answers].count(v2) < 3:
        sent = time.monotonic() - moved
        answers.append(
            (
                sent,
                client.completions.create(model="team-a/x:prod", prompt="hi", max_tokens=2).model,
            )
        )
    served_by = [m for _, m in answers]
    assert set(served_by) <= {v1, v2}
    switch = served_by.index(v2)
    assert served_by[switch:] == [v2] * (len(served_by) - switch)  # never back to v1
    assert answers[switch][0] < 2.0, answers  # sent within 2 s of the move, answered by v2


def test_least_recently_used_adapters_are_unloaded_past_max_loaded(served):
    client = served.client()
    for name in [*ADAPTERS, "team-a/x:1", "team-a/x:2", "team-a/fresh", "team-a/a"]:
        client.completions.create(model=name, prompt="hi", max_tokens=1)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        text = served.metrics()
        if metric(text, "lorabay_adapters_loaded") <= 5:
            break
        time.sleep(0.1)
    assert metric(text, "lorabay_adapters_loaded") <= 5
    assert metric(text, "lorabay_adapter_unloads_total") >= 2
    # The most recently used one is still loaded: a cache hit, not a load.
    loads = metric(text, "lorabay_adapter_loads_total", adapter="team-a/a")
    client.completions.create(model="team-a/a", prompt="hi", max_tokens=1)
    assert metric(served.metrics(), "lorabay_adapter_loads_total", adapter="team-a/a") == loads


# -- refusals ----------------------------------------------------------------------------


def test_incompatible_adapter_is_refused_with_the_reason(served):
    with pytest.raises(openai.BadRequestError) as caught:
        served.client().completions.create(model="team-a/wide", prompt="hi", max_tokens=1)
    error = caught.value.body
    assert error["code"] == "incompatible_adapter"
    assert "rank" in error["message"] and "32" in error["message"]

    with pytest.raises(openai.BadRequestError) as caught:
        served.client().completions.create(model="team-a/judge", prompt="hi", max_tokens=1)
    assert caught.value.body["code"] == "incompatible_adapter"
    assert "kind 'reward'" in caught.value.body["message"]


def test_unknown_reference_is_404_naming_it(served):
    with pytest.raises(openai.NotFoundError) as caught:
        served.client().completions.create(model="team-a/nothing:7", prompt="hi", max_tokens=1)
    assert caught.value.body["code"] == "model_not_found"
    assert "team-a/nothing:7" in caught.value.body["message"]


def test_keys_401_and_forbidden_names_look_missing(served):
    for key in (None, "sk-wrong-0000"):
        response = served.post(
            "/v1/completions", key=key, json={"model": "tiny", "prompt": "hi", "max_tokens": 1}
        )
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        served.client("sk-wrong-0000").models.list()

    def ask(model: str) -> httpx.Response:
        body = {"model": model, "prompt": "hi", "max_tokens": 1}
        return served.post("/v1/completions", key=TEAM_A_KEY, json=body)

    forbidden, missing = ask("team-b/c"), ask("team-b/zzz")  # c exists; the key may not use it
    assert forbidden.status_code == missing.status_code == 404
    shown = forbidden.json()["error"] | {"message": None}
    assert shown == missing.json()["error"] | {"message": None}
    assert forbidden.json()["error"]["message"].replace("team-b/c", "X") == missing.json()["error"][
        "message"
    ].replace("team-b/zzz", "X")
    assert ask("team-a/a").status_code == 200


def test_bad_requests_get_400_and_the_gateway_keeps_serving(served):
    cases = [
        dict(content=b'{"model": "tiny", "prompt": '),
        dict(content=b"[1, 2, 3]"),
        dict(json={"model": "tiny", "prompt": "hi", "max_tokens": "ten"}),
        dict(json={"model": "tiny", "prompt": "hi", "temperature": "hot"}),
        dict(json={"model": "tiny", "prompt": "hi", "max_tokens": 0}),
        dict(json={"model": "tiny", "prompt": "hi", "max_tokens": 5000}),  # context is 1024
        dict(json={"model": "tiny", "prompt": [5] * 1100, "max_tokens": 10}),  # the engine
        dict(json={"model": "tiny", "prompt": "x" * (5 * 1024 * 1024)}),  # over 4 MiB
        dict(json={"model": "team-a/a", "prompt": "hi", "logprobs": "yes"}),
        dict(json={"model": "tiny"}),
    ]
    for case in cases:
        response = served.post("/v1/completions", **case)
        assert response.status_code in (400, 422), (case, response.text[:200])
        error = response.json()["error"]
        assert error["message"] and error["type"] == "invalid_request_error"
    chat = served.post("/v1/chat/completions", json={"model": "tiny", "messages": "hi"})
    assert chat.status_code == 400
    ok = served.client().completions.create(model="tiny", prompt="still here", max_tokens=2)
    assert ok.usage.completion_tokens == 2


def test_a_corrupted_adapter_fails_only_its_own_requests(served, make_lora, tiny_base):
    manifest = served.registry.push(make_lora(seed=41), "team-a/corrupt", base=tiny_base)
    weights = next(f for f in manifest.files if f["path"].endswith(".safetensors"))
    blob = served.home / "registry" / "blobs" / "sha256" / weights["sha256"]
    assert blob.is_file()
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[-100:] = bytes(100)
    blob.write_bytes(bytes(data))

    results = {}

    def ask(model):
        try:
            served.client().completions.create(model=model, prompt="hi", max_tokens=2)
            results[model] = 200
        except openai.APIStatusError as error:
            results[model] = (error.status_code, error.body.get("code"))

    threads = [threading.Thread(target=ask, args=(m,)) for m in ("team-a/corrupt", "team-a/b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results["team-a/b"] == 200
    assert results["team-a/corrupt"] == (502, "adapter_corrupted")
    assert served.client().completions.create(model="tiny", prompt="hi", max_tokens=1)


def test_metrics_are_labelled_by_adapter_name_and_version(served):
    text = served.metrics()
    assert metric(text, "lorabay_requests_total", adapter="team-a/a", version="1") > 0
    assert metric(text, "lorabay_requests_total", adapter="tiny", version="base") > 0
    assert metric(text, "lorabay_generated_tokens_total", adapter="team-a/a", version="1") > 0
    assert metric(text, "lorabay_prompt_tokens_total", adapter="team-a/a", version="1") > 0
    assert metric(text, "lorabay_request_latency_seconds_count", adapter="team-a/a") > 0
    assert metric(text, "lorabay_time_to_first_token_seconds_count", adapter="team-a/a") > 0
    assert metric(text, "lorabay_adapter_cache_hits_total", adapter="team-a/a") > 0
    assert metric(text, "lorabay_request_errors_total", code="adapter_corrupted") > 0
    assert metric(text, "lorabay_request_errors_total", adapter="", version="") > 0
    # Every request so far ended (answers, refusals, streams, a client that left early).
    assert metric(text, "lorabay_requests_in_flight") == 0


# -- failures of the engine, and stopping ------------------------------------------------


def test_engine_death_gives_503_in_flight_then_the_engine_is_restarted(served, prompts, reference):
    engine = served.gateway.engine_process()
    served.gateway.remember_descendants()
    old_group = [p for p in served.gateway._seen.values() if p.is_running()]
    outcomes: list = []

    def long_request():
        try:
            served.client().completions.create(
                model="team-a/a",
                prompt="hi",
                max_tokens=1000,
                extra_body={"ignore_eos": True},
            )
            outcomes.append(200)
        except openai.APIStatusError as error:
            outcomes.append(error.status_code)

    # Freeze the engine first, so none of the three can finish before the kill (on a quiet
    # machine the tiny base writes 1000 tokens in a fraction of a second): all three are
    # then in flight, waiting on the engine, when it dies.
    engine.send_signal(signal.SIGSTOP)
    threads = [threading.Thread(target=long_request) for _ in range(3)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while metric(served.metrics(), "lorabay_requests_in_flight") < 3:
        assert time.monotonic() < deadline, outcomes
        time.sleep(0.01)
    time.sleep(0.2)  # the gateway has sent them on to the engine
    engine.send_signal(signal.SIGKILL)
    for thread in threads:
        thread.join(60)
    assert outcomes == [503, 503, 503]
    assert wait_gone(old_group) == []  # the dead engine's children went with it

    response = served.post("/v1/completions", json={"model": "tiny", "prompt": "hi"})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "engine_unavailable"

    deadline = time.monotonic() + 400
    while httpx.get(f"{served.url}/ready").status_code != 200:
        assert time.monotonic() < deadline, served.gateway.output[-3000:]
        time.sleep(1)
    client = served.client()
    assert complete_ids(client, "team-a/a", prompts[1]) == reference["team-a/a"][1]
    assert complete_ids(client, "tiny", prompts[1]) == reference[None][1]
    assert metric(served.metrics(), "lorabay_engine_restarts_total") == 1


def test_sigterm_stops_the_gateway_and_every_engine_process(served):
    served.gateway.remember_descendants()
    assert served.gateway.stop(signal.SIGTERM) == 0
    assert wait_gone(served.gateway.leftovers()) == []
    assert "stopped" in served.gateway.output.splitlines()[-1]
