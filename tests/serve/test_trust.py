"""The gateway on an oci:// registry with a trust policy: adapters pushed to a real OCI
registry (Debian's docker-registry) are served by `lorabay serve --registry oci://...`
only when signed by a signer the policy allows for their name; the others are refused
with the reason, before the engine sees them, and counted.

One gateway for the module (its engine starts once). The test process plays the trainer's
machine (its own LORABAY_HOME); the gateway has another.
"""

from __future__ import annotations

import signal
import uuid

import openai
import pytest
from servetools import GatewayProcess, metric, tiny_serve_args

from lorabay.hub import Registry
from lorabay.hub.keys import signature_key
from lorabay.hub.signing import sign_version

pytestmark = [pytest.mark.vllm, pytest.mark.oci]


def write_key(folder, name: str):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private


@pytest.fixture(scope="module")
def trusted_gateway(tiny_base, make_lora, oci_server, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys")
    release, stranger = write_key(keys, "release"), write_key(keys, "stranger")
    policy = keys / "trust.yaml"
    policy.write_text(
        "keys:\n  release: release.pub\nrules:\n  - names: ['team/*']\n    signers: [release]\n"
    )

    url = oci_server.url(f"serve/t{uuid.uuid4().hex[:8]}")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORABAY_HOME", str(tmp_path_factory.mktemp("trainer-home")))
        registry = Registry.open(url)
        signed = registry.push(make_lora(seed=41), "team/signed", base=tiny_base).manifest
        key_id = sign_version(registry, signed, release).key_id
        registry.push(make_lora(seed=42), "team/unsigned", base=tiny_base)
        other = registry.push(make_lora(seed=43), "team/stranger", base=tiny_base).manifest
        sign_version(registry, other, stranger)
        # The release signature of team/signed, put beside other content under the same key.
        forged = registry.push(make_lora(seed=44), "team/forged", base=tiny_base).manifest
        bundle = registry.store.read(signature_key("team/signed", 1, key_id))
        registry.store.create(signature_key(forged.name, forged.version, key_id), bundle)

    gateway = GatewayProcess(
        [*tiny_serve_args(tiny_base, url), "--trust", str(policy)],
        env={"LORABAY_HOME": str(tmp_path_factory.mktemp("gateway-home"))},
    )
    try:
        gateway.start()
        assert gateway.url, gateway.output
        yield gateway, signed
    finally:
        gateway.stop(signal.SIGTERM)
        gateway.kill_leftovers()


def complete(gateway, model: str):
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="-", max_retries=0, timeout=300)
    return client.completions.create(model=model, prompt="hi", max_tokens=2)


def test_only_adapters_signed_by_an_allowed_signer_are_served(trusted_gateway):
    gateway, signed = trusted_gateway
    assert complete(gateway, "team/signed").model == f"team/signed@{signed.digest}"

    refusals = {
        "team/unsigned": ("unsigned", "is not signed"),
        "team/stranger": ("unknown_signer", "signed only by keys the policy does not allow"),
        "team/forged": ("bad_signature", "does not hold"),
    }
    for model, (_, words) in refusals.items():
        with pytest.raises(openai.PermissionDeniedError) as caught:
            complete(gateway, model)
        body = caught.value.body
        assert body["code"] == "untrusted_adapter" and words in body["message"], body
        assert "not trusted" in body["message"]

    text = gateway.metrics()
    for model, (kind, _) in refusals.items():
        assert metric(text, "lorabay_adapter_refusals_total", adapter=model, reason=kind) == 1
    # Nothing refused ever reached the engine.
    loaded = {a.split("@")[0] for a in gateway.engine_door().adapters()}
    assert loaded == {"team/signed"}
