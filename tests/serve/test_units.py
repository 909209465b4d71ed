"""Gateway logic that needs no engine: keys, request validation, options, engine errors."""

from __future__ import annotations

import json

import pytest

from lorabay.hub.compat import read_base_shapes
from lorabay.hub.errors import ConfigError
from lorabay.serve.engine import (
    EngineConfig,
    build_engine_command,
    build_engine_env,
    summarize_engine_failure,
)
from lorabay.serve.errors import InvalidRequest, Unauthorized
from lorabay.serve.generate import relay_events
from lorabay.serve.keys import load_api_keys, parse_api_keys
from lorabay.serve.options import ServeOptions, check_options, is_loopback
from lorabay.serve.validate import CHAT, COMPLETIONS, parse_request

# -- API keys --------------------------------------------------------------------------


def test_keys_map_to_name_patterns(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text("keys:\n  sk-team-a-123: ['team-a/*']\n  sk-admin-4567: '*'\n")
    keys = load_api_keys(path)
    team = keys.authenticate("Bearer sk-team-a-123")
    assert team.allows("team-a/summarize")
    assert not team.allows("team-b/summarize")
    assert not team.allows("team-a")  # the pattern names the namespace's adapters
    assert keys.authenticate("bearer sk-admin-4567").allows("anything/at-all")


def test_json_key_file_without_wrapper(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"sk-abcdefgh": ["x", "y/*"]}))
    grant = load_api_keys(path).authenticate("Bearer sk-abcdefgh")
    assert grant.allows("x") and grant.allows("y/z") and not grant.allows("xy")


@pytest.mark.parametrize("header", [None, "", "Bearer", "Basic sk-team-a-123", "Bearer nope-nope"])
def test_missing_or_bad_keys_are_401(header):
    keys = parse_api_keys({"sk-team-a-123": ["team-a/*"]})
    with pytest.raises(Unauthorized) as caught:
        keys.authenticate(header)
    assert caught.value.http_status == 401


def test_key_file_problems_are_reported_together():
    with pytest.raises(ConfigError) as caught:
        parse_api_keys({"short": ["a"], "sk-long-enough": [""], "sk-also-long": [3]})
    assert len(caught.value.problems) == 3
    assert "short" not in str(caught.value)  # keys are never echoed whole


# -- request validation ----------------------------------------------------------------


def body(**fields) -> bytes:
    return json.dumps({"model": "m", "prompt": "hi", **fields}).encode()


def test_valid_requests_pass_through_unchanged():
    parsed = parse_request(body(max_tokens=8, stream=True, vendor_extra={"a": 1}), COMPLETIONS, 64)
    assert parsed["vendor_extra"] == {"a": 1}
    chat = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    assert parse_request(chat, CHAT, None)["messages"][0]["role"] == "user"
    assert parse_request(body(prompt=[1, 2, 3]), COMPLETIONS, None)["prompt"] == [1, 2, 3]


@pytest.mark.parametrize(
    "raw, param",
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b"\xff\xfe", None),
        (json.dumps({"prompt": "hi"}).encode(), "model"),
        (json.dumps({"model": "m"}).encode(), "prompt"),
        (body(max_tokens=0), "max_tokens"),
        (body(max_tokens=-3), "max_tokens"),
        (body(max_tokens=65), "max_tokens"),  # beyond the context of 64
        (body(max_tokens="8"), "max_tokens"),
        (body(max_tokens=True), "max_tokens"),
        (body(stream="yes"), "stream"),
        (body(temperature="hot"), "temperature"),
        (body(n=0), "n"),
        (body(stop=[1]), "stop"),
        (body(model=7), "model"),
        (body(prompt=[]), "prompt"),
        (body(prompt={"a": 1}), "prompt"),
    ],
)
def test_bad_requests_are_400_with_the_field_named(raw, param):
    with pytest.raises(InvalidRequest) as caught:
        parse_request(raw, COMPLETIONS, 64)
    assert caught.value.http_status == 400
    assert caught.value.param == param


