"""Reference and name parsing (docs/architecture.md, "The registry's data model")."""

import pytest

from lorabay.hub.errors import InvalidReference
from lorabay.hub.reference import Reference, parse_reference, validate_alias, validate_name


@pytest.mark.parametrize(
    "text, expected",
    [
        ("summarize", Reference("summarize", alias="latest")),
        ("team/summarize", Reference("team/summarize", alias="latest")),
        ("summarize:3", Reference("summarize", version=3)),
        ("team/sum-v2.x_y:prod", Reference("team/sum-v2.x_y", alias="prod")),
        ("summarize:latest", Reference("summarize", alias="latest")),
        ("a@sha256:" + "0" * 64, Reference("a", digest="sha256:" + "0" * 64)),
    ],
)
def test_parse_valid(text, expected):
    parsed = parse_reference(text)
    assert parsed == expected
    assert parse_reference(str(parsed)) == parsed


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty"),
        ("Summarize", "lowercase"),
        ("a/b/c", "namespace"),
        ("-abc", "lowercase"),
        ("a" * 65, "longer than 64"),
        ("name:", "nothing follows"),
        ("name:03", "leading zeros"),
        ("name:0", "from 1"),
        ("name:Prod", "aliases are lowercase"),
        ("name@sha256:abc", "64 lowercase hex"),
        ("name@md5:" + "0" * 64, "64 lowercase hex"),
        (" name", "spaces"),
        ("../x", "lowercase"),
    ],
)
def test_parse_invalid_names_the_problem(text, fragment):
    with pytest.raises(InvalidReference) as caught:
        parse_reference(text)
    assert fragment in str(caught.value)
    assert "name:VERSION" in str(caught.value)  # the hint says how a reference is written


def test_alias_all_digits_is_refused():
    with pytest.raises(InvalidReference, match="all digits"):
        validate_alias("123")


def test_names():
    assert validate_name("team/a.b-c_d") == "team/a.b-c_d"
    for bad in ("team/", "/a", "a//b", "a b", "UPPER"):
        with pytest.raises(InvalidReference):
            validate_name(bad)


@pytest.mark.parametrize("digits", [16, 5000, 100_000])
def test_huge_versions_are_a_clean_error(digits):
    """int() of over 4,300 digits raises ValueError (a traceback in `hub pull`, a 500 in
    the gateway); now it is InvalidReference, which the gateway maps to a 4xx."""
    ref = "name:" + "9" * digits
    with pytest.raises(InvalidReference) as caught:
        parse_reference(ref)
    message = str(caught.value)
    assert "at most 15" in message and len(message) < 400 and "\n" not in message
    assert 400 <= caught.value.http_status < 500


@pytest.mark.parametrize("tag", ["²", "١", "٣٤"])
def test_only_ascii_digits_are_versions(tag):
    with pytest.raises(InvalidReference):
        parse_reference(f"name:{tag}")
    with pytest.raises(InvalidReference):
        validate_alias(tag)


def test_huge_version_in_the_cli_is_one_line(tmp_path):
    from click.testing import CliRunner

    from lorabay.cli.main import cli

    registry = f"file://{tmp_path / 'registry'}"
    for args in (
        ["pull", "a:" + "7" * 5000],
        ["show", "a:" + "7" * 5000],
        ["yank", "a:1" + "0" * 20],
    ):
        result = CliRunner().invoke(cli, ["hub", *args, "--registry", registry])
        assert result.exit_code == 1, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "invalid reference" in lines[0] and len(lines[0]) < 400
