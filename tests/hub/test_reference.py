"""Reference and name parsing (DESIGN.md "The registry" table)."""

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