def test_chat_needs_messages_with_roles():
    for messages in ([], [{"content": "hi"}], "hi"):
        raw = json.dumps({"model": "m", "messages": messages}).encode()
        with pytest.raises(InvalidRequest):
            parse_request(raw, CHAT, None)


# -- options ---------------------------------------------------------------------------


def test_non_loopback_bind_needs_keys_or_insecure(tiny_base, tmp_path):
    keys = tmp_path / "keys.yaml"
    keys.write_text("sk-abcdefgh: '*'\n")
    with pytest.raises(ConfigError, match="--api-keys"):
        check_options(ServeOptions(base=str(tiny_base), host="0.0.0.0"))
    check_options(ServeOptions(base=str(tiny_base), host="0.0.0.0", api_keys=str(keys)))
    check_options(ServeOptions(base=str(tiny_base), host="0.0.0.0", insecure=True))
    check_options(ServeOptions(base=str(tiny_base), host="localhost"))
    assert is_loopback("127.0.0.1") and is_loopback("::1") and not is_loopback("0.0.0.0")


def test_option_problems_are_reported_together(tmp_path):
    options = ServeOptions(
        base=str(tmp_path / "missing"),
        quantization="nf4",
        dtype="float32",
        host="0.0.0.0",
        max_loras=8,
        max_cpu_loras=2,
    )
    with pytest.raises(ConfigError) as caught:
        check_options(options)
    assert len(caught.value.problems) == 4


def test_engine_command_is_a_private_socket_with_runtime_lora(tiny_base):
    options = ServeOptions(base=str(tiny_base), quantization="nf4", max_loras=4, max_loaded=12)
    command = build_engine_command(EngineConfig.from_options(options), "/run/x/engine.sock")
    joined = " ".join(command)
    assert "vllm.entrypoints.openai.api_server" in joined
    assert "--uds /run/x/engine.sock" in joined
    assert "--host" not in command and "--port" not in command
    assert "--middleware lorabay.serve.engine_guard.EngineGuard" in joined
    assert "--enable-lora" in command
    assert "--quantization bitsandbytes" in joined
    assert "--dtype bfloat16" in joined  # NF4 in vLLM needs 16-bit activations
    assert "--max-cpu-loras 12" in joined  # max(max_loras, max_loaded)
    assert "--max-lora-rank 16" in joined


