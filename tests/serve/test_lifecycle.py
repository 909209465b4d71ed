"""`lorabay serve` as a process: NF4 serving, signals, an engine that cannot start.

Each test starts its own server; every process it starts is checked gone at the end.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest
from servetools import GatewayProcess, wait_gone

from lorabay.hub import Registry

pytestmark = pytest.mark.vllm


def assert_nothing_left(gateway: GatewayProcess) -> None:
    left = wait_gone(gateway.leftovers())
    names = gateway.kill_leftovers()
    assert not left, f"processes outlived the gateway: {names}"


def test_nf4_base_and_adapter_then_sigint_stops_everything(tiny_base, make_lora, tmp_path):
    registry_url = f"file://{tmp_path / 'registry'}"
    Registry.open(registry_url).push(make_lora(seed=5), "team/nf4", base=tiny_base)
    gateway = GatewayProcess(
        [
            "--base",
            str(tiny_base),
            "--quantization",
            "nf4",
            "--registry",
            registry_url,
            "--port",
            "0",
            "--json-logs",
        ],
        env={"LORABAY_HOME": str(tmp_path / "home")},
    )
    try:
        gateway.start()
        assert gateway.url, gateway.output
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="none", max_retries=0)
        for model in ("tiny", "team/nf4"):
            answer = client.completions.create(
                model=model, prompt="hello", max_tokens=4, extra_body={"ignore_eos": True}
            )
            assert answer.usage.completion_tokens == 4
        assert '"message": "gateway listening on http://127.0.0.1:' in gateway.output
        gateway.remember_descendants()
        assert gateway.stop(signal.SIGINT) == 0
        assert_nothing_left(gateway)
    finally:
        gateway.stop(signal.SIGKILL)
        gateway.kill_leftovers()


def test_engine_that_cannot_start_ends_the_command_with_its_error(tiny_base, tmp_path):
    broken = tmp_path / "broken-base"
    shutil.copytree(tiny_base, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    gateway = GatewayProcess(
        ["--base", str(broken), "--port", "0"], env={"LORABAY_HOME": str(tmp_path / "home")}
    )
    try:
        gateway.start()
        assert gateway.url is None
        assert gateway.process.wait(30) == 1
        output = gateway.output
        assert "Error: the vLLM engine exited with code" in output
        assert "Traceback (most recent call last):" in output  # the engine's own error
        assert "safetensor" in output.lower()
        assert_nothing_left(gateway)
    finally:
        gateway.stop(signal.SIGKILL)
        gateway.kill_leftovers()


def test_sigterm_while_the_engine_starts_leaves_nothing(tiny_base, tmp_path):
    gateway = GatewayProcess(
        ["--base", str(tiny_base), "--port", "0"], env={"LORABAY_HOME": str(tmp_path / "home")}
    )
    try:
        gateway.launch()  # and stop it once the engine process exists, long before ready
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            gateway.remember_descendants()
            if len(gateway._seen) >= 2:  # the server and its engine core
                break
            time.sleep(0.2)
        assert len(gateway._seen) >= 2, gateway.output
        assert gateway.stop(signal.SIGTERM, timeout=60) == 0
        assert "engine ready" not in gateway.output
        assert_nothing_left(gateway)
    finally:
        gateway.stop(signal.SIGKILL)
        gateway.kill_leftovers()


# -- issue 14 ---------------------------------------------------------------------------


def engine_log_text(gateway: GatewayProcess) -> str:
    return Path(re.search(r"\(log: (\S+)\)", gateway.output).group(1)).read_text()


def test_the_default_dtype_serves_the_tiny_base_and_loopback_mode_wants_localhost_and_json(
    tiny_base, make_lora, tmp_path
):
    """No --dtype (vLLM's auto: bfloat16 on a CPU that has it) on the float32 tiny base: the
    engine's first generation used to kill its worker (AMX without the kernel's permission,
    serve/vllm_plugin.py). No --api-keys on loopback: only localhost, only JSON."""
    registry_url = f"file://{tmp_path / 'registry'}"
    Registry.open(registry_url).push(make_lora(seed=5), "team/a", base=tiny_base)
    gateway = GatewayProcess(
        ["--base", str(tiny_base), "--served-name", "tiny", "--registry", registry_url]
        + ["--port", "0"],
        env={"LORABAY_HOME": str(tmp_path / "home")},
    )
    try:
        gateway.start()
        assert gateway.url, gateway.output
        assert "self-test: 1 token in" in gateway.output
        url = f"{gateway.url}/v1/completions"
        for model in ("tiny", "team/a"):
            body = {"model": model, "prompt": "hello", "max_tokens": 4, "ignore_eos": True}
            answer = httpx.post(url, json=body, timeout=120)
            assert answer.status_code == 200, answer.text
            assert answer.json()["usage"]["completion_tokens"] == 4
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 1}
        rebound = httpx.post(url, json=body, headers={"Host": "evil.example:8000"})
        assert rebound.status_code == 403 and rebound.json()["error"]["code"] == "forbidden_host"
        listing = httpx.get(f"{gateway.url}/v1/models", headers={"Host": "evil.example"})
        assert listing.status_code == 403
        form = httpx.post(url, content=json.dumps(body), headers={"Content-Type": "text/plain"})
        assert form.status_code == 415
        port = gateway.url.rsplit(":", 1)[1]
        local = httpx.post(url, json=body, headers={"Host": f"localhost:{port}"}, timeout=60)
        assert local.status_code == 200
        assert httpx.get(f"{gateway.url}/health", headers={"Host": "evil.example"}).is_success
        assert gateway.stop(signal.SIGTERM) == 0
        assert_nothing_left(gateway)
    finally:
        gateway.stop(signal.SIGKILL)
        gateway.kill_leftovers()


def test_an_engine_that_loads_but_cannot_generate_fails_serve_at_once(tiny_base, tmp_path):
    """vLLM's start-up never runs a real request; the one-token self-test does, and serve
    ends with the engine's own error (here a generation_config.json vLLM refuses to sample
    with) instead of answering every client 400 or dying on its first request."""
    broken = tmp_path / "broken-base"
    shutil.copytree(tiny_base, broken)
    (broken / "generation_config.json").write_text(json.dumps({"top_p": 5.0}))
    gateway = GatewayProcess(
        ["--base", str(broken), "--dtype", "float32", "--port", "0"],
        env={"LORABAY_HOME": str(tmp_path / "home")},
    )
    try:
        gateway.start()
        assert gateway.url is None, gateway.output
        assert gateway.process.wait(60) == 1
        output = gateway.output
        assert "self-test" in output and "top_p" in output, output[-3000:]
        assert "restarting" not in output
        assert_nothing_left(gateway)
    finally:
        gateway.stop(signal.SIGKILL)
        gateway.kill_leftovers()


def test_sigterm_right_after_the_engine_is_ready_and_a_huge_log_line_leave_nothing(
    tiny_base, tmp_path
):
    """A 90 KB engine log line (its own 'non-default args' line, here) used to kill the
    output reader (asyncio's 64 KiB line limit), after which the engine blocks on a full
    pipe; and a SIGTERM between "engine ready" and the gateway's start used to kill the
    gateway at once, orphaning the engine (its own session). Here the signal is sent the
    moment "engine ready" is read."""
    endpoints = ",".join(f"/unused/{i:05d}" for i in range(6000))  # 90 KB, harmless
    assert len(endpoints) > 64 * 1024

    def on_line(gateway: GatewayProcess, line: str) -> None:
        if "engine ready in" in line:
            gateway.remember_descendants()
            gateway.process.send_signal(signal.SIGTERM)

    gateway = GatewayProcess(
        ["--base", str(tiny_base), "--dtype", "float32", "--port", "0"]
        + ["--engine-start-timeout", "300"]
        + [f"--engine-arg=--disable-access-log-for-endpoints={endpoints}"],
        env={"LORABAY_HOME": str(tmp_path / "home")},
        on_line=on_line,
    )
    try:
        gateway.launch()
        deadline = time.monotonic() + 400
        while gateway.process.poll() is None:
            gateway.remember_descendants()
            assert time.monotonic() < deadline, gateway.output[-3000:]
            time.sleep(0.2)
        time.sleep(0.5)  # the reader thread takes the last lines
        assert gateway.process.returncode == 0, gateway.output[-3000:]
        assert "engine ready in" in gateway.output
        assert gateway.output.splitlines()[-1].endswith("stopped")
        assert_nothing_left(gateway)
        assert endpoints in engine_log_text(gateway)  # the whole line, in the engine's log
    finally:
        gateway.stop(signal.SIGKILL)
        gateway.kill_leftovers()
