"""`hub rm`: a version goes for good (a secret pushed by mistake), on every store."""

import json

import pytest

from lorabay.hub import AdapterNotFound, Registry
from lorabay.hub.errors import VersionAliased
from lorabay.hub.keys import manifest_key


def blob_keys(reg) -> set[str]:
    return {i.key for i in reg.store.list("blobs/sha256/")}


def test_rm_deletes_the_version_and_gc_frees_its_blobs(store_url, lora, lorabay_home):
    reg = Registry.open(store_url)
    secret = reg.push(lora(seed=1), "a", description="oops: has the API key").manifest
    kept = reg.push(lora(seed=2), "a").manifest
    folder = reg.pull("a:1")
    before = blob_keys(reg)
    other_reader = Registry.open(store_url)
    assert other_reader.resolve("a:1") == secret  # cached in that reader now

    removed = reg.remove("a:1", reason="pushed a secret")
    assert removed.manifest == secret and removed.aliases == {}
    for reader in (reg, other_reader, Registry.open(store_url)):
        with pytest.raises(AdapterNotFound, match="a:1 was removed"):
            reader.resolve("a:1")
        with pytest.raises(AdapterNotFound):
            reader.resolve(f"a@{secret.digest}")
        assert [m.ref for m in reader.list(include_yanked=True)] == ["a:2"]
    assert not reg.store.has(manifest_key("a", 1))
    assert not folder.exists()  # this machine's cached copy went too (nobody used it)
    events = reg.events("a")
    assert [e["event"] for e in events] == ["pushed", "pushed", "removed"]
    assert events[-1]["reason"] == "pushed a secret" and events[-1]["digest"] == secret.digest

    unique = {f"blobs/sha256/{f['sha256']}" for f in secret.files} - {
        f"blobs/sha256/{f['sha256']}" for f in kept.files
    }
    assert unique and unique <= before
    report = reg.gc(grace_seconds=0)
    assert set(report.blobs) == {k.replace("blobs/sha256/", "sha256:") for k in unique}
    assert blob_keys(reg) == before - unique
    assert reg.verify() == [] and reg.pull("a:2").is_dir()


def test_a_removed_number_is_never_given_out_again(store_url, lora):
    reg = Registry.open(store_url)
    reg.push(lora(seed=1), "a")
    reg.push(lora(seed=2), "a")
    reg.remove("a:2")
    assert reg.resolve("a").version == 1  # latest falls back
    again = reg.push(lora(seed=2), "a")  # the very same content
    assert again.created and again.manifest.version == 3
    assert [m.version for m in Registry.open(store_url).list("a")] == [1, 3]
    reg.remove("a:1")
    reg.remove("a:3")
    assert reg.names() == []  # a name with only removed versions is not listed
    with pytest.raises(AdapterNotFound):
        reg.resolve("a")
    assert reg.push(lora(seed=4), "a").manifest.version == 4


def test_aliases_are_refused_unless_moved_or_dropped(store_url, lora):
    reg = Registry.open(store_url)
    reg.push(lora(seed=1), "a", aliases=["prod", "canary"])
    reg.push(lora(seed=2), "a")
    before = {i.key for i in reg.store.list("")}
    with pytest.raises(VersionAliased) as caught:
        reg.remove("a:1")
    message = str(caught.value)
    assert "a:canary, a:prod" in message and "--move-aliases" in message and "\n" not in message
    assert {i.key for i in reg.store.list("")} == before  # nothing written
    moved = reg.remove("a:prod", move_aliases=2)
    assert moved.manifest.version == 1 and moved.aliases == {"canary": 2, "prod": 2}
    assert reg.aliases("a") == {"canary": 2, "prod": 2}
    reg.remove("a:2", drop_aliases=True)
    assert reg.aliases("a") == {}
    log = [(e["event"], e.get("alias")) for e in reg.events("a")][-6:]
    assert log == [
        ("aliased", "canary"),
        ("aliased", "prod"),
        ("removed", None),
        ("unaliased", "canary"),
        ("unaliased", "prod"),
        ("removed", None),
    ]


def test_a_dangling_alias_says_what_happened(store_url, lora):
    """An alias set to a version a concurrent rm was removing points at nothing: it says so."""
    reg = Registry.open(store_url)
    reg.push(lora(seed=1), "a")
    reg.push(lora(seed=2), "a")
    reg.remove("a:1")
    reg.store.swap("aliases/_/a.json", json.dumps({"old": 1}).encode(), None)
    with pytest.raises(AdapterNotFound, match="points to a:1, which was removed"):
        reg.resolve("a:old")


def test_a_removed_version_is_not_resurrected_by_packs_or_copies(store_url, lora):
    """Packs (S3) and this machine's manifest copies still held a:1 when it was removed:
    no reader takes it from there, and rm (then gc) rewrites the packs without it."""
    reg = Registry.open(store_url)
    for seed in range(8):  # enough that listing reads many manifests (and packs them)
        reg.push(lora(seed=seed), "a", description=f"v{seed}")
    assert len(Registry.open(store_url).list()) == 8
    reg.remove("a:3")
    fresh = Registry.open(store_url)
    assert [m.version for m in fresh.list()] == [1, 2, 4, 5, 6, 7, 8]
    with pytest.raises(AdapterNotFound):
        fresh.resolve("a:3")
    reg.gc(grace_seconds=0)
    for info in reg.store.list("packs/"):
        assert manifest_key("a", 3) not in json.loads(reg.store.read(info.key))["objects"]
    assert [m.version for m in Registry.open(store_url).list()] == [1, 2, 4, 5, 6, 7, 8]


def test_rm_of_a_yanked_version_drops_its_flag(store_url, lora):
    reg = Registry.open(store_url)
    reg.push(lora(seed=1), "a")
    reg.push(lora(seed=2), "a")
    reg.yank("a:2")
    reg.remove("a:2")
    assert reg.yanked_versions("a") == set()
    assert [m.ref for m in reg.list(include_yanked=True)] == ["a:1"]


def test_a_removal_killed_after_its_tombstone_is_finished_by_gc(store_url, lora):
    from lorabay.hub.keys import removed_key

    reg = Registry.open(store_url)
    gone = reg.push(lora(seed=1), "a").manifest
    reg.push(lora(seed=2), "a")
    reg.store.create(removed_key("a", 1), b"{}")  # all a killed rm got to: its commit point
    assert [m.ref for m in Registry.open(store_url).list(include_yanked=True)] == ["a:2"]
    assert reg.push(lora(seed=3), "a").manifest.version == 3
    report = reg.gc(grace_seconds=0)
    assert not reg.store.has(manifest_key("a", 1))
    assert {f"sha256:{f['sha256']}" for f in gone.files} & set(report.blobs)
    assert reg.verify() == []
