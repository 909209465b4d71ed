"""Pack merging (hub/packs.py) on a real store: many small packs end as a few, losing nothing.

The merge needs only list, read, create, has and delete, so a local store shows it without
the S3 server; reading records back through etags is tested against S3 in test_packs.py.
"""

import json

from lorabay.hub import packs
from lorabay.hub.store import md5_etag
from lorabay.hub.stores.local import LocalStore


def record(i: int) -> tuple[str, tuple[str, bytes]]:
    data = json.dumps({"name": f"team/a{i:04d}", "padding": "x" * 1500}).encode()
    return f"adapters/team/a{i:04d}/1.json", (md5_etag(data), data)


def test_one_pack_per_push_ends_as_a_few_holding_every_record(tmp_path):
    store = LocalStore(tmp_path / "registry")
    store.initialize()
    written = {}
    for i in range(400):  # as 400 pushes, each packing the manifest it wrote
        key, value = record(i)
        written[key] = value
        packs.add(store, {key: value}, workers=2)
        assert len(store.list(packs.PREFIX)) < 4 * packs.FANOUT  # never piles up
    left = store.list(packs.PREFIX)
    assert len(left) <= 3 * (packs.FANOUT - 1)  # O(log n): at most FANOUT-1 in each tier
    records = packs.read_packs(store, left, workers=2)
    assert {key: list(versions.items())[-1] for key, versions in records.items()} == written


def test_a_newer_version_of_a_record_wins_the_merge(tmp_path):
    store = LocalStore(tmp_path / "registry")
    store.initialize()
    old = b'{"prod": 1}'
    new = b'{"prod": 2}'
    packs.add(store, {"aliases/team/a.json": (md5_etag(old), old)}, workers=1)
    for i in range(packs.FANOUT - 2):
        packs.add(store, dict([record(i)]), workers=1)
    packs.add(store, {"aliases/team/a.json": (md5_etag(new), new)}, workers=1)  # merges
    (merged,) = store.list(packs.PREFIX)
    versions = packs.read_packs(store, [merged], workers=1)["aliases/team/a.json"]
    assert versions == {md5_etag(new): new}
