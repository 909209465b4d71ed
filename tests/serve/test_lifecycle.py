"""`lorabay serve` as a process: NF4 serving, signals, an engine that cannot start.

Each test starts its own server; every process it starts is checked gone at the end.
"""

from __future__ import annotations

import shutil
import signal
import time

import openai
import pytest
from lorabay.hub import Registry
from servetools import GatewayProcess, wait_gone

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
