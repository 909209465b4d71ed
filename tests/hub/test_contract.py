"""The registry contract: the same behaviour on every store (file:// and s3://)."""

import hashlib
import json

import pytest
from hubtools import overwrite

from lorabay.hub import AdapterNotFound, DigestMismatch, Registry, YankedWarning
from lorabay.hub.errors import YankedVersion
from lorabay.hub.manifest import Manifest


def keys(reg) -> set[str]:
    return {
        i.key
        for prefix in ("adapters/", "aliases/", "blobs/", "events/")
        for i in reg.store.list(prefix)
    }


def test_push_records_what_design_lists(store_url, lora, tiny_base):
    folder = lora(seed=1)
    reg = Registry.open(store_url)
    m = reg.push(
        folder,
        "team/sum",
        description="summaries",
        labels={"task": "summarize"},
        base=tiny_base,
    ).manifest
    assert (m.name, m.version, m.ref, m.kind) == ("team/sum", 1, "team/sum:1", "lora")
    for entry in m.files:
        data = (folder / entry["path"]).read_bytes()
        assert entry["size"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert [f["path"] for f in m.files] == sorted(f["path"] for f in m.files)
    assert m.peft == {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
        "modules_to_save": None,
    }
    config = (tiny_base / "config.json").read_bytes()
    assert m.base == {
        "id": "tiny-base",
        "revision": None,
        "architecture": "LlamaForCausalLM",
        "hidden_size": 256,
        "num_hidden_layers": 2,
        "vocab_size": 2048,
        "config_digest": "sha256:" + hashlib.sha256(config).hexdigest(),
        "source": None,  # a created toy base has no pulled source
    }
    assert m.lineage == {
        "method": None,
        "dataset_digest": None,
        "parent_digest": None,
        "hyperparameters": {},
        "metrics": {},
    }
    assert m.created_at.endswith("Z") and "@" in m.created_by
    assert (m.description, m.labels) == ("summaries", {"task": "summarize"})
    # A fresh client reads back the same immutable manifest.
    assert Registry.open(store_url).resolve("team/sum:1") == m
    assert Manifest.from_dict(json.loads(json.dumps(m.to_dict()))) == m


def test_base_from_base_model_name_or_path(store_url, lora, tiny_base):
    m = Registry.open(store_url).push(lora(base=str(tiny_base)), "a").manifest
    assert m.base["id"] == str(tiny_base) and m.base["hidden_size"] == 256


def test_lineage_and_kind_from_the_caller(store_url, lora):
    parent = "sha256:" + "ab" * 32
    lineage = {
        "method": "dpo",
        "dataset_digest": "sha256:" + "cd" * 32,
        "parent_digest": parent,
        "hyperparameters": {"lr": 1e-4, "beta": 0.1},
        "metrics": {"loss": 0.5},
    }
    m = Registry.open(store_url).push(lora(), "rm", lineage=lineage, kind="reward").manifest
    assert m.lineage == lineage and m.kind == "reward"


def test_identical_content_returns_the_existing_version(store_url, lora):
    reg = Registry.open(store_url)
    first = reg.push(lora(seed=1), "a").manifest
    reg.push(lora(seed=2), "a")
    before = keys(reg)
    again = reg.push(lora(seed=1), "a", description="different words").manifest
    assert again == first and keys(reg) == before
    # Same content under another name is a new version there (blobs are shared).
    other = reg.push(lora(seed=1), "b").manifest
    assert other.ref == "b:1" and other.digest == first.digest


def test_resolve_every_form(store_url, lora):
    reg = Registry.open(store_url)
    v1 = reg.push(lora(seed=1), "a", aliases=["prod"]).manifest
    v2 = reg.push(lora(seed=2), "a", aliases=["canary"]).manifest
    assert reg.resolve("a") == v2 and reg.resolve("a:latest") == v2
    assert reg.resolve("a:1") == v1 and reg.resolve("a:prod") == v1
    assert reg.resolve("a:canary") == v2
    assert reg.resolve(f"a@{v1.digest}") == v1
    for missing in ("a:3", "a:staging", "b", f"a@sha256:{'0' * 64}"):
        with pytest.raises(AdapterNotFound):
            reg.resolve(missing)


def test_aliases_move_and_go(store_url, lora):
    reg = Registry.open(store_url)
    reg.push(lora(seed=1), "a", aliases=["prod"])
    reg.push(lora(seed=2), "a")
    assert reg.aliases("a") == {"prod": 1}
    reg.set_alias("a", "prod", 2)
    reg.set_alias("a", "canary", 1)
    assert reg.aliases("a") == {"canary": 1, "prod": 2}
    assert Registry.open(store_url).resolve("a:prod").version == 2  # seen by another client
    reg.remove_alias("a", "canary")
    assert reg.aliases("a") == {"prod": 2}
    with pytest.raises(AdapterNotFound):
        reg.remove_alias("a", "canary")
    with pytest.raises(AdapterNotFound):
        reg.set_alias("a", "prod", 9)
    events = [(e["event"], e.get("alias"), e.get("version")) for e in reg.events("a")]
    assert events == [
        ("pushed", None, 1),
        ("aliased", "prod", 1),
        ("pushed", None, 2),
        ("aliased", "prod", 2),
        ("aliased", "canary", 1),
        ("unaliased", "canary", None),
    ]


def test_yank_hides_from_latest_and_list(store_url, lora):
    reg = Registry.open(store_url)
    v1 = reg.push(lora(seed=1), "a").manifest
    v2 = reg.push(lora(seed=2), "a").manifest
    reg.yank("a:2")
    assert reg.resolve("a") == v1
    assert [m.ref for m in reg.list()] == ["a:1"]
    assert [m.ref for m in reg.list(include_yanked=True)] == ["a:1", "a:2"]
    assert reg.is_yanked("a:2") and reg.yanked_versions("a") == {2}
    with pytest.warns(YankedWarning, match="a:2 is yanked"):
        path = reg.pull("a:2")
    assert (path / "adapter_model.safetensors").is_file()
    with pytest.warns(YankedWarning):
        reg.pull(f"a@{v2.digest}")
    with pytest.raises(YankedVersion, match="--undo"):
        reg.set_alias("a", "prod", 2)
    reg.yank("a:1")
    with pytest.raises(AdapterNotFound, match="every version is yanked"):
        reg.resolve("a")
    reg.yank("a:2", undo=True)
    assert reg.resolve("a") == v2
    assert [e["event"] for e in reg.events("a")][-3:] == ["yanked", "yanked", "unyanked"]


def test_pull_gives_the_verified_files(store_url, lora, tmp_path):
    folder = lora(seed=3)
    reg = Registry.open(store_url)
    m = reg.push(folder, "a").manifest
    path = reg.pull("a")
    assert path.name == m.digest_hex
    for entry in m.files:
        assert (path / entry["path"]).read_bytes() == (folder / entry["path"]).read_bytes()
    assert reg.pull(m) == path and reg.pull_stats.fetched == 1
    to = reg.pull("a:1", to=tmp_path / "copy")
    assert sorted(p.name for p in to.iterdir()) == sorted(f["path"] for f in m.files)


def test_list_every_name(store_url, lora):
    reg = Registry.open(store_url)
    reg.push(lora(seed=1), "b")
    reg.push(lora(seed=2), "team/a")
    reg.push(lora(seed=3), "team/a")
    reg.push(lora(seed=4), "a")
    assert [m.ref for m in reg.list()] == ["a:1", "b:1", "team/a:1", "team/a:2"]
    assert [m.ref for m in reg.list("team/a")] == ["team/a:1", "team/a:2"]
    assert reg.names() == ["a", "b", "team/a"]


def test_verify_reports_every_mismatch(store_url, lora):
    reg = Registry.open(store_url)
    m1 = reg.push(lora(seed=1), "a").manifest
    m2 = reg.push(lora(seed=2), "b").manifest
    assert reg.verify() == []
    weights = {
        m.ref: next(f for f in m.files if f["path"].endswith(".safetensors")) for m in (m1, m2)
    }
    for entry in weights.values():
        overwrite(reg.store, f"blobs/sha256/{entry['sha256']}", b"tampered")
    problems = reg.verify()
    assert sorted(p.refs for p in problems) == [("a:1",), ("b:1",)]
    assert all(p.kind == "mismatch" and p.where == "adapter_model.safetensors" for p in problems)
    assert [p.refs for p in reg.verify("a:1")] == [("a:1",)]


def test_flipped_byte_fails_the_pull_and_caches_nothing(store_url, lora, lorabay_home):
    reg = Registry.open(store_url)
    m = reg.push(lora(seed=1), "a").manifest
    entry = next(f for f in m.files if f["path"] == "adapter_model.safetensors")
    key = f"blobs/sha256/{entry['sha256']}"
    data = bytearray(b"".join(reg.store.read_chunks(key)))
    data[len(data) // 2] ^= 0x01
    overwrite(reg.store, key, bytes(data))
    with pytest.raises(DigestMismatch) as caught:
        reg.pull("a")
    error = caught.value
    assert error.path == "adapter_model.safetensors"
    assert error.expected == "sha256:" + entry["sha256"]
    assert error.actual == "sha256:" + hashlib.sha256(data).hexdigest()
    assert entry["sha256"] in str(error) and error.actual in str(error)
    cache = lorabay_home / "cache"
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".locks")] == []


