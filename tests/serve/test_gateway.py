"""The gateway and the real vLLM engine, through the official `openai` client.

One `lorabay serve` process (tiny base, float32, API keys on) serves the whole
module: starting vLLM costs tens of seconds. Tests run in file order; the last ones
kill the engine's core, then freeze the engine, and then stop the server with SIGTERM.

The engine is private (issue 14): tests reach it only as its own user could, through
``EngineDoor`` (the socket and token read from the engine's process), to check what it
holds; the attacks on it run as separate processes (engine_attacks.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import random
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from servetools import (
    GatewayProcess,
    greedy_reference,
    metric,
    tiny_serve_args,
    wait_gone,
)

from lorabay.hub import Registry

pytestmark = pytest.mark.vllm

ADMIN_KEY = "sk-admin-0000"
TEAM_A_KEY = "sk-team-a-0000"
JSON = {"content-type": "application/json"}
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
    def __init__(self, gateway: GatewayProcess, registry: Registry, root: Path, adapters: dict):
        self.gateway = gateway
        self.registry = registry
        self.root = root
        self.home = root / "home"  # LORABAY_HOME: the gateway creates it
        self.adapters = adapters  # name -> local folder
        self.url = gateway.url

    def client(self, key: str = ADMIN_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=300)

    def async_client(self, key: str = ADMIN_KEY) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=300
        )

    def post(self, path: str, key: str | None = ADMIN_KEY, timeout=300, **kwargs) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        headers |= kwargs.pop("headers", {})
        return httpx.post(f"{self.url}{path}", headers=headers, timeout=timeout, **kwargs)

    def metrics(self) -> str:
        return self.gateway.metrics()

    def engine_log(self) -> Path:
        return Path(re.search(r"\(log: (\S+)\)", self.gateway.output).group(1))


@pytest.fixture(scope="module")
def served(tiny_base, make_lora, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    registry_url = f"file://{root / 'registry'}"
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
    keys = root / "keys.yaml"
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
            # usage.prompt_tokens_details.cached_tokens: what the prefix cache gave a request
            "--engine-arg=--enable-prompt-tokens-details",
            # "Received request ..." in the engine log: a request reached the engine
            "--engine-arg=--enable-log-requests",
            # An adapter the gateway never loaded, in the engine from its start.
            f"--engine-arg=--lora-modules=stranger={make_lora(seed=17)}",
        ],
        env={"LORABAY_HOME": str(root / "home")},
    )
    try:
        gateway.start()
        assert gateway.url, gateway.output
        yield Served(gateway, registry, root, adapters)
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


# -- the engine is private ------------------------------------------------------------


def run_attacks(socket_path: str, token: str = "", victim: str = "", user: str | None = None):
    """engine_attacks.py as another process (as ``user``, with the system Python, which
    needs nothing but the standard library); attack -> status or error name."""
    script = (Path(__file__).parent / "engine_attacks.py").read_text()
    python = sys.executable
    extra = {}
    if user is not None:
        python = "/usr/bin/python3"
        account = pwd.getpwnam(user)
        extra = dict(user=account.pw_uid, group=account.pw_gid, extra_groups=[], cwd="/")
    result = subprocess.run(
        [python, "-", socket_path, token, victim],
        input=script,
        capture_output=True,
        text=True,
        timeout=120,
        **extra,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def can_run_as_nobody() -> bool:
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        return False
    return os.geteuid() == 0 and Path("/usr/bin/python3").exists()


GATEWAY_ROUTES = {"metrics", "load_lora_adapter", "completions", "health"}


def test_the_engine_listens_on_a_socket_in_a_private_folder_and_on_no_port(served):
    door = served.gateway.engine_door()
    folder = Path(door.socket).parent
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700, oct(folder.stat().st_mode)
    assert stat.S_ISSOCK(Path(door.socket).stat().st_mode)
    # vLLM's HTTP server has no TCP socket at all...
    server = door.process
    assert [c for c in server.net_connections(kind="inet") if c.status == "LISTEN"] == []
    # ...and its processes' own channels (ZMQ between server, engine core and worker) are
    # Unix sockets in the same folder. The worker keeps torch.distributed's gloo
    # rendezvous on 127.0.0.1 (no HTTP, nothing of the API).
    processes = [server, *server.children(recursive=True)]
    paths = {
        c.laddr
        for p in processes
        for c in p.net_connections(kind="unix")
        if isinstance(c.laddr, str) and c.laddr.startswith("/")  # bound to a path
    }
    assert door.socket in paths
    assert all(path.startswith(f"{folder}/") for path in paths), paths
    listening = [
        c.laddr.ip
        for p in processes
        for c in p.net_connections(kind="inet")
        if c.status == "LISTEN"
    ]
    assert all(ip == "127.0.0.1" for ip in listening), listening


def test_no_other_process_can_use_the_engine(served):
    door = served.gateway.engine_door()
    victim = f"team-a/a@{served.registry.resolve('team-a/a').digest}"
    if can_run_as_nobody():  # another user: the folder is closed to it
        as_nobody = run_attacks(door.socket, victim=victim, user="nobody")
        assert set(as_nobody.values()) == {"PermissionError"}, as_nobody
    # The same user without the token: every path, SageMaker's and /health included, 401.
    no_token = run_attacks(door.socket, victim=victim)
    assert set(no_token.values()) == {"401"}, no_token
    # Even with the token only the gateway's own routes exist.
    with_token = run_attacks(door.socket, door.token, victim)
    others = {name: status for name, status in with_token.items() if name not in GATEWAY_ROUTES}
    assert set(others.values()) == {"404"}, others
    assert with_token["health"] == "200"
    assert victim not in door.adapters()


def test_an_adapter_the_gateway_did_not_load_is_never_adopted(
    served, prompts, reference, tiny_base
):
    # The stranger the engine started with was unloaded when the gateway connected.
    assert "stranger" not in served.gateway.engine_door().adapters()
    assert "unloading adapter 'stranger' from the engine" in served.gateway.output
    # Someone holding the engine's token registers the very name the gateway will load
    # team-a/victim under (it contains the digest: predictable), with other weights.
    served.registry.push(served.adapters["team-a/a"], "team-a/victim", base=tiny_base)
    manifest = served.registry.resolve("team-a/victim")
    engine_name = f"team-a/victim@{manifest.digest}"
    door = served.gateway.engine_door()
    with door.client() as client:
        impostor = {"lora_name": engine_name, "lora_path": str(served.adapters["team-b/c"])}
        assert client.post("/v1/load_lora_adapter", json=impostor).status_code == 200
    # The gateway replaces it with the verified folder: team-a/a's weights answer.
    assert complete_ids(served.client(), "team-a/victim", prompts[1]) == reference["team-a/a"][1]
    assert f"holds an adapter named '{engine_name}' this gateway did not load" in (
        served.gateway.output
    )


def test_two_names_for_one_content_are_two_engine_adapters_and_the_gauge_agrees(served, tiny_base):
    served.registry.push(served.adapters["team-a/b"], "team-a/twin", base=tiny_base)
    digest = served.registry.resolve("team-a/b").digest
    client = served.client()
    for model in ("team-a/b", "team-a/twin", "team-a/b", "team-a/twin"):
        answer = client.completions.create(model=model, prompt="hi", max_tokens=1)
        assert answer.model == f"{model}@{digest}"
    door = served.gateway.engine_door()
    deadline = time.monotonic() + 10
    while True:  # unloads past --max-loaded run in the background
        held = door.adapters()
        gauge = metric(served.metrics(), "lorabay_adapters_loaded")
        if len(held) == gauge or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(held) == gauge <= 5, (held, gauge)
    assert {f"team-a/b@{digest}", f"team-a/twin@{digest}"} <= held


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
    served.registry.push(make_lora(seed=41), "team-a/corrupt", base=tiny_base)
    manifest = served.registry.resolve("team-a/corrupt")
    weights = next(f for f in manifest.files if f["path"].endswith(".safetensors"))
    blob = served.root / "registry" / "blobs" / "sha256" / weights["sha256"]
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


# -- bounded requests ------------------------------------------------------------------


def test_n_is_capped_and_the_400_says_so(served):
    response = served.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "n": 17})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "n" and "--max-n" in error["message"] and "16" in error["message"]
    assert served.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "n": 2}).is_success


def test_a_client_that_leaves_stops_its_generation(served):
    door = served.gateway.engine_door()
    generated = door.metric("vllm:generation_tokens_total")
    left = metric(served.metrics(), "lorabay_requests_total", status="499")
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 1000, "n": 8, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # not streamed: the client waits, then gives up
        served.post("/v1/completions", json=body, timeout=httpx.Timeout(10, read=0.5))
    deadline = time.monotonic() + 60
    while door.metric("vllm:num_requests_running") > 0 or (
        metric(served.metrics(), "lorabay_requests_total", status="499") == left
    ):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    # 8 x 1000 tokens were asked for; the engine stopped when the client left.
    assert door.metric("vllm:generation_tokens_total") - generated < 8 * 1000


def raw_connection(served) -> socket.socket:
    host, port = served.url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=30)


def read_until_closed(sock: socket.socket, seconds: float) -> bytes:
    sock.settimeout(seconds)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        return data + b"<still open>"
    return data


def test_idle_slow_and_stalled_connections_time_out_and_never_count_in_flight(served):
    headers = (
        "POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n"
        f"Authorization: Bearer {ADMIN_KEY}\r\nContent-Type: application/json\r\n"
    )
    idle = [raw_connection(served) for _ in range(4)]  # send nothing at all
    slow = [raw_connection(served) for _ in range(4)]  # headers that never end
    stalled = [raw_connection(served) for _ in range(4)]  # a body that never ends
    started = time.monotonic()
    for sock in slow:
        sock.sendall(headers.encode())
    for sock in stalled:
        sock.sendall((headers + "Content-Length: 1000\r\n\r\n" + '{"model": "ti').encode())
    time.sleep(1.0)
    assert metric(served.metrics(), "lorabay_requests_in_flight") == 0  # no body yet, no slot
    answers = [read_until_closed(sock, 30) for sock in idle + slow + stalled]
    assert time.monotonic() - started < 30
    for answer in answers:
        assert b"<still open>" not in answer
    for answer in answers[4:]:  # whoever sent something is told why
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"code":"request_timeout"' in answers[-1].replace(b" ", b"")
    for sock in idle + slow + stalled:
        sock.close()


def stream_chunks(served, **stream_options) -> list:
    return list(
        served.client().completions.create(
            model="tiny",
            prompt="count these",
            max_tokens=12,
            stream=True,
            stream_options=stream_options,
            extra_body={"ignore_eos": True},
        )
    )


def generated_tokens(served) -> float:
    return metric(served.metrics(), "lorabay_generated_tokens_total", adapter="tiny")


def test_usage_is_counted_once_and_the_clients_stream_options_pass_through(served):
    before = generated_tokens(served)
    chunks = stream_chunks(served, include_usage=True, continuous_usage_stats=True)
    with_usage = [c for c in chunks if c.usage is not None]
    assert len(with_usage) > 3  # asked for on every chunk: given on every chunk
    assert chunks[-1].usage.completion_tokens == 12
    assert generated_tokens(served) - before == 12  # counted once, not per chunk

    before = generated_tokens(served)
    chunks = stream_chunks(served, continuous_usage_stats=True)  # usage not asked for
    assert [c.usage for c in chunks] == [None] * len(chunks)
    assert generated_tokens(served) - before == 12


def test_hostile_inputs_get_4xx_and_never_a_500(served):
    errors = metric(served.metrics(), "lorabay_request_errors_total", code="internal_error")
    cases = [
        ("[" * 1000 + "]" * 1000, 400),  # nested 1,000 deep
        ('{"model": "tiny", "prompt": "hi", "x": ' + "[" * 5000 + "]" * 5000 + "}", 400),
        ('{"model": "tiny", "prompt": "hi", "max_tokens": ' + "9" * 5000 + "}", 400),
        (json.dumps({"model": "team-a/x:" + "1" * 5000, "prompt": "hi"}), 404),
        ('{"model": "team-a/\\ud800", "prompt": "hi"}', 404),  # a lone surrogate
        ('{"model": "tiny", "prompt": "\\udfff hi", "max_tokens": 1}', 400),
    ]
    for body, status in cases:
        response = served.post("/v1/completions", content=body.encode(), headers=JSON)
        assert response.status_code == status, (body[:60], response.text[:300])
        assert response.headers["content-type"] == "application/json"
        assert response.json()["error"]["message"]
    big = served.post("/v1/completions", json={"model": "tiny", "prompt": "x" * (5 << 20)})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"

    # A client that hangs up halfway through its upload: 499, not an internal error.
    hangups = metric(served.metrics(), "lorabay_requests_total", status="499")
    sock = raw_connection(served)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {ADMIN_KEY}\r\nContent-Length: 100000\r\n\r\n".encode()
        + b'{"model": "tiny", "prompt": "'
    )
    sock.close()
    deadline = time.monotonic() + 20
    while metric(served.metrics(), "lorabay_requests_total", status="499") == hangups:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert metric(served.metrics(), "lorabay_request_errors_total", code="internal_error") == errors
    output = served.gateway.output
    assert "Traceback" not in output, output[output.find("Traceback") - 600 :][:3000]
    assert served.client().completions.create(model="tiny", prompt="still here", max_tokens=1)


# -- what tenants can see of each other --------------------------------------------------


def test_metrics_are_served_only_on_their_own_listener(served):
    assert httpx.get(f"{served.url}/metrics").status_code == 404
    assert "lorabay_requests_total" in served.metrics()
    assert httpx.get(f"{served.gateway.metrics_url}/v1/models").status_code == 404


def cached_tokens(served, key: str, prompt: str, salt: str) -> int:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 1, "cache_salt": salt}
    response = served.post("/v1/completions", key=key, json=body)
    assert response.status_code == 200, response.text
    return response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_each_key_has_its_own_prefix_cache_whatever_salt_it_sends(served):
    prompt = " ".join(f"secret{i}" for i in range(100))  # several KV blocks
    assert cached_tokens(served, TEAM_A_KEY, prompt, "shared") == 0
    assert cached_tokens(served, TEAM_A_KEY, prompt, "shared") > 0  # A's own cache
    assert cached_tokens(served, ADMIN_KEY, prompt, "shared") == 0  # never A's, for B
    assert cached_tokens(served, TEAM_A_KEY, prompt, "another") > 0  # A's salt is A's


def test_models_retrieve_owned_by_and_a_private_home(served):
    card = served.client().models.retrieve("team-a/a:1")
    assert card.id == "team-a/a:1" and card.owned_by == "team-a"
    assert card.model_extra["digest"] == served.registry.resolve("team-a/a:1").digest
    assert served.client().models.retrieve("tiny").model_extra["kind"] == "base"
    team = served.client(TEAM_A_KEY)
    with pytest.raises(openai.NotFoundError) as forbidden:
        team.models.retrieve("team-b/c:1")  # exists; not this key's
    with pytest.raises(openai.NotFoundError) as missing:
        team.models.retrieve("team-b/zzz:1")
    assert forbidden.value.body["code"] == missing.value.body["code"] == "model_not_found"
    owners = {m.owned_by for m in served.client().models.list().data}
    assert not any("@" in owner for owner in owners), owners  # never user@host
    # LORABAY_HOME holds every pulled adapter: the gateway created it for its user alone.
    assert stat.S_IMODE(served.home.stat().st_mode) == 0o700


# -- failures of the engine, and stopping ------------------------------------------------


def wait_ready(served, seconds: float = 400) -> None:
    deadline = time.monotonic() + seconds
    while httpx.get(f"{served.url}/ready").status_code != 200:
        assert time.monotonic() < deadline, served.gateway.output[-3000:]
        time.sleep(1)


def engine_core(served):
    return next(
        p
        for p in served.gateway.engine_process().children(recursive=True)
        if "EngineCore" in p.name()
    )


RECEIVED = "Received request "  # vLLM's --enable-log-requests line, one per request


def test_engine_core_death_gives_503_in_flight_and_ready_says_so_at_once(
    served, prompts, reference
):
    log = served.engine_log()
    assert served.gateway.log_files(log) == 1
    restarts = metric(served.metrics(), "lorabay_engine_restarts_total")
    core = engine_core(served)
    served.gateway.remember_descendants()
    old_group = [p for p in served.gateway._seen.values() if p.is_running()]
    outcomes: list = []

    def long_request():
        try:
            served.client().completions.create(
                model="team-a/a", prompt="hi", max_tokens=1000, extra_body={"ignore_eos": True}
            )
            outcomes.append(200)
        except openai.APIStatusError as error:
            outcomes.append(error.status_code)

    # Freeze the engine core first, so none of the three can finish before the kill: all
    # three are then in flight, waiting on it, when it dies (its API server lives on and
    # answers them 500: the engine is down, which the gateway says with a 503).
    core.send_signal(signal.SIGSTOP)
    received = log.read_text().count(RECEIVED)
    threads = [threading.Thread(target=long_request) for _ in range(3)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while log.read_text().count(RECEIVED) < received + 3:  # the engine has all three
        assert time.monotonic() < deadline, outcomes
        time.sleep(0.01)
    core.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    for thread in threads:
        thread.join(60)
    assert outcomes == [503, 503, 503]
    while httpx.get(f"{served.url}/ready").status_code == 200:
        assert time.monotonic() - killed < 10
        time.sleep(0.05)
    assert metric(served.metrics(), "lorabay_engine_up") == 0  # the same state, the same moment
    response = served.post("/v1/completions", json={"model": "tiny", "prompt": "hi"})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "engine_unavailable"
    assert wait_gone(old_group, timeout=60) == []  # the dead engine's processes went with it

    wait_ready(served)
    assert metric(served.metrics(), "lorabay_engine_up") == 1
    client = served.client()
    assert complete_ids(client, "team-a/a", prompts[1]) == reference["team-a/a"][1]
    assert complete_ids(client, "tiny", prompts[1]) == reference[None][1]
    assert metric(served.metrics(), "lorabay_engine_restarts_total") == restarts + 1
    assert served.gateway.log_files(log) == 1  # one handle on the log, however many starts
    # The restarted engine came up with the stranger again (--lora-modules): unloaded again.
    deadline = time.monotonic() + 30
    while "stranger" in served.gateway.engine_door().adapters():
        assert time.monotonic() < deadline
        time.sleep(0.5)


def test_a_hung_engine_is_taken_out_of_service_and_restarted(served):
    restarts = metric(served.metrics(), "lorabay_engine_restarts_total")
    served.gateway.engine_process().send_signal(signal.SIGSTOP)  # answers nothing, never exits
    stopped = time.monotonic()
    while httpx.get(f"{served.url}/ready").status_code == 200:
        assert time.monotonic() - stopped < 20  # one failed health probe (5 s) takes it out
        time.sleep(0.2)
    assert metric(served.metrics(), "lorabay_engine_up") == 0
    wait_ready(served)
    assert "engine stopped answering" in served.gateway.output
    assert metric(served.metrics(), "lorabay_engine_restarts_total") == restarts + 1
    assert served.client().completions.create(model="team-a/a", prompt="hi", max_tokens=2)
    assert served.gateway.log_files(served.engine_log()) == 1


def test_sigterm_stops_the_gateway_and_every_engine_process(served):
    # The module's last test on purpose: it stops the gateway every test above shares (a
    # gateway of its own would cost another engine start).
    served.gateway.remember_descendants()
    assert served.gateway.stop(signal.SIGTERM) == 0
    assert wait_gone(served.gateway.leftovers()) == []
    assert "stopped" in served.gateway.output.splitlines()[-1]