def test_auto_dtype_computes_a_bf16_base_in_float32_where_the_cpu_emulates_bf16(
    tiny_base, tmp_path, monkeypatch
):
    bf16 = tmp_path / "bf16-base"
    bf16.mkdir()
    config = json.loads((tiny_base / "config.json").read_text())
    (bf16 / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    monkeypatch.setattr("lorabay.serve.options.cpu_engine", lambda: True)
    emulated = [True]
    monkeypatch.setattr("lorabay.serve.options.bf16_is_emulated", lambda: emulated[0])

    options = ServeOptions(base=str(bf16))  # an AVX2-only CPU
    assert options.engine_dtype == "float32"
    assert "no bfloat16 arithmetic" in options.describe_dtype()
    command = build_engine_command(EngineConfig.from_options(options), "/run/x/engine.sock")
    assert "--dtype float32" in " ".join(command)
    assert ServeOptions(base=str(bf16), dtype="bfloat16").engine_dtype == "bfloat16"  # given
    assert ServeOptions(base=str(bf16), quantization="nf4").engine_dtype == "bfloat16"
    assert ServeOptions(base=str(tiny_base)).engine_dtype == "auto"  # a float32 base
    emulated[0] = False  # AVX512-BF16 or AMX
    assert ServeOptions(base=str(bf16)).engine_dtype == "auto"


def test_cpu_flags_tell_native_bf16_from_emulated(tmp_path, monkeypatch):
    from lorabay.hub import machine

    def flags_of(text: str):
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(text)
        monkeypatch.setattr(machine, "CPUINFO", cpuinfo)
        machine.cpu_flags.cache_clear()
        return machine.bf16_is_emulated()

    try:
        assert flags_of("processor\t: 0\nflags\t\t: fpu sse avx avx2 fma\n")  # AVX2 EPYC
        assert not flags_of("flags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
        assert not flags_of("Features\t: fp asimd bf16 i8mm\n")  # arm64 with BF16
        assert not flags_of("model name\t: unknown\n")  # no flags line: unknown, as before
        monkeypatch.setattr(machine, "CPUINFO", tmp_path / "absent")
        machine.cpu_flags.cache_clear()
        assert not machine.bf16_is_emulated()
    finally:
        machine.cpu_flags.cache_clear()


def test_adapter_counts_are_sized_from_memory_unless_given(tiny_base, monkeypatch):
    options = ServeOptions(base=str(tiny_base))
    size = options.adapter_bytes  # rank 16 on every linear module of the tiny base
    config = json.loads((tiny_base / "config.json").read_text())
    hidden, inner, layers = (
        config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers")
    )
    assert size and size % (16 * 4) == 0 and size > 16 * 4 * layers * (hidden + inner)
    # Counted from the base's own weights: rank 16 on every decoder linear layer, float32.
    weights = read_base_shapes(tiny_base)
    linear = [shape for name, shape in weights.items() if name.endswith("_proj.weight")]
    assert len(linear) == 7 * layers and size == sum(16 * (o + i) * 4 for o, i in linear)
    monkeypatch.setattr(ServeOptions, "memory", property(lambda self: 200 * size))
    assert (options.batch_loras, options.loaded_limit, options.cpu_loras) == (10, 20, 20)
    monkeypatch.setattr(ServeOptions, "memory", property(lambda self: 10**6 * size))
    assert (options.batch_loras, options.loaded_limit) == (32, 1024)  # the caps
    assert "32 per batch (sized, --max-loras to set), 1024 loaded" in (
        options.describe_adapter_sizes()
    )
    given = ServeOptions(base=str(tiny_base), max_loras=3, max_loaded=7)
    assert (given.batch_loras, given.loaded_limit) == (3, 7)
    capped = ServeOptions(base=str(tiny_base), max_cpu_loras=5, max_num_seqs=64)
    assert capped.batch_loras == 5  # a sized batch never exceeds --max-cpu-loras
    check_options(capped)
    hub_id = ServeOptions(base="HuggingFaceTB/SmolLM2-135M-Instruct")  # no config here
    assert (hub_id.batch_loras, hub_id.loaded_limit) == (32, 128)
    command = build_engine_command(EngineConfig.from_options(options), "/run/x/engine.sock")
    assert "--max-loras 32 --max-cpu-loras 1024" in " ".join(command)


def test_memory_is_the_containers_limit_when_lower(tmp_path, monkeypatch):
    from lorabay.serve import options as serve_options

    limit = tmp_path / "memory.max"
    limit.write_text("max\n")  # cgroup v2 without a limit
    monkeypatch.setattr(serve_options, "CGROUP_LIMITS", (str(limit), str(tmp_path / "none")))
    total = serve_options.machine_memory()
    limit.write_text(f"{2**30}\n")  # a 1 GiB pod
    assert total > 2**30 and serve_options.machine_memory() == 2**30


def test_cpu_engine_gets_a_kv_cache_size_unless_one_is_given(tiny_base, monkeypatch):
    # Unsized, vLLM-CPU wants 92% of the machine's memory free and refuses to start
    # otherwise (what `lorabay demo` hit on a busy desktop).
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    config = EngineConfig.from_options(ServeOptions(base=str(tiny_base)))
    assert 1 <= int(build_engine_env(config, "t")["VLLM_CPU_KVCACHE_SPACE"]) <= 4
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "7")
    assert build_engine_env(config, "t")["VLLM_CPU_KVCACHE_SPACE"] == "7"
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    for flag in ("--kv-cache-memory-bytes=2G", "--gpu-memory-utilization=0.5"):
        sized = EngineConfig.from_options(ServeOptions(base=str(tiny_base), engine_args=(flag,)))
        assert "VLLM_CPU_KVCACHE_SPACE" not in build_engine_env(sized, "t")


# -- engine errors and streams ---------------------------------------------------------


def test_engine_failure_summary_is_the_root_cause():
    lines = [
        "(APIServer pid=1) INFO 11-27 13:42:37 [api_server.py:1] starting",
        "(Worker pid=3) ERROR 11-27 13:43:08 [multiproc_executor.py:953] Traceback (most recent call last):",
        '(Worker pid=3) ERROR 11-27 13:43:08 [multiproc_executor.py:953]   File "x.py", line 1, in f',
        "(Worker pid=3) ERROR 11-27 13:43:08 [multiproc_executor.py:953]     assert a == b",
        "(Worker pid=3) ERROR 11-27 13:43:08 [multiproc_executor.py:953] AssertionError: shapes differ",
        "Traceback (most recent call last):",
        '  File "core.py", line 9, in run',
        "RuntimeError: Engine core initialization failed. See root cause above.",
    ]
    summary = summarize_engine_failure(lines)
    assert summary.splitlines()[0] == "Traceback (most recent call last):"
    assert "AssertionError: shapes differ" in summary
    assert summary.splitlines()[-1].startswith("RuntimeError: Engine core initialization failed")
    assert "pid=" not in summary and "INFO" not in summary


def test_engine_failure_summary_without_traceback():
    lines = ["usage: api_server.py [-h]", "api_server.py: error: argument --dtype: invalid choice"]
    assert "invalid choice" in summarize_engine_failure(lines)


class FakeResponse:
    def __init__(self, chunks):
        self.chunks = chunks

    async def aiter_raw(self):
        for chunk in self.chunks:
            yield chunk


def relay(chunks, wants_usage):
    import asyncio

    seen, firsts = [], []

    async def main():
        out = []
        async for part in relay_events(
            FakeResponse(chunks), wants_usage, lambda: firsts.append(1), seen.append
        ):
            out.append(part)
        return b"".join(out)

    return asyncio.run(main()), seen, firsts


EVENTS = [
    b'data: {"choices":[{"text":"a"}]}\n\n',
    b'data: {"choices":[{"text":"b"}],"usage":null}\n\n',
    b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n',
    b"data: [DONE]\n\n",
]


def test_stream_relay_passes_bytes_and_drops_only_the_added_usage_event():
    # Split the stream at awkward places: events arrive in pieces.
    raw = b"".join(EVENTS)
    chunks = [raw[:7], raw[7:40], raw[40:41], raw[41:]]
    out, seen, firsts = relay(chunks, wants_usage=False)
    assert out == EVENTS[0] + EVENTS[1] + EVENTS[3]
    assert seen == [{"prompt_tokens": 3, "completion_tokens": 2}]
    assert firsts == [1]
    out, seen, _ = relay(chunks, wants_usage=True)
    assert out == raw


# -- the command refuses before it starts anything ---------------------------------------


def test_serve_refuses_a_public_bind_without_keys(tiny_base):
    from click.testing import CliRunner

    from lorabay.cli.main import cli

    result = CliRunner().invoke(cli, ["serve", "--base", str(tiny_base), "--host", "0.0.0.0"])
    assert result.exit_code == 1
    assert "--api-keys" in result.output and "--insecure" in result.output


def test_serve_refuses_a_taken_port_at_once(tiny_base):
    import socket

    from click.testing import CliRunner

    from lorabay.cli.main import cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli, ["serve", "--base", str(tiny_base), "--port", str(port)])
    assert result.exit_code == 1
    assert "cannot listen" in result.output


