"""Packs (hub/packs.py): a fresh process lists many adapters on S3 in a few GETs, never stale."""

import json
import shutil

import pytest
from click.testing import CliRunner
from lorabay.cli.main import cli
from lorabay.hub import Registry, packs
from lorabay.hub.settings import cache_dir

pytestmark = pytest.mark.s3
COUNT = packs.WRITE_AFTER + 8


def counting_reads(reg: Registry) -> list[str]:
    """Record every GET the registry's store makes from now on."""
    seen: list[str] = []
    read_tagged = reg.store.read_tagged

    def counted(key):
        seen.append(key)
        return read_tagged(key)

    reg.store.read_tagged = counted
    return seen


def fresh(url: str) -> Registry:
    """A registry as a new process on another machine sees it: nothing kept locally."""
    shutil.rmtree(cache_dir() / "manifests", ignore_errors=True)
    return Registry.open(url)


@pytest.fixture
def filled(s3_registry_url, lora):
    reg = Registry.open(s3_registry_url)
    folder = lora(seed=1)
    for i in range(COUNT):
        reg.push(folder, f"team/a{i:02d}", aliases=["prod"])
    return s3_registry_url


def test_the_first_list_writes_a_pack_the_next_reads(filled):
    first = fresh(filled)
    gets = counting_reads(first)
    assert len(first.list()) == COUNT and len(gets) >= COUNT
    assert len(first.alias_tables()) == COUNT
    assert len(first.store.list(packs.PREFIX)) == 1  # the two packs merged into one

    second = fresh(filled)
    gets = counting_reads(second)
    listed = second.list()
    tables = second.alias_tables()
    assert [m.ref for m in listed] == [f"team/a{i:02d}:1" for i in range(COUNT)]
    assert tables == {f"team/a{i:02d}": {"prod": 1} for i in range(COUNT)}
    assert all(key.startswith(packs.PREFIX) for key in gets) and len(gets) <= 2


def test_a_changed_alias_is_read_again_not_taken_from_the_pack(filled, lora):
    fresh(filled).alias_tables()  # writes the pack
    writer = Registry.open(filled)
    writer.push(lora(seed=2), "team/a03")
    writer.set_alias("team/a03", "prod", 2)
    reader = fresh(filled)
    gets = counting_reads(reader)
    assert reader.alias_tables(["team/a03", "team/a04"]) == {
        "team/a03": {"prod": 2},
        "team/a04": {"prod": 1},
    }
    assert "aliases/team/a03.json" in gets and "aliases/team/a04.json" not in gets


def test_a_pack_that_lies_is_not_believed(filled):
    fresh(filled).alias_tables()
    reg = Registry.open(filled)
    [pack] = reg.store.list(packs.PREFIX)
    content = json.loads(reg.store.read(pack.key))
    content["objects"]["aliases/team/a05.json"]["data"] = json.dumps({"prod": 7})
    reg.store.client.put_object(
        Bucket=reg.store.bucket, Key=reg.store.key(pack.key), Body=json.dumps(content).encode()
    )
    reg.store.create(f"{packs.PREFIX}00000000000000000000-garbage.json", b"not json")
    assert fresh(filled).alias_tables(["team/a05"]) == {"team/a05": {"prod": 1}}
    assert len(fresh(filled).list()) == COUNT


def test_the_cli_lists_with_aliases(filled):
    result = CliRunner().invoke(cli, ["hub", "list", "--registry", filled, "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert len(rows) == COUNT and all(r["aliases"] == ["prod"] for r in rows)


def test_a_damaged_local_copy_is_dropped_not_reported(filled):
    fresh(filled).list()  # keeps a copy of every manifest on this machine
    copies = sorted((cache_dir() / "manifests").rglob("*.json"))
    assert len(copies) == COUNT
    copies[0].write_text("{ not json")
    assert len(Registry.open(filled).list()) == COUNT  # read from the store instead
    assert copies[0].is_file() and copies[0].read_text().startswith("{\n")  # kept again
