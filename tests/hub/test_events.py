"""The event log: only real changes, keyed by name, --limit/--since, damage in one line."""

import time

import pytest
from hubtools import overwrite

from lorabay.hub import Registry
from lorabay.hub.errors import DamagedRecord


def kinds(reg, name=None, **options) -> list[str]:
    return [e["event"] for e in reg.events(name, **options)]


def test_yank_and_unyank_log_only_real_changes(store_url, lora):
    reg = Registry.open(store_url)
    reg.push(lora(seed=1), "a")
    assert reg.yank("a:1", reason="regressed").changed
    again = reg.yank("a:1", reason="a second reason")
    assert not again.changed and again.manifest.ref == "a:1"
    assert reg.yank("a:1", undo=True).changed
    assert not reg.yank("a:1", undo=True).changed
    assert kinds(reg, "a") == ["pushed", "yanked", "unyanked"]
    yanked = reg.events("a")[1]
    assert yanked["reason"] == "regressed"  # the first reason, as the flag recorded it


def test_events_are_kept_by_name(store_url, lora):
    reg = Registry.open(store_url)
    reg.push(lora(seed=1), "a")
    reg.push(lora(seed=2), "team/b", aliases=["prod"])
    reg.push(lora(seed=3), "a")
    keys = [i.key for i in reg.store.list("events/")]
    assert len(keys) == 4 and all(k.startswith(("events/_/a/", "events/team/b/")) for k in keys)
    assert [e["version"] for e in reg.events("a")] == [1, 2]
    assert kinds(reg, "team/b") == ["pushed", "aliased"]
    assert kinds(reg) == ["pushed", "pushed", "aliased", "pushed"]  # every name, in time order
    # `hub log NAME` reads one name's prefix: the other name's events are never fetched.
    read = []
    original = reg.store.read
    reg.store.read = lambda key: read.append(key) or original(key)
    reg.events("a")
    assert read and all(key.startswith("events/_/a/") for key in read)


def test_limit_and_since_pick_before_reading(store_url, lora):
    reg = Registry.open(store_url)
    reg.push(lora(seed=1), "a")
    reg.set_alias("a", "prod", 1)
    time.sleep(0.05)
    middle = time.time()
    reg.set_alias("a", "canary", 1)
    reg.remove_alias("a", "canary")
    assert kinds(reg, "a", limit=2) == ["aliased", "unaliased"]
    assert [e.get("alias") for e in reg.events("a", limit=2)] == ["canary", "canary"]
    assert kinds(reg, "a", since=middle) == ["aliased", "unaliased"]
    assert kinds(reg, "a", since=middle, limit=1) == ["unaliased"]
    assert kinds(reg, "a", limit=0) == []
    assert kinds(reg, "a", since=time.time() + 60) == []


def test_a_damaged_event_is_one_line(store_url, lora):
    reg = Registry.open(store_url)
    reg.push(lora(seed=1), "a")
    (key,) = [i.key for i in reg.store.list("events/")]
    overwrite(reg.store, key, b'{"event": "pushed", "at": ')
    with pytest.raises(DamagedRecord) as caught:
        reg.events("a")
    message = str(caught.value)
    assert key in message and "\n" not in message
    problems = reg.verify()
    assert [(p.kind, p.where) for p in problems] == [("damaged", key)]


def test_events_older_lorabay_wrote_move_under_their_name_at_gc(store_url, lora):
    """Registries written before events were kept by name: `hub log` still shows them, and
    gc moves them where `hub log NAME` looks."""
    import json

    reg = Registry.open(store_url)
    reg.push(lora(seed=1), "a")
    old = {"event": "pushed", "at": "2026-01-01T00:00:00.000Z", "by": "x@y", "name": "a"}
    reg.store.create("events/00000000000000000001-abc.json", json.dumps(old).encode())
    assert kinds(reg) == ["pushed", "pushed"] and kinds(reg, "a") == ["pushed"]
    reg.gc(grace_seconds=3600)
    assert kinds(reg, "a") == ["pushed", "pushed"]
    assert reg.events("a")[0]["at"] == old["at"]  # in time order: the old one first