class FakePool:
    def __init__(self):
        self.released = []

    def release(self, lease):
        self.released.append(lease)


class ClosableResponse(FakeResponse):
    closed = 0

    async def aclose(self):
        self.closed += 1


def stream_through_asgi(messages_in):
    """Run a streamed answer as Starlette would, with the client's ASGI messages given."""
    import asyncio
    from types import SimpleNamespace

    from lorabay.serve.generate import RequestTimer, StreamRelay, relay_response
    from lorabay.serve.metrics import GatewayMetrics

    metrics = GatewayMetrics()
    gateway = SimpleNamespace(pool=FakePool(), supervisor=None)
    engine = ClosableResponse(EVENTS)
    sent = []

    async def main():
        incoming = list(messages_in)

        async def receive():
            if incoming:
                return incoming.pop(0)
            await asyncio.sleep(3600)  # the client stays

        async def send(message):
            sent.append(message)
            if message["type"] == "http.response.start":
                await asyncio.sleep(0.01)  # a slow socket: the disconnect is seen first

        relay = StreamRelay(gateway, engine, RequestTimer(metrics, "completions"), "lease", False)
        scope = {"type": "http", "asgi": {"spec_version": "2.3"}, "method": "POST"}
        await relay_response(relay)(scope, receive, send)

    asyncio.run(main())
    in_flight = metrics.registry.get_sample_value("lorabay_requests_in_flight")
    return gateway.pool.released, engine.closed, in_flight, sent