def test_tampered_cache_is_detected_and_fetched_again(store_url, lora):
    reg = Registry.open(store_url)
    m = reg.push(lora(seed=1), "a").manifest
    path = reg.pull("a")
    weights = path / "adapter_model.safetensors"
    weights.chmod(0o644)
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF
    weights.write_bytes(bytes(data))
    again = reg.pull("a")
    assert again == path and reg.pull_stats.refetched == 1
    entry = next(f for f in m.files if f["path"] == "adapter_model.safetensors")
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == entry["sha256"]
    (path / "extra.txt").write_text("added")
    reg.pull("a")
    assert not (path / "extra.txt").exists() and reg.pull_stats.refetched == 2


def test_gc_removes_only_unreferenced_old_blobs(store_url, lora, tmp_path):
    reg = Registry.open(store_url)
    m = reg.push(lora(seed=1), "a").manifest
    orphan = tmp_path / "orphan.json"
    orphan.write_text('{"x": 1}')
    sha = hashlib.sha256(orphan.read_bytes()).hexdigest()
    reg.store.put_file(f"blobs/sha256/{sha}", orphan, sha)
    assert reg.gc(grace_seconds=3600).blobs == []  # too young
    report = reg.gc(grace_seconds=0, dry_run=True)
    assert report.blobs == [f"sha256:{sha}"] and reg.store.has(f"blobs/sha256/{sha}")
    assert reg.gc(grace_seconds=0).blobs == [f"sha256:{sha}"]
    assert not reg.store.has(f"blobs/sha256/{sha}")
    assert reg.verify() == [] and reg.pull("a").name == m.digest_hex


