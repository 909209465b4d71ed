"""`lorabay hub ...`: tables for people, --json for scripts, one-line errors, exit codes."""

import json

import pytest
from click.testing import CliRunner

from lorabay.cli.main import cli


@pytest.fixture
def run(registry_url):
    runner = CliRunner()

    def invoke(*args, registry=True):
        extra = ["--registry", registry_url] if registry else []
        return runner.invoke(cli, ["hub", *args, *extra])

    return invoke


def test_push_list_show_pull(run, lora, tmp_path):
    a, b = lora(seed=1), lora(seed=2)
    result = run("push", str(a), "team/sum", "--alias", "prod", "--label", "task=sum")
    assert result.exit_code == 0, result.output
    ref, digest = result.output.split()[:2]
    assert ref == "team/sum:1" and digest.startswith("sha256:")
    assert run("push", str(b), "team/sum").output.startswith("team/sum:2 ")
    again = run("push", str(a), "team/sum", "--json")
    assert json.loads(again.output)["version"] == 1 and json.loads(again.output)["created"] is False

    table = run("list").output.splitlines()
    assert table[0].split()[:3] == ["NAME", "VERSION", "DIGEST"]
    assert [line.split()[:2] for line in table[1:]] == [["team/sum", "1"], ["team/sum", "2"]]
    assert "prod" in table[1]
    listed = json.loads(run("list", "--json").output)
    assert [(r["ref"], r["aliases"]) for r in listed] == [
        ("team/sum:1", ["prod"]),
        ("team/sum:2", []),
    ]

    shown = run("show", "team/sum:prod").output
    assert "team/sum:1" in shown and "task=sum" in shown and "adapter_model.safetensors" in shown
    data = json.loads(run("show", "team/sum:prod", "--json").output)
    assert (
        data["digest"] == digest
        and data["aliases"] == ["prod"]
        and data["lineage"]["method"] is None
    )

    pulled = run("pull", "team/sum:prod", "--to", str(tmp_path / "out"))
    assert pulled.exit_code == 0 and pulled.output.strip() == str(tmp_path / "out")
    assert json.loads(run("pull", "team/sum:2", "--json").output)["ref"] == "team/sum:2"


def test_alias_yank_verify_gc_log(run, lora):
    run("push", str(lora(seed=1)), "a")
    run("push", str(lora(seed=2)), "a")
    assert run("alias", "set", "a", "prod", "1").output.strip() == "a:prod -> a:1"
    assert run("alias", "rm", "a", "prod").exit_code == 0
    assert run("yank", "a:2").output.strip() == "yanked a:2"
    assert [r["ref"] for r in json.loads(run("list", "--json").output)] == ["a:1"]
    everything = json.loads(run("list", "--all", "--json").output)
    assert [(r["ref"], r["yanked"]) for r in everything] == [("a:1", False), ("a:2", True)]
    result = run("pull", "a:2")
    assert result.exit_code == 0 and "Warning: a:2 is yanked" in result.stderr
    assert run("yank", "a:2", "--undo").output.strip() == "unyanked a:2"
    assert run("verify").output.startswith("ok")
    assert json.loads(run("gc", "--grace", "0", "--json").output)["blobs"] == []
    events = [e["event"] for e in json.loads(run("log", "a", "--json").output)]
    assert events == ["pushed", "pushed", "aliased", "unaliased", "yanked", "unyanked"]


def test_check(run, lora, tiny_base):
    run("push", str(lora(layers=2)), "fits")
    run("push", str(lora(layers=3)), "deep")
    ok = run("check", "fits", "--base", str(tiny_base))
    assert ok.exit_code == 0 and "fits" in ok.output
    bad = run("check", "deep", "--base", str(tiny_base), "--max-rank", "2", "--json")
    assert bad.exit_code == 1
    reasons = json.loads(bad.output)["reasons"]
    assert any("rank 4 is above" in r for r in reasons)
    assert any("model.layers.2" in r for r in reasons)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (("pull", "Bad Name"), "invalid reference"),
        (("pull", "missing"), "not found"),
        (("alias", "set", "a", "123", "1"), "all digits"),
        (("show", "a:9"), "not found"),
    ],
)
def test_user_errors_are_one_line_exit_1(run, lora, args, fragment):
    run("push", str(lora()), "a")
    result = run(*args)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0]
    assert "Traceback" not in result.output


def test_bad_folder_is_refused_with_exit_1(run, lora):
    folder = lora()
    (folder / "optimizer.pt").write_bytes(b"x")
    result = run("push", str(folder), "a")
    assert (
        result.exit_code == 1 and "pickled" in result.stderr and "\n" not in result.stderr.strip()
    )