def test_a_stream_lets_go_of_its_lease_once_however_it_ends():
    released, closed, in_flight, sent = stream_through_asgi([])
    assert released == ["lease"] and closed == 1 and in_flight == 0
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    # The client leaves before the body starts: the generator never runs, the relay closes.
    released, closed, in_flight, _ = stream_through_asgi([{"type": "http.disconnect"}])
    assert released == ["lease"] and closed == 1 and in_flight == 0


# -- issue 14: the engine's guard, restarts, hostile bodies, streams ---------------------


def call_guard(path: str, method: str = "GET", token: str | None = "t0ken", kind: str = "http"):
    """Run one request through the real EngineGuard in front of an app that answers 200."""
    import asyncio

    from lorabay.serve.engine_guard import EngineGuard

    async def app(scope, receive, send):
        headers = [(b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    scope = {"type": kind, "method": method, "path": path, "headers": headers}
    asyncio.run(EngineGuard(app)(scope, receive, send))
    return sent[0].get("status", sent[0]["type"])


def test_engine_guard_wants_the_token_everywhere_and_serves_only_the_gateways_routes(
    monkeypatch,
):
    monkeypatch.setenv("VLLM_API_KEY", "t0ken")
    for path in ("/health", "/metrics", "/adapters", "/invocations", "/tokenize", "/ping"):
        assert call_guard(path, token=None) == 401
        assert call_guard(path, token="wrong") == 401
    assert call_guard("/health") == 200
    assert call_guard("/v1/completions", "POST") == 200
    assert call_guard("/v1/load_lora_adapter", "POST") == 200
    for method, path in [
        ("POST", "/adapters"),
        ("DELETE", "/adapters/x"),
        ("POST", "/invocations"),
        ("POST", "/generative_scoring"),
        ("POST", "/tokenize"),
        ("POST", "/scale_elastic_ep"),
        ("POST", "/v1/responses"),
        ("GET", "/v1/completions"),
    ]:
        assert call_guard(path, method) == 404, path
    assert call_guard("/v1/completions", "POST", kind="websocket") == "websocket.close"
    monkeypatch.delenv("VLLM_API_KEY")
    assert call_guard("/health", token="") == 401  # no token configured: nothing passes


def test_restart_backoff_grows_while_the_engine_keeps_failing_soon_after_start():
    from lorabay.serve.engine import RestartBackoff

    backoff = RestartBackoff(stable_seconds=60, first=1, cap=8)
    assert backoff.delay(uptime=3600) == 0  # it ran for an hour: restart at once
    assert [backoff.delay(uptime=2) for _ in range(6)] == [1, 2, 4, 8, 8, 8]
    assert backoff.delay(uptime=61) == 0  # stable again: the count starts over
    assert backoff.delay(uptime=0) == 1


def test_engine_summary_names_a_signal_death():
    lines = [
        "Fatal Python error: Illegal instruction",
        "",
        "Thread 0x1 (most recent call first):",
        '  File "threading.py", line 1, in wait',
        "Current thread 0x2 (most recent call first):",
        '  File "vllm/_custom_ops.py", line 3927 in cpu_attention_with_kv_cache',
        "Traceback (most recent call last):",
        '  File "core.py", line 9, in run',
        "RuntimeError: cancelled",
    ]
    summary = summarize_engine_failure(lines)
    assert summary.splitlines()[0] == "Fatal Python error: Illegal instruction"
    assert "cpu_attention_with_kv_cache" in summary
    # Another process's line written into the middle of faulthandler's (seen for real).
    lines[0] = "Fatal Python error: (EngineCore pid=9) ERROR 12-01 11:41:03 [x.py:1] died"
    lines.insert(1, "Illegal instruction")
    summary = summarize_engine_failure(lines)
    assert summary.splitlines()[0] == "Fatal Python error: Illegal instruction"


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 1000 + b"]" * 1000,
        b"[" * 100 + b"]" * 100,
        b'{"model": "m", "prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}",
    ],
)
def test_deep_or_huge_json_is_a_400(raw):
    with pytest.raises(InvalidRequest) as caught:
        parse_request(raw, COMPLETIONS, 64)
    assert caught.value.http_status == 400


