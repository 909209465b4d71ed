"""`lorabay serve --trust FILE` is checked with the other options, before the engine starts:
every problem of the policy at once, each naming the flag (the real gateway with a policy:
test_trust.py)."""

from __future__ import annotations

import pytest

from lorabay.hub.errors import ConfigError
from lorabay.serve.options import ServeOptions, check_options


def test_a_bad_trust_policy_fails_the_options_with_every_problem(tiny_base, tmp_path):
    policy = tmp_path / "trust.yaml"
    policy.write_text(
        "keys:\n  release: nowhere.pub\nrules:\n  - names: ['*']\n    signers: [ops]\n"
    )
    with pytest.raises(ConfigError) as caught:
        check_options(ServeOptions(base=str(tiny_base), trust=str(policy)))
    problems = caught.value.problems
    assert all(p.startswith("--trust: ") for p in problems)
    assert any("key release" in p and "does not exist" in p for p in problems)
    assert any("signer 'ops' is not under keys" in p for p in problems)


def test_serve_help_names_the_trust_policy():
    from click.testing import CliRunner

    from lorabay.cli.main import cli

    text = CliRunner().invoke(cli, ["serve", "--help"]).output
    assert "--trust" in text and "signers" in text
