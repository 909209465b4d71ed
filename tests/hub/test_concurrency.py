"""Guarantee 1: 8 real processes at once, on both stores."""

from collections import Counter

import pytest
from hubtools import run_together, write_lora

from lorabay.hub import Registry

# 8 interpreters starting on a 2-core machine: seconds each, so not in the fast loop.
pytestmark = pytest.mark.slow

WORKERS = 8


def test_eight_concurrent_pushes_make_versions_1_to_8(store_url, tmp_path):
    folders = [write_lora(tmp_path / f"a{i}", seed=100 + i) for i in range(WORKERS)]
    results = run_together(
        [["push", store_url, str(f), "team/race"] for f in folders], tmp_path / "go"
    )
    assert sorted(r["version"] for r in results) == list(range(1, WORKERS + 1))
    reg = Registry.open(store_url)
    manifests = reg.list("team/race")
    assert [m.version for m in manifests] == list(range(1, WORKERS + 1))
    # Every manifest intact and each content present exactly once.
    assert {r["digest"] for r in results} == {m.digest for m in manifests}
    assert len({m.digest for m in manifests}) == WORKERS
    by_version = {r["version"]: r["digest"] for r in results}
    assert all(by_version[m.version] == m.digest for m in manifests)
    assert reg.verify() == []
    pushed = [e for e in reg.events("team/race") if e["event"] == "pushed"]
    assert sorted(e["version"] for e in pushed) == list(range(1, WORKERS + 1))


def test_eight_concurrent_alias_moves_end_on_one_of_them(store_url, tmp_path):
    reg = Registry.open(store_url)
    for i in range(WORKERS):
        reg.push(write_lora(tmp_path / f"a{i}", seed=200 + i), "race")
    run_together(
        [["alias", store_url, "race", "prod", str(v)] for v in range(1, WORKERS + 1)],
        tmp_path / "go",
    )
    final = reg.aliases("race")["prod"]
    assert final in range(1, WORKERS + 1)
    moves = [e for e in reg.events("race") if e["event"] == "aliased" and e["alias"] == "prod"]
    assert sorted(e["version"] for e in moves) == list(range(1, WORKERS + 1))
    # The last move in the log is the one that stuck; each saw its predecessor's value.
    assert moves[-1]["version"] == final
    assert Counter(e["previous"] for e in moves)[None] == 1


def test_eight_concurrent_pulls_fetch_once(store_url, tmp_path, lorabay_home):
    reg = Registry.open(store_url)
    m = reg.push(write_lora(tmp_path / "a", seed=300, pad_bytes=4 << 20), "big").manifest
    results = run_together([["pull", store_url, "big:1"] for _ in range(WORKERS)], tmp_path / "go")
    assert sum(r["fetched"] for r in results) == 1
    assert sum(r["hits"] for r in results) == WORKERS - 1
    assert {r["path"] for r in results} == {str(lorabay_home / "cache" / m.digest_hex)}
    leftovers = [p.name for p in (lorabay_home / "cache").iterdir() if p.name.startswith(".tmp")]
    assert leftovers == []