def test_n_above_the_cap_is_a_400_naming_the_flag():
    with pytest.raises(InvalidRequest, match="--max-n") as caught:
        parse_request(body(n=17), COMPLETIONS, 64, max_n=16)
    assert caught.value.param == "n"
    assert parse_request(body(n=16), COMPLETIONS, 64, max_n=16)["n"] == 16


def test_continuous_usage_is_counted_once_from_the_last_event():
    events = [
        b'data: {"choices":[{"text":"a"}],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n',
        b'data: {"choices":[{"text":"b"}],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n',
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n',
        b"data: [DONE]\n\n",
    ]
    out, seen, _ = relay([b"".join(events)], wants_usage=True)
    assert out == b"".join(events)
    assert seen == [{"prompt_tokens": 3, "completion_tokens": 2}]


@pytest.mark.parametrize(
    "host, content_type, status",
    [
        (b"localhost:8000", b"application/json", None),
        (b"127.0.0.1:8000", b"application/json; charset=utf-8", None),
        (b"[::1]:8000", b"application/json", None),
        (b"evil.example:8000", b"application/json", 403),
        (b"localhost.evil.example", b"application/json", 403),
        (b"localhost:8000", b"text/plain", 415),
        (b"localhost:8000", b"application/x-www-form-urlencoded", 415),
    ],
)
def test_loopback_mode_wants_a_loopback_host_and_json(host, content_type, status):
    from lorabay.serve.app import LoopbackOnly

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/completions",
        "headers": [(b"host", host), (b"content-type", content_type)],
    }
    refusal = LoopbackOnly.refusal(scope)
    assert (refusal[0] if refusal else None) == status


def test_peers_need_a_secret_and_metrics_a_port_of_their_own(tiny_base, tmp_path):
    with pytest.raises(ConfigError, match="--peer-secret-file"):
        check_options(ServeOptions(base=str(tiny_base), peers="http://127.0.0.1:8001"))
    with pytest.raises(ConfigError, match="--metrics-port"):
        check_options(ServeOptions(base=str(tiny_base), port=8000, metrics_port=8000))
    check_options(ServeOptions(base=str(tiny_base), port=0, metrics_port=0))


