"""Piece digests (hub/pieces.py): large files are checked piece by piece, on both stores.

The piece size is lowered to 4 KiB here so the tiny test adapters have several pieces;
the code paths are the ones a 16 MiB piece takes.
"""

import hashlib
import json

import pytest
from hubtools import overwrite

from lorabay.hub import DigestMismatch, Registry, pieces
from lorabay.hub.errors import DamagedRecord
from lorabay.hub.manifest import Manifest, digest_files

PIECE = 4096
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch):
    monkeypatch.setattr(pieces, "PIECE_BYTES", PIECE)


def weights_entry(manifest: Manifest) -> dict:
    return next(f for f in manifest.files if f["path"] == WEIGHTS)


def test_push_records_each_piece_and_the_digest_covers_them(store_url, lora, monkeypatch):
    folder = lora(seed=1)
    m = Registry.open(store_url).push(folder, "a").manifest
    data = (folder / WEIGHTS).read_bytes()
    entry = weights_entry(m)
    assert len(data) > 2 * PIECE
    assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert entry["pieces"] == {
        "size": PIECE,
        "sha256": [
            hashlib.sha256(data[i : i + PIECE]).hexdigest() for i in range(0, len(data), PIECE)
        ],
    }
    config = next(f for f in m.files if f["path"] == "adapter_config.json")
    assert "pieces" not in config  # one piece: its sha256 says it all
    without = [{k: v for k, v in f.items() if k != "pieces"} for f in m.files]
    assert digest_files(without) != m.digest  # a pinned digest fixes the pieces too
    assert json.loads(m.to_json())["schema"] == 2

    monkeypatch.setattr(pieces, "PIECE_BYTES", 16 << 20)  # the real size: no file is over it
    small = Registry.open(store_url).push(lora(seed=2), "b").manifest
    assert not any("pieces" in f for f in small.files)
    assert json.loads(small.to_json())["schema"] == 1  # older lorabay versions still read it


def test_pull_checks_pieces_and_names_the_damaged_one(store_url, lora, lorabay_home):
    reg = Registry.open(store_url)
    folder = lora(seed=1)
    reg.push(folder, "a")
    assert (reg.pull("a") / WEIGHTS).read_bytes() == (folder / WEIGHTS).read_bytes()
    folder = lora(seed=2)
    entry = weights_entry(reg.push(folder, "b").manifest)
    data = bytearray((folder / WEIGHTS).read_bytes())
    data[PIECE + 10] ^= 0x01  # in the second piece
    overwrite(reg.store, f"blobs/sha256/{entry['sha256']}", bytes(data))
    with pytest.raises(DigestMismatch) as caught:
        reg.pull("b")
    error = caught.value
    assert error.path == f"{WEIGHTS} (bytes {PIECE}-{2 * PIECE - 1})"
    assert error.expected == "sha256:" + entry["pieces"]["sha256"][1]
    assert error.actual == "sha256:" + hashlib.sha256(data[PIECE : 2 * PIECE]).hexdigest()
    assert error.expected in str(error) and error.actual in str(error)
    cached = [p for p in (lorabay_home / "cache").iterdir() if not p.name.startswith(".")]
    assert len(cached) == 1  # a's folder only: nothing of b


def test_a_truncated_blob_fails_the_pull(store_url, lora, lorabay_home):
    reg = Registry.open(store_url)
    folder = lora(seed=1)
    entry = weights_entry(reg.push(folder, "a").manifest)
    data = (folder / WEIGHTS).read_bytes()
    overwrite(reg.store, f"blobs/sha256/{entry['sha256']}", data[: PIECE + 100])
    with pytest.raises(DigestMismatch) as caught:
        reg.pull("a")
    assert caught.value.path.startswith(f"{WEIGHTS} (bytes ")


def test_a_tampered_piece_in_the_cache_is_fetched_again(store_url, lora):
    reg = Registry.open(store_url)
    reg.push(lora(seed=1), "a")
    weights = reg.pull("a") / WEIGHTS
    good = weights.read_bytes()
    weights.chmod(0o644)
    damaged = bytearray(good)
    damaged[-1] ^= 0xFF  # the last, short piece
    weights.write_bytes(bytes(damaged))
    reg.pull("a")
    assert reg.pull_stats.refetched == 1 and weights.read_bytes() == good


def test_pieces_that_do_not_fit_the_size_are_a_damaged_manifest(store_url, lora):
    m = Registry.open(store_url).push(lora(seed=1), "a").manifest
    data = m.to_dict()
    weights_entry_data = next(f for f in data["files"] if f["path"] == WEIGHTS)
    weights_entry_data["pieces"]["sha256"].pop()
    data["digest"] = digest_files(data["files"])
    with pytest.raises(DamagedRecord, match="pieces for"):
        Manifest.from_json(json.dumps(data).encode(), "a/1.json")
