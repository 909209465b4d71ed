"""Signatures (OpenSSF model signing, keys offline) and the trust policy (hub/signing.py),
through the real ``lorabay hub`` commands where a user would use them."""

from __future__ import annotations

import base64
import json

import pytest
from click.testing import CliRunner

from lorabay.cli.main import cli
from lorabay.hub import Registry
from lorabay.hub.errors import ConfigError, UntrustedAdapter
from lorabay.hub.keys import signature_key
from lorabay.hub.signing import PublicKey, TrustPolicy, check_signatures, sign_version


@pytest.fixture
def make_key(tmp_path):
    """Factory: ``make_key("release")`` -> (private PEM path, public PEM path)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    def make(name: str, curve=None):
        key = ec.generate_private_key(curve or ec.SECP256R1())
        private = tmp_path / f"{name}.key"
        public = tmp_path / f"{name}.pub"
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
        return private, public

    return make


def run(*args: str, **env):
    return CliRunner().invoke(cli, list(args), env=env or None)


def test_push_sign_show_and_verify_signed_by(store_url, lora, make_key):
    release, release_pub = make_key("release")
    _, other_pub = make_key("other")
    pushed = run("hub", "push", str(lora(seed=1)), "team/sum", "--sign", str(release),
                 "--registry", store_url, "--json")  # fmt: skip
    assert pushed.exit_code == 0, pushed.output
    facts = json.loads(pushed.output)
    key_id = PublicKey.load(release_pub).key_id
    assert facts["ref"] == "team/sum:1" and facts["signed_by"] == key_id

    shown = run("hub", "show", "team/sum:1", "--registry", store_url, "--json")
    assert json.loads(shown.output)["signatures"] == [
        {"key_id": key_id[:32], "covers_manifest": True}
    ]
    text = run("hub", "show", "team/sum:1", "--registry", store_url).output
    assert f"signed by:   {key_id[:16]}" in text

    good = run(
        "hub", "verify", "team/sum:1", "--signed-by", str(release_pub), "--registry", store_url
    )
    assert good.exit_code == 0 and f"ok: signed by {key_id[:16]}" in good.output, good.output
    bad = run("hub", "verify", "team/sum:1", "--signed-by", str(other_pub), "--registry", store_url)
    assert bad.exit_code == 1 and "not signed by" in bad.output
    assert f"signed by: {key_id[:16]}" in bad.output

    # The same key again creates nothing and logs nothing.
    again = run("hub", "sign", "team/sum:1", "--key", str(release), "--registry", store_url)
    assert again.exit_code == 0 and "already signed by this key" in again.output
    events = [e["event"] for e in Registry.open(store_url).events("team/sum")]
    assert events == ["pushed", "signed"]


def test_a_signature_over_other_content_fails(lora, make_key, registry_url):
    """Version 2 carrying version 1's signature (same key id, other files) is refused:
    model-signing's hashes fail on the verified folder, and the file list differs."""
    release, release_pub = make_key("release")
    reg = Registry.open(registry_url)
    one = reg.push(lora(seed=1), "a").manifest
    two = reg.push(lora(seed=2), "a").manifest
    signed = sign_version(reg, one, release)
    bundle = reg.store.read(signature_key("a", 1, signed.key_id))
    reg.store.create(signature_key("a", 2, signed.key_id), bundle)
    key = PublicKey.load(release_pub)
    with reg.lease(two) as held:
        (check,) = check_signatures(reg, two, held.path, [key])
    assert not check.valid and "model-signing refuses it" in check.reason
    with reg.lease(one) as held:
        assert check_signatures(reg, one, held.path, [key])[0].valid

    # A signature whose envelope was changed (one byte of the signature) fails too.
    envelope = json.loads(bundle)
    raw = bytearray(base64.b64decode(envelope["dsseEnvelope"]["signatures"][0]["sig"]))
    raw[10] ^= 1
    envelope["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(bytes(raw)).decode()
    key_one = signature_key("a", 1, signed.key_id)
    reg.store.swap(key_one, json.dumps(envelope).encode(), reg.store.read_tagged(key_one)[1])
    with reg.lease(one) as held:
        assert not check_signatures(reg, one, held.path, [key])[0].valid


def test_a_bad_key_fails_before_anything_is_pushed(lora, tmp_path, registry_url):
    junk = tmp_path / "junk.key"
    junk.write_text("not a key")
    result = run("hub", "push", str(lora()), "a", "--sign", str(junk), "--registry", registry_url)
    assert result.exit_code == 1 and "is not a PEM private key" in result.output
    assert "openssl ecparam" in result.output
    assert not Registry.open(registry_url).store.exists()  # nothing written, not even the registry


def test_the_configured_key_signs_every_push(lora, make_key, registry_url):
    release, release_pub = make_key("release")
    result = run("hub", "push", str(lora()), "a", "--registry", registry_url,
                 LORABAY_SIGNING_KEY=str(release))  # fmt: skip
    assert result.exit_code == 0 and "signed by" in result.output, result.output


def write_policy(tmp_path, text: str):
    path = tmp_path / "trust.yaml"
    path.write_text(text)
    return path


def test_the_trust_policy_reports_every_problem_at_once(tmp_path, make_key):
    make_key("release")
    path = write_policy(
        tmp_path,
        "keys:\n  release: release.pub\n  lost: missing.pub\n"
        "rules:\n  - names: ['team-a/*']\n    signers: [release, nobody]\n  - names: []\n"
        "colour: blue\n",
    )
    with pytest.raises(ConfigError) as caught:
        TrustPolicy.load(path)
    problems = caught.value.problems
    assert any("unknown field 'colour'" in p for p in problems)
    assert any("key lost" in p and "does not exist" in p for p in problems)
    assert any("signer 'nobody' is not under keys" in p for p in problems)
    assert any("rule 2" in p for p in problems)


def test_the_trust_policy_decides_by_name_and_signer(tmp_path, lora, make_key, registry_url):
    release, _ = make_key("release")
    team, _ = make_key("team-a")
    stranger, _ = make_key("stranger")
    policy = TrustPolicy.load(
        write_policy(
            tmp_path,
            "keys:\n  release: release.pub\n  team-a: team-a.pub\n"
            "rules:\n  - names: ['team-a/*']\n    signers: [team-a, release]\n"
            "  - names: ['shared/*']\n    signers: release\n",
        )
    )
    reg = Registry.open(registry_url)

    def decide(name: str, seed: int, key=None):
        m = reg.push(lora(seed=seed), name).manifest
        if key is not None:
            sign_version(reg, m, key)
        with reg.lease(m) as held:
            return policy.check(reg, m, held.path)

    assert decide("team-a/x", 1, team).name == "team-a"
    assert decide("team-a/y", 2, release).name == "release"
    assert decide("shared/z", 3, release).name == "release"
    with pytest.raises(UntrustedAdapter) as caught:
        decide("shared/w", 4, team)  # team-a may sign team-a/*, not shared/*
    assert caught.value.kind == "unknown_signer" and "allowed: release" in str(caught.value)
    with pytest.raises(UntrustedAdapter) as caught:
        decide("team-a/u", 5)
    assert caught.value.kind == "unsigned"
    with pytest.raises(UntrustedAdapter) as caught:
        decide("other/v", 6, release)
    assert caught.value.kind == "no_rule"
    with pytest.raises(UntrustedAdapter) as caught:
        decide("team-a/s", 7, stranger)
    assert caught.value.kind == "unknown_signer"


def test_rm_takes_the_signatures_with_the_version(lora, make_key, registry_url):
    release, _ = make_key("release")
    reg = Registry.open(registry_url)
    m = reg.push(lora(), "a").manifest
    signed = sign_version(reg, m, release)
    assert reg.store.has(signature_key("a", 1, signed.key_id))
    reg.remove("a:1")
    assert not reg.store.has(signature_key("a", 1, signed.key_id))
