"""Guarantee 4: bad input is refused before anything is written, with one line that
names the problem and the fix."""

import json
import os

import pytest

from lorabay.hub import Registry
from lorabay.hub.content import check_relative_path
from lorabay.hub.errors import (
    ConfigError,
    InvalidAdapter,
    InvalidReference,
    LorabayError,
    RegistryUnavailable,
)


def refuse(registry_url, tmp_path, folder, name="team/a", error=InvalidAdapter, **kwargs):
    registry_root = tmp_path / "registry"
    with pytest.raises(error) as caught:
        Registry.open(registry_url).push(folder, name, **kwargs)
    assert not registry_root.exists(), "a refused push wrote something"
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_no_adapter_config(registry_url, tmp_path, lora):
    folder = lora()
    (folder / "adapter_config.json").unlink()
    message = refuse(registry_url, tmp_path, folder)
    assert "has no adapter_config.json" in message and "save_pretrained" in message


def test_no_weights(registry_url, tmp_path, lora):
    folder = lora()
    (folder / "adapter_model.safetensors").unlink()
    assert "has no adapter_model.safetensors" in refuse(registry_url, tmp_path, folder)


def test_peft_type_other_than_lora(registry_url, tmp_path, lora):
    message = refuse(registry_url, tmp_path, lora(peft_type="IA3"))
    assert "peft_type is 'IA3'" in message and "LoRA" in message


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pkl", ".pth", ".ckpt"])
def test_pickled_weights(registry_url, tmp_path, lora, suffix):
    folder = lora()
    (folder / f"training_args{suffix}").write_bytes(b"\x80\x04pickle")
    message = refuse(registry_url, tmp_path, folder)
    assert f"training_args{suffix}" in message and "pickled" in message
    assert "safetensors" in message


def test_unknown_file_type(registry_url, tmp_path, lora):
    folder = lora()
    (folder / "run.sh").write_text("echo hi")
    assert "not an accepted adapter file" in refuse(registry_url, tmp_path, folder)


def test_shapes_that_disagree_with_r(registry_url, tmp_path, lora):
    message = refuse(registry_url, tmp_path, lora(r=4, config_r=8))
    assert "r=8" in message and "shape [4, 256]" in message


def test_symlinked_file(registry_url, tmp_path, lora):
    folder = lora()
    (tmp_path / "outside.json").write_text("{}")
    os.symlink(tmp_path / "outside.json", folder / "tokenizer_config.json")
    assert "symbolic link" in refuse(registry_url, tmp_path, folder)


def test_symlinked_folder(registry_url, tmp_path, lora):
    real = lora()
    link = tmp_path / "link"
    os.symlink(real, link)
    assert "symbolic link" in refuse(registry_url, tmp_path, link)


def test_symlinked_subfolder(registry_url, tmp_path, lora):
    folder = lora()
    os.symlink(tmp_path, folder / "sub")
    assert "symbolic link" in refuse(registry_url, tmp_path, folder)


@pytest.mark.parametrize("path", ["../evil.json", "/etc/passwd", "a/../b.json", "a//b", ""])
def test_unsafe_paths(path):
    # A folder walk cannot produce these; manifests and imports can, so they are checked.
    with pytest.raises(InvalidAdapter):
        check_relative_path(path)


def test_missing_folder(registry_url, tmp_path):
    assert "does not exist" in refuse(registry_url, tmp_path, tmp_path / "nope")


def test_size_bound(registry_url, tmp_path, lora, monkeypatch):
    monkeypatch.setenv("LORABAY_MAX_ADAPTER_BYTES", "1000")
    assert "over the limit" in refuse(registry_url, tmp_path, lora())


@pytest.mark.parametrize("name", ["Team/A", "a/b/c", "-x", "x" * 65])
def test_invalid_name(registry_url, tmp_path, lora, name):
    refuse(registry_url, tmp_path, lora(), name=name, error=InvalidReference)


def test_alias_all_digits(registry_url, tmp_path, lora):
    message = refuse(registry_url, tmp_path, lora(), aliases=["42"], error=InvalidReference)
    assert "all digits" in message


def test_alias_latest(registry_url, tmp_path, lora):
    refuse(registry_url, tmp_path, lora(), aliases=["latest"], error=ConfigError)


def test_bad_options_reported_together(registry_url, tmp_path, lora):
    message = refuse(
        registry_url,
        tmp_path,
        lora(),
        kind="policy",
        lineage={"method": "sft", "colour": "red"},
        error=ConfigError,
    )
    assert "2 problems" in message and "kind 'policy'" in message and "colour" in message