def test_check_against_a_base(store_url, lora, tiny_base, tmp_path):
    reg = Registry.open(store_url)
    reg.push(lora(seed=1, r=4, targets=("q_proj", "k_proj")), "fits")
    assert reg.check("fits", tiny_base) == []
    assert reg.check("fits", tiny_base, max_rank=2) == [
        "rank 4 is above the maximum 2 (--max-lora-rank)"
    ]
    # A base with other sizes: every reason, not only the first.
    other = tmp_path / "other-base"
    other.mkdir()
    config = json.loads((tiny_base / "config.json").read_text())
    config.update(hidden_size=512, num_hidden_layers=4, architectures=["MistralForCausalLM"])
    (other / "config.json").write_text(json.dumps(config))
    reg.push(lora(seed=2, base=str(tiny_base)), "recorded")
    reasons = reg.check("recorded", other)
    assert any(r.startswith("architecture") for r in reasons)
    assert any(r.startswith("hidden size") for r in reasons)
    assert any(r.startswith("layer count") for r in reasons)


def test_check_finds_missing_modules_and_shapes(store_url, lora, tiny_base):
    reg = Registry.open(store_url)
    reg.push(lora(layers=3), "deep")
    assert (
        "module model.layers.2.self_attn.q_proj (from the adapter) is not in the base"
        in reg.check("deep", tiny_base)
    )
    folder = lora()
    config = json.loads((folder / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", "w_gate"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    reg.push(folder, "odd")
    assert "target module 'w_gate' is not in the base" in reg.check("odd", tiny_base)


def test_pull_of_a_yanked_alias_target_still_works(store_url, lora):
    folder = lora(seed=1)
    reg = Registry.open(store_url)
    m = reg.push(folder, "a", aliases=["prod"]).manifest
    reg.yank("a:1")
    with pytest.warns(YankedWarning, match="a:1 is yanked"):
        path = reg.pull("a:prod")  # an alias names the version exactly: pulled, said aloud
    assert path.name == m.digest_hex
    for entry in m.files:
        assert (path / entry["path"]).read_bytes() == (folder / entry["path"]).read_bytes()


def test_verify_reports_a_damaged_manifest(store_url, lora):
    reg = Registry.open(store_url)
    reg.push(lora(seed=1), "a")
    reg.push(lora(seed=2), "a")
    assert reg.list()  # read (and, for a remote store, kept on this machine)
    overwrite(reg.store, "adapters/_/a/2.json", b'{"name": "a", "version": 2')
    problems = reg.verify()
    assert [(p.kind, p.where) for p in problems] == [("damaged", "adapters/_/a/2.json")]
    assert "damaged" in problems[0].message


def test_concurrent_first_pulls_in_one_process_fetch_once(store_url, lora):
    """The gateway's case: many requests for a new adapter at once, one process, threads."""
    from concurrent.futures import ThreadPoolExecutor

    reg = Registry.open(store_url)
    m = reg.push(lora(seed=9), "a").manifest
    with ThreadPoolExecutor(8) as pool:
        paths = set(pool.map(lambda _: reg.pull("a"), range(8)))
    assert paths == {reg.pull(m)}
    assert reg.pull_stats.fetched == 1


def test_push_returns_what_it_did_even_with_threads_sharing_a_registry(store_url, lora):
    """The gateway and trainers share one Registry across threads: what a push did is its
    return value (Registry.last_push_created, read afterwards, mixed pushes up)."""
    from concurrent.futures import ThreadPoolExecutor

    from lorabay.hub import Pushed

    reg = Registry.open(store_url)
    first = reg.push(lora(seed=1), "a")
    assert isinstance(first, Pushed) and first.created and first.manifest.version == 1
    assert not hasattr(reg, "last_push_created")
    folders = [lora(seed=1), lora(seed=2), lora(seed=1), lora(seed=3)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda f: reg.push(f, "a"), folders))
    assert [r.created for r in results] == [False, True, False, True]
    assert {r.manifest.version for r in results} == {1, 2, 3}