def test_missing_registry_is_exit_1(tmp_path):
    result = CliRunner().invoke(cli, ["hub", "list", "--registry", f"file://{tmp_path / 'none'}"])
    assert result.exit_code == 1 and "no registry here yet" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("push",),
        ("alias", "set", "a", "prod", "x"),
        ("gc", "--grace", "soon"),
        ("push", ".", "a", "--label", "novalue"),
        ("list", "--frobnicate"),
    ],
)
def test_usage_errors_exit_2(run, args):
    assert run(*args).exit_code == 2


def test_help_has_examples():
    runner = CliRunner()
    for command in (
        ["hub"],
        ["hub", "push"],
        ["hub", "pull"],
        ["hub", "alias", "set"],
        ["hub", "gc"],
    ):
        result = runner.invoke(cli, [*command, "--help"])
        assert result.exit_code == 0 and "Example" in result.output


def test_yank_twice_says_already_yanked(run, lora):
    run("push", str(lora(seed=1)), "a")
    assert run("yank", "a:1").output.strip() == "yanked a:1"
    again = run("yank", "a:1", "--reason", "twice")
    assert again.exit_code == 0
    assert again.output.strip() == "a:1 is already yanked (nothing changed, nothing logged)"
    assert json.loads(run("yank", "a:1", "--json").output)["changed"] is False
    assert run("yank", "a:1", "--undo").output.strip() == "unyanked a:1"
    assert "is not yanked" in run("yank", "a:1", "--undo").output
    events = [e["event"] for e in json.loads(run("log", "a", "--json").output)]
    assert events == ["pushed", "yanked", "unyanked"]


def test_rm_and_its_refusals(run, lora):
    run("push", str(lora(seed=1)), "a", "--alias", "prod")
    run("push", str(lora(seed=2)), "a")
    refused = run("rm", "a:1")
    assert (
        refused.exit_code == 1 and "a:prod" in refused.stderr and "--move-aliases" in refused.stderr
    )
    assert len(refused.stderr.strip().splitlines()) == 1
    done = run("rm", "a:1", "--move-aliases", "2", "--reason", "secret")
    assert done.exit_code == 0, done.output
    assert done.output.splitlines()[0].startswith("removed a:1  sha256:")
    assert "a:prod -> a:2" in done.output and "hub gc" in done.output
    gone = run("pull", "a:1")
    assert gone.exit_code == 1 and "a:1 was removed" in gone.stderr
    assert [r["ref"] for r in json.loads(run("list", "--all", "--json").output)] == ["a:2"]
    data = json.loads(run("rm", "a:2", "--drop-aliases", "--json").output)
    assert data["removed"] is True and data["aliases"] == {"prod": None}
    assert run("rm", "a:2", "--drop-aliases", "--move-aliases", "1").exit_code == 1
    events = [e["event"] for e in json.loads(run("log", "a", "--json").output)]
    assert events.count("removed") == 2
    assert "Example" in run("rm", "--help").output


def test_log_limit_since_and_table(run, lora):
    run("push", str(lora(seed=1)), "a")
    run("push", str(lora(seed=2)), "b")
    run("alias", "set", "a", "prod", "1")
    assert [e["event"] for e in json.loads(run("log", "--limit", "1", "--json").output)] == [
        "aliased"
    ]
    assert len(json.loads(run("log", "--since", "1h", "--json").output)) == 3
    assert json.loads(run("log", "--since", "2999-01-01", "--json").output) == []
    assert len(json.loads(run("log", "a", "--since", "2000-01-01T00:00", "--json").output)) == 2
    table = run("log", "a").output.splitlines()
    assert table[0].split() == ["AT", "EVENT", "NAME", "DETAILS", "BY"] and len(table) == 3
    assert run("log", "--since", "yesterday").exit_code == 2
    assert run("log", "--limit", "-1").exit_code == 2


def test_show_never_prints_control_characters_raw(run, lora, registry_url, tmp_path):
    """A manifest stored before names were checked (or written by hand) holds a file name
    with an escape sequence and a bidi override: `hub show` prints escapes instead."""
    from lorabay.hub import Registry
    from lorabay.hub.manifest import digest_files

    Registry.open(registry_url).push(lora(seed=1), "a")
    key = tmp_path / "registry" / "adapters" / "_" / "a" / "1.json"
    data = json.loads(key.read_text())
    data["files"][0]["path"] = "evil\x1b[2J\u202etxt.json"
    data["description"] = "ok\x1b]0;title\x07"
    data["digest"] = digest_files(data["files"])
    key.chmod(0o644)
    key.write_text(json.dumps(data))
    shown = run("show", "a:1").output
    assert "\x1b" not in shown and "\u202e" not in shown and "\x07" not in shown
    assert "evil\\x1b[2J\\u202etxt.json" in shown and "ok\\x1b]0;title\\x07" in shown