def test_bad_base(registry_url, tmp_path, lora):
    # A base that is not there is a wrong option, not a wrong adapter (hub/base_config.py).
    message = refuse(registry_url, tmp_path, lora(), error=ConfigError, base=tmp_path / "nobase")
    assert "--base" in message and "config.json" in message


def test_missing_registry_for_reading(tmp_path):
    reg = Registry.open(f"file://{tmp_path / 'nothing-here'}")
    for call in (lambda: reg.list(), lambda: reg.resolve("a"), lambda: reg.aliases("a")):
        with pytest.raises(
            RegistryUnavailable, match="no registry here yet.*push an adapter to create it"
        ):
            call()
    assert not (tmp_path / "nothing-here").exists()


def test_default_registry_reads_empty_until_first_push(lorabay_home, lora):
    reg = Registry.open()
    assert reg.list() == [] and reg.aliases("a") == {}
    assert not (lorabay_home / "registry").exists()
    reg.push(lora(), "a")
    assert [m.ref for m in Registry.open().list()] == ["a:1"]


def test_registry_path_that_is_something_else(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RegistryUnavailable, match="is a file"):
        Registry.open(f"file://{tmp_path / 'file'}")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "photo.jpg").write_text("x")
    with pytest.raises(RegistryUnavailable, match="not a lorabay registry"):
        Registry.open(f"file://{tmp_path / 'other'}")


def test_unsupported_url():
    with pytest.raises(LorabayError, match="unsupported registry URL"):
        Registry.open("ftp://host/x")


def test_refusal_leaves_an_existing_registry_unchanged(registry_url, tmp_path, lora):
    reg = Registry.open(registry_url)
    reg.push(lora(seed=1), "a")
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "registry").rglob("*"))
    bad = lora(seed=2)
    (bad / "x.bin").write_bytes(b"pickle")
    with pytest.raises(InvalidAdapter):
        reg.push(bad, "a")
    after = sorted(p.relative_to(tmp_path) for p in (tmp_path / "registry").rglob("*"))
    assert before == after


def test_unreadable_adapter_config(registry_url, tmp_path, lora):
    folder = lora()
    (folder / "adapter_config.json").write_text("{not json")
    assert "not valid JSON" in refuse(registry_url, tmp_path, folder)


def test_weights_not_safetensors(registry_url, tmp_path, lora):
    folder = lora()
    (folder / "adapter_model.safetensors").write_bytes(b"garbage" * 10)
    assert "safetensors" in refuse(registry_url, tmp_path, folder)


def test_hidden_files_are_skipped(registry_url, lora):
    folder = lora()
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x.bin").write_bytes(b"ignored")
    m = Registry.open(registry_url).push(folder, "a").manifest
    assert ".cache/x.bin" not in [f["path"] for f in m.files]


def test_unsafe_path_in_a_stored_manifest_is_refused_at_pull(
    registry_url, tmp_path, lora, lorabay_home
):
    reg = Registry.open(registry_url)
    m = reg.push(lora(), "a").manifest
    key = tmp_path / "registry" / "adapters" / "_" / "a" / "1.json"
    data = json.loads(key.read_text())
    data["files"][0]["path"] = "../../escape.json"
    from lorabay.hub.manifest import digest_files

    data["digest"] = digest_files(data["files"])
    key.chmod(0o644)
    key.write_text(json.dumps(data))
    fresh = Registry.open(registry_url)
    with pytest.raises(InvalidAdapter, match="'..'"):
        fresh.pull("a:1")
    # Nothing was written outside the cache (../../ from a cache folder is LORABAY_HOME), and
    # the cache holds no folder, finished or half, of what was refused.
    assert not list(tmp_path.rglob("escape.json"))
    cache = lorabay_home / "cache"
    left = [p.name for p in cache.iterdir() if p.name not in (".locks", ".meta")]
    assert m.version == 1 and left == [], left


def test_unreachable_s3_registry(monkeypatch):
    from lorabay.hub.ports import free_port

    port = free_port()  # nobody listens there
    monkeypatch.setenv("LORABAY_S3_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    with pytest.raises(RegistryUnavailable, match=f"cannot reach http://127.0.0.1:{port}"):
        Registry.open("s3://adapters/team")


@pytest.mark.s3
def test_missing_bucket_and_missing_prefix(s3_registry_url):
    with pytest.raises(RegistryUnavailable, match="bucket no-such-bucket does not exist"):
        Registry.open("s3://no-such-bucket/x")
    reg = Registry.open(s3_registry_url)  # opens; nothing is written
    with pytest.raises(RegistryUnavailable, match="no registry here yet"):
        reg.list()
    assert reg.store.list("") == []


@pytest.mark.s3
def test_wrong_s3_credentials(s3_registry_url, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(RegistryUnavailable, match="access denied"):
        Registry.open(s3_registry_url)
