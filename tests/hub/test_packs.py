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


def test_pushes_leave_a_few_packs_a_fresh_process_lists_from(filled):
    assert len(Registry.open(filled).store.list(packs.PREFIX)) <= 2 * (packs.FANOUT - 1)
    reader = fresh(filled)
    gets = counting_reads(reader)
    listed = reader.list()
    tables = reader.alias_tables()
    assert [m.ref for m in listed] == [f"team/a{i:02d}:1" for i in range(COUNT)]
    assert tables == {f"team/a{i:02d}": {"prod": 1} for i in range(COUNT)}
    assert all(key.startswith(packs.PREFIX) for key in gets), gets


def drop_packs(url: str) -> None:
    """Make the registry one written by a lorabay without packs."""
    store = Registry.open(url).store
    for pack in store.list(packs.PREFIX):
        store.delete(pack.key)


def test_a_reader_that_had_to_get_many_packs_them_for_the_next(filled):
    drop_packs(filled)
    first = fresh(filled)
    gets = counting_reads(first)
    assert len(first.list()) == COUNT and len(gets) >= COUNT
    assert len(first.alias_tables()) == COUNT

    second = fresh(filled)
    gets = counting_reads(second)
    assert len(second.list()) == COUNT and len(second.alias_tables()) == COUNT
    assert all(key.startswith(packs.PREFIX) for key in gets) and len(gets) <= 4  # 2 each


def test_a_changed_alias_is_read_again_not_taken_from_the_pack(filled, lora):
    writer = Registry.open(filled)
    writer.push(lora(seed=2), "team/a03")
    # Moved by a writer that packs nothing (an older lorabay, another tool).
    table, etag = writer._read_aliases("team/a03")
    writer.store.swap("aliases/team/a03.json", json.dumps({"prod": 2}).encode(), etag)
    reader = fresh(filled)
    gets = counting_reads(reader)
    assert reader.alias_tables(["team/a03", "team/a04"]) == {
        "team/a03": {"prod": 2},
        "team/a04": {"prod": 1},
    }
    assert "aliases/team/a03.json" in gets and "aliases/team/a04.json" not in gets


def test_an_alias_moved_by_lorabay_is_in_a_pack(filled, lora):
    writer = Registry.open(filled)
    writer.push(lora(seed=2), "team/a03")
    writer.set_alias("team/a03", "prod", 2)
    reader = fresh(filled)
    gets = counting_reads(reader)
    assert reader.alias_tables(["team/a03"]) == {"team/a03": {"prod": 2}}
    assert all(key.startswith(packs.PREFIX) for key in gets), gets
    assert reader.resolve("team/a03:prod").version == 2  # resolve reads the table itself


def test_a_pack_that_lies_is_not_believed(filled):
    reg = Registry.open(filled)
    for pack in reg.store.list(packs.PREFIX):
        content = json.loads(reg.store.read(pack.key))
        if "aliases/team/a05.json" in content["objects"]:
            break
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
    drop_packs(filled)
    fresh(filled).list()  # GETs every manifest and keeps a copy of each on this machine
    copies = sorted((cache_dir() / "manifests").rglob("*.json"))
    assert len(copies) == COUNT
    copies[0].write_text("{ not json")
    assert len(Registry.open(filled).list()) == COUNT  # read from the store instead
    assert copies[0].is_file() and copies[0].read_text().startswith("{\n")  # kept again


def test_a_long_lived_registry_reads_each_pack_once(filled, lora):
    reader = fresh(filled)  # as the gateway holds one for /v1/models
    assert len(reader.alias_tables()) == COUNT
    gets = counting_reads(reader)
    assert len(reader.alias_tables()) == COUNT and gets == []
    Registry.open(filled).push(lora(seed=3), "team/new", aliases=["prod"])
    assert reader.alias_tables()["team/new"] == {"prod": 1}
    assert gets and all(key.startswith(packs.PREFIX) for key in gets), gets  # the new ones