def test_engine_args_cannot_move_the_engine_off_its_socket(tiny_base):
    for flag in ("--host=0.0.0.0", "--port=9000", "--uds=/tmp/open.sock", "--api-key=x"):
        with pytest.raises(ConfigError, match="address and token"):
            check_options(ServeOptions(base=str(tiny_base), engine_args=(flag,)))


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_cancelled_socket_wait_woken_late_logs_nothing_other_errors_still_do(loop, caplog):
    """anyio's socket wait (``add_reader(sock, future.set_result, None)``) cancelled in the
    loop turn its socket becomes readable: asyncio logged InvalidStateError with a
    traceback in the gateway's output (seen in CI's test_hostile_inputs...). The gateway's
    handler drops exactly that; any other callback error is still logged."""
    import asyncio
    import logging
    import socket
    from asyncio import InvalidStateError

    from lorabay.serve.server import ignore_cancelled_socket_waits, new_event_loop

    async def race() -> None:
        loop = asyncio.get_running_loop()
        seen = {InvalidStateError: asyncio.Event(), ZeroDivisionError: asyncio.Event()}

        def handler(loop, context) -> None:  # the gateway's, noting what reached it
            kind = type(context.get("exception"))
            if kind in seen:
                seen[kind].set()
            ignore_cancelled_socket_waits(loop, context)

        loop.set_exception_handler(handler)
        left, right = socket.socketpair()
        wait = loop.create_future()
        loop.add_reader(left, wait.set_result, None)
        right.send(b"x")  # readable at the next select
        wait.cancel()  # the request's cancel, before its done-callback removes the reader
        await asyncio.wait_for(seen[InvalidStateError].wait(), 10)  # the race happened
        loop.remove_reader(left)
        loop.call_soon(lambda: 1 / 0)  # any other error: still reported
        await asyncio.wait_for(seen[ZeroDivisionError].wait(), 10)
        left.close()
        right.close()

    factory = new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    with (
        caplog.at_level(logging.ERROR, logger="asyncio"),
        asyncio.Runner(loop_factory=factory) as runner,
    ):
        assert type(runner.get_loop()).__module__.split(".")[0] == loop
        runner.run(race())
    messages = [r.getMessage() + str(r.exc_info) for r in caplog.records]
    assert not [m for m in messages if "InvalidStateError" in m], messages
    assert [m for m in messages if "ZeroDivisionError" in m], messages


def engine_gateway(socket_path, answers_health: bool = True):
    """A Gateway whose engine is the HTTP server on ``socket_path``, no vLLM; /health
    answers 200, or 500 without ``answers_health``."""
    import httpx

    from lorabay.serve.engine import EngineSupervisor
    from lorabay.serve.gateway import Gateway

    class Supervisor:
        ready = True
        downs = 0
        headers: dict = {}
        session = EngineSupervisor.session  # the real aiohttp session, on socket_path

        def client(self, limits, timeout):
            def health(request):
                return httpx.Response(200 if answers_health else 500)

            self.limits = limits
            return httpx.AsyncClient(transport=httpx.MockTransport(health), base_url="http://e")

        def mark_down(self):
            self.downs += 1

    Supervisor.socket_path = socket_path
    return Gateway(
        supervisor=Supervisor(), resolver=None, keys=None, max_loaded=4,
        max_body_bytes=1 << 20, spill_at=8,
    )  # fmt: skip


async def unix_server(socket_path, handler):
    """An aiohttp server of ``handler`` on ``socket_path``; its runner (call cleanup)."""
    from aiohttp import web

    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.UnixSite(runner, str(socket_path)).start()
    return runner


def test_a_connection_the_engine_closed_unanswered_is_sent_again_while_the_engine_answers(
    tmp_path,
):
    import asyncio

    from aiohttp import web

    socket_path = tmp_path / "engine.sock"
    sent = []

    async def closing_first(request):
        sent.append(request.path)
        if len(sent) == 1:  # a kept-alive connection the engine was closing
            request.transport.close()
            return web.Response()
        return web.json_response({"ok": True})

    async def run(gateway):
        runner = await unix_server(socket_path, closing_first)
        try:
            response = await gateway.send("completions", {"model": "m", "prompt": "hi"})
            body = await response.aread()
            await response.aclose()
            return response.status_code, json.loads(body)
        finally:
            await gateway.close()
            await runner.cleanup()

    gateway = engine_gateway(socket_path)
    assert asyncio.run(run(gateway)) == (200, {"ok": True})
    assert sent == ["/v1/completions", "/v1/completions"] and gateway.supervisor.downs == 0

    sent.clear()  # an engine that does not answer /health either is down: no second try
    gateway = engine_gateway(socket_path, answers_health=False)
    with pytest.raises(Exception, match="the engine is not available"):
        asyncio.run(run(gateway))
    assert sent == ["/v1/completions"] and gateway.supervisor.downs == 1


