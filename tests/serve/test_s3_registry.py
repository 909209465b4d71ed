"""Past one machine: the gateway serves from an s3:// registry that another machine pushes to.

The test process plays the trainer's machine (its own LORABAY_HOME); `lorabay serve` runs
with another LORABAY_HOME and `--registry s3://...` on the session's real S3 server
(SeaweedFS), as a gateway pod does in the Helm chart. Nothing is shared but the bucket.
"""

from __future__ import annotations

import os
import signal
import time
import uuid

import openai
import pytest
from servetools import GatewayProcess, tiny_serve_args

from lorabay.hub import Registry

pytestmark = [pytest.mark.vllm, pytest.mark.s3]


@pytest.fixture(scope="module")
def s3_served(tiny_base, make_lora, s3_server, tmp_path_factory):
    url = f"s3://{s3_server.bucket}/serve-{uuid.uuid4().hex[:8]}"
    saved = dict(os.environ)
    os.environ.update(s3_server.env())
    os.environ["LORABAY_HOME"] = str(tmp_path_factory.mktemp("trainer-home"))
    registry = Registry.open(url)
    registry.push(make_lora(seed=31), "team/x", base=tiny_base, aliases=["prod"])
    registry.push(make_lora(seed=32), "team/x", base=tiny_base)
    gateway = GatewayProcess(
        [*tiny_serve_args(tiny_base, url), "--max-loras", "2"],
        env={**s3_server.env(), "LORABAY_HOME": str(tmp_path_factory.mktemp("pod-home"))},
    )
    try:
        gateway.start()
        assert gateway.url, gateway.output
        yield gateway, registry
    finally:
        gateway.stop(signal.SIGTERM)
        gateway.kill_leftovers()
        os.environ.clear()
        os.environ.update(saved)


def served_by(gateway: GatewayProcess, model: str) -> str:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="-", max_retries=0, timeout=300)
    return client.completions.create(model=model, prompt="hi", max_tokens=2).model


def first_served_within(gateway, model: str, wanted: str, seconds: float) -> float:
    """Seconds after now at which a request for ``model`` was answered by ``wanted``."""
    start = time.monotonic()
    while time.monotonic() - start < seconds + 5:
        sent = time.monotonic() - start
        if served_by(gateway, model) == wanted:
            return sent
    raise AssertionError(f"{model} never served by {wanted}")


def test_a_gateway_serves_what_another_machine_pushes_and_moves(s3_served, tiny_base, make_lora):
    gateway, registry = s3_served
    v1, v2 = (f"team/x@{registry.resolve(f'team/x:{v}').digest}" for v in (1, 2))
    assert served_by(gateway, "team/x:prod") == v1
    assert served_by(gateway, "team/x") == v2

    registry.set_alias("team/x", "prod", 2)  # from the trainer's machine
    assert first_served_within(gateway, "team/x:prod", v2, 2.0) < 2.0

    registry.push(make_lora(seed=33), "team/x", base=tiny_base)  # a new latest
    v3 = registry.resolve("team/x:3")
    assert first_served_within(gateway, "team/x", f"team/x@{v3.digest}", 2.0) < 2.0

    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="-", max_retries=0)
    cards = {m.id: m.model_extra for m in client.models.list().data}
    assert cards["team/x:2"]["aliases"] == ["prod"]
    assert cards["team/x:3"]["aliases"] == ["latest"]