def test_a_stream_closed_midway_closes_its_engine_connection_and_a_whole_one_is_reused(
    tmp_path,
):
    """Closing an answer before its end must close the connection (the engine aborts the
    generation only then); an answer read to its end leaves it for the next request."""
    import asyncio

    from aiohttp import web

    socket_path = tmp_path / "engine.sock"
    peers, closed, lost = [], asyncio.Event(), asyncio.Event()

    async def streaming(request):
        peers.append(request.transport)
        answer = web.StreamResponse()
        await answer.prepare(request)
        await answer.write(b"data: {}\n\n")
        if request.query.get("short"):
            await answer.write_eof()
            return answer
        await closed.wait()  # the gateway has closed this answer: go on generating
        try:
            while True:  # until a write finds the connection gone
                await answer.write(b"data: {}\n\n")
                await asyncio.sleep(0)
        except (ConnectionError, asyncio.CancelledError):
            lost.set()
            raise

    async def run(gateway):
        runner = await unix_server(socket_path, streaming)
        try:
            whole = await gateway.send("completions?short=1", {})
            assert [c async for c in whole.aiter_raw()]
            await whole.aclose()
            again = await gateway.send("completions", {})
            first = await anext(again.aiter_raw())
            await again.aclose()  # the client went away
            closed.set()
            await asyncio.wait_for(lost.wait(), 5)
            return first
        finally:
            await gateway.close()
            await runner.cleanup()

    assert asyncio.run(run(engine_gateway(socket_path))) == b"data: {}\n\n"
    assert len(peers) == 2 and peers[0] is peers[1]  # one connection, kept, then closed


def test_the_gateway_drops_idle_engine_connections_before_the_engine_does(tiny_base):
    from lorabay.serve.engine import EngineConfig, build_engine_env
    from lorabay.serve.gateway import ENGINE_IDLE_SECONDS

    env = build_engine_env(EngineConfig.from_options(ServeOptions(base=str(tiny_base))), "t")
    limits = engine_gateway("unused").supervisor.limits
    assert limits.keepalive_expiry == ENGINE_IDLE_SECONDS  # httpx; aiohttp gets the same
    assert ENGINE_IDLE_SECONDS < float(env["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"]) / 2


# -- connections: the header deadline and keep-alive -------------------------------------


@pytest.fixture
def bounded_server():
    """uvicorn with the gateway's protocol, a 0.5 s header deadline and a 2 s keep-alive,
    serving 200 to everything, on 127.0.0.1; its (host, port)."""
    import threading

    import uvicorn

    from lorabay.serve.server import bind_socket, bounded_protocol

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        headers = [(b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    sock = bind_socket("127.0.0.1", 0)
    config = uvicorn.Config(
        app, http=bounded_protocol(0.5), timeout_keep_alive=2, lifespan="off", log_level="error"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            threading.Event().wait(0.01)
        yield sock.getsockname()[:2]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def answer_of(conn) -> bytes:
    """One whole response (this app's: 2 bytes of body), or what came before a close."""
    data = b""
    while not (data.endswith(b"ok") or data.endswith(b"}")):
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_a_kept_alive_connection_idles_for_the_keep_alive_not_the_header_deadline(
    bounded_server,
):
    """Between requests the clock is the keep-alive: a client may send its next request
    after an idle longer than the header deadline (a pool reuses connections so); a new
    connection that sends nothing, and a request whose headers stall, get 408."""
    import socket
    import time

    with socket.create_connection(bounded_server, timeout=10) as conn:
        conn.sendall(REQUEST)
        assert answer_of(conn).startswith(b"HTTP/1.1 200")
        time.sleep(1.0)  # idle past the 0.5 s header deadline, within the 2 s keep-alive
        conn.sendall(REQUEST)
        assert answer_of(conn).startswith(b"HTTP/1.1 200")
        conn.sendall(b"GET / HTTP/1.1\r\nHost:")  # the next request starts, then stalls
        assert answer_of(conn).startswith(b"HTTP/1.1 408")
    with socket.create_connection(bounded_server, timeout=10) as conn:
        conn.sendall(REQUEST)
        assert answer_of(conn).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        assert conn.recv(65536) == b""  # idle past the keep-alive: closed, nothing said
        assert 1.5 < time.monotonic() - started < 5
    with socket.create_connection(bounded_server, timeout=10) as conn:
        assert answer_of(conn).startswith(b"HTTP/1.1 408")  # said nothing from the start
