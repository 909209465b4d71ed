"""hf:// import and export through huggingface_hub.

The Hugging Face Hub cannot be reached from here, so:
- import reads a snapshot laid out exactly as huggingface_hub's cache lays it out
  (blobs/, snapshots/<commit>/ links, refs/main) with HF_HUB_OFFLINE=1: the real
  ``snapshot_download`` resolves it;
- export runs huggingface_hub's real upload code (``create_repo`` + ``create_commit``:
  preupload, the LFS batch API and upload for the weights, then the NDJSON commit) with
  ONLY its HTTP layer replaced, through huggingface_hub's own ``set_client_factory``, by an
  in-process fake of the Hub endpoints it calls. The fake answers as the Hub does: the
  weights (binary) travel by LFS, small text files inline in the commit; it keeps what
  was uploaded and committed, so the test checks the bytes. Xet is switched off: its
  client (hf_xet) is native code talking to the Hub's own storage servers, which cannot
  be faked in-process; without it huggingface_hub takes the LFS path.
"""

import base64
import hashlib
import json
import os
from pathlib import Path

import httpx2
import pytest

from lorabay.hub import AdapterNotFound, Registry
from lorabay.hub.errors import ConfigError, HubFailed
from lorabay.hub.hf import MANIFEST_FILE, export_to_hf, import_from_hf

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_SUFFIXES = (".safetensors", ".bin", ".gguf")  # binary: the Hub stores them by LFS


def lay_out_hf_cache(
    folder: Path, repo_id: str, commit: str = COMMIT, extra: dict | None = None
) -> Path:
    """Copy ``folder`` into the HF cache as huggingface_hub stores a downloaded snapshot: a
    blob per file, named by the etag the Hub serves it under (an LFS file's sha256, a small
    file's git blob sha1), and the snapshot's links to them."""
    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    files = {p.name: p.read_bytes() for p in folder.iterdir()} | (extra or {})
    for name, data in files.items():
        if name.endswith(LFS_SUFFIXES):
            etag = hashlib.sha256(data).hexdigest()
        else:
            etag = hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()
        blob = repo / "blobs" / etag
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / name)
    return snapshot


def test_import_from_a_cached_snapshot(registry_url, lora):
    folder = lora(seed=5)
    lay_out_hf_cache(folder, "acme/sum-lora", extra={"training_args.bin": b"\x80pickle"})
    reg = Registry.open(registry_url)
    m = import_from_hf(reg, "hf://acme/sum-lora", "team/sum", aliases=["prod"]).manifest
    assert m.ref == "team/sum:1" and reg.aliases("team/sum") == {"prod": 1}
    assert m.labels["source"] == f"hf://acme/sum-lora@{COMMIT}"
    # The pickled file was not taken (allow_patterns), the rest is byte for byte the same.
    assert sorted(f["path"] for f in m.files) == sorted(p.name for p in folder.iterdir())
    pulled = reg.pull(m)
    for entry in m.files:
        assert (pulled / entry["path"]).read_bytes() == (folder / entry["path"]).read_bytes()
    # Same snapshot by revision: identical content, nothing new.
    again = import_from_hf(reg, f"hf://acme/sum-lora@{COMMIT}", "team/sum")
    assert again.manifest.version == 1 and not again.created


def test_import_refusals(registry_url, lora):
    reg = Registry.open(registry_url)
    with pytest.raises(HubFailed, match="not in the local Hugging Face cache") as caught:
        import_from_hf(reg, "hf://acme/absent", "x")
    assert "--registry" not in str(caught.value) and "HF_HUB_OFFLINE" in str(caught.value)
    with pytest.raises(ConfigError, match="hf://ORG/REPO"):
        import_from_hf(reg, "acme/absent", "x")
    folder = lora(peft_type="IA3")
    lay_out_hf_cache(folder, "acme/ia3", commit="f" * 40)
    with pytest.raises(Exception, match="only LORA"):
        import_from_hf(reg, "hf://acme/ia3", "x")


class FakeHub:
    """The Hub endpoints ``create_repo`` and ``create_commit`` call, answered in-process:
    repos/create, validate-yaml (README metadata), preupload ("lfs" for binary files, as
    the Hub answers, else "regular": those travel base64 in the commit body), the LFS batch
    API, the upload and verify it points to, and commit (NDJSON)."""

    def __init__(self):
        self.repos: set[str] = set()
        self.commits: list[dict] = []
        self.lfs: dict[str, bytes] = {}  # oid (sha256 hex) -> the bytes uploaded
        self.unexpected: list[str] = []
        self.fail: tuple[int, dict] | None = None  # answer every request so, when set
        self.unreachable = False  # raise a connection error instead

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        if self.unreachable:
            raise httpx2.ConnectError("[Errno 111] Connection refused", request=request)
        if self.fail is not None:
            status, headers = self.fail
            return httpx2.Response(status, headers=headers, json={"error": "refused by the test"})
        if request.method == "POST" and path == "/api/repos/create":
            body = json.loads(request.content)
            repo_id = (
                f"{body['organization']}/{body['name']}"
                if body.get("organization")
                else body["name"]
            )
            self.repos.add(repo_id)
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{repo_id}"})
        if request.method == "POST" and path == "/api/validate-yaml":  # README.md metadata
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if request.method == "POST" and "/preupload/" in path:
            files = json.loads(request.content)["files"]
            return httpx2.Response(
                200,
                json={
                    "files": [
                        {
                            "path": f["path"],
                            "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                            "shouldIgnore": False,
                        }
                        for f in files
                    ]
                },
            )
        if request.method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
            body = json.loads(request.content)
            assert body["operation"] == "upload" and body["hash_algo"] == "sha256"
            objects = [
                {
                    "oid": o["oid"],
                    "size": o["size"],
                    "actions": {
                        "upload": {"href": f"https://hub-lfs.test/upload/{o['oid']}"},
                        "verify": {"href": "https://huggingface.co/lfs/verify"},
                    },
                }
                for o in body["objects"]
            ]
            return httpx2.Response(200, json={"transfer": "basic", "objects": objects})
        if request.method == "PUT" and path.startswith("/upload/"):
            self.lfs[path.removeprefix("/upload/")] = request.read()
            return httpx2.Response(200)
        if request.method == "POST" and path == "/lfs/verify":
            body = json.loads(request.content)
            uploaded = self.lfs.get(body["oid"])
            ok = uploaded is not None and len(uploaded) == body["size"]
            return httpx2.Response(200 if ok else 404, json={})
        if request.method == "POST" and "/commit/" in path:
            lines = [json.loads(line) for line in request.content.decode().splitlines() if line]
            header = next(line["value"] for line in lines if line["key"] == "header")
            files = {
                line["value"]["path"]: base64.b64decode(line["value"]["content"])
                for line in lines
                if line["key"] == "file"
            }
            for line in lines:  # an LFS file is named by its oid: the bytes uploaded before
                if line["key"] == "lfsFile":
                    lfs = line["value"]
                    assert lfs["algo"] == "sha256" and len(self.lfs[lfs["oid"]]) == lfs["size"]
                    files[lfs["path"]] = self.lfs[lfs["oid"]]
            repo_id = path.split("/api/models/", 1)[1].split("/commit/", 1)[0]
            self.commits.append({"repo": repo_id, "message": header["summary"], "files": files})
            return httpx2.Response(
                200,
                json={
                    "commitUrl": f"https://huggingface.co/{repo_id}/commit/{'e' * 40}",
                    "commitOid": "e" * 40,
                },
            )
        self.unexpected.append(f"{request.method} {path}")
        return httpx2.Response(404, json={"error": "not faked"})


@pytest.fixture
def fake_hub(monkeypatch):
    from huggingface_hub import constants, set_client_factory
    from huggingface_hub.utils._http import default_client_factory

    hub = FakeHub()
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the LFS path (docstring)
    set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub)))
    try:
        yield hub
    finally:
        set_client_factory(default_client_factory)


def test_export_uploads_the_verified_files_and_the_manifest(registry_url, lora, fake_hub):
    reg = Registry.open(registry_url)
    lineage = {"method": "sft", "hyperparameters": {"lr": 0.001}}
    m = reg.push(lora(seed=6), "team/sum", lineage=lineage, description="summaries").manifest
    url = export_to_hf(reg, "team/sum:1", "hf://acme/sum-lora")
    assert url.startswith("https://huggingface.co/acme/sum-lora/commit/")
    assert fake_hub.unexpected == [] and fake_hub.repos == {"acme/sum-lora"}
    (commit,) = fake_hub.commits
    assert commit["repo"] == "acme/sum-lora" and m.digest in commit["message"]
    files = commit["files"]
    assert set(files) == {f["path"] for f in m.files} | {MANIFEST_FILE}
    for entry in m.files:
        assert hashlib.sha256(files[entry["path"]]).hexdigest() == entry["sha256"]
    # The weights went the way real weights go, by LFS under their sha256, and only they.
    (weights,) = [f for f in m.files if f["path"] == "adapter_model.safetensors"]
    assert set(fake_hub.lfs) == {weights["sha256"]}
    assert json.loads(files[MANIFEST_FILE])["digest"] == m.digest

    # Round trip: import what was exported; lineage and description come back,
    # and lorabay-manifest.json is not one of the adapter's files.
    snapshot_files = {name: data for name, data in files.items()}
    export_dir = Path(reg.pull(m))
    lay_out_hf_cache(
        export_dir,
        "acme/sum-lora",
        commit="a" * 40,
        extra={MANIFEST_FILE: snapshot_files[MANIFEST_FILE]},
    )
    other = Registry.open(registry_url.replace("registry", "other-registry"))
    back = import_from_hf(other, "hf://acme/sum-lora", "sum").manifest
    assert back.digest == m.digest and back.lineage["method"] == "sft"
    assert back.description == "summaries"


def test_export_cli(registry_url, lora, fake_hub):
    from click.testing import CliRunner

    from lorabay.cli.main import cli

    Registry.open(registry_url).push(lora(seed=7), "a")
    result = CliRunner().invoke(
        cli, ["hub", "export", "a", "hf://acme/a", "--registry", registry_url]
    )
    assert result.exit_code == 0, result.output
    # The commit URL on stdout; the weights' upload bar (huggingface_hub's) goes to stderr.
    assert result.stdout.strip().startswith("https://huggingface.co/acme/a/commit/")
    assert "adapter_model.safetensors" not in result.stdout


def test_import_cli(registry_url, lora):
    from click.testing import CliRunner

    from lorabay.cli.main import cli

    lay_out_hf_cache(lora(seed=8), "acme/cli-lora", commit="b" * 40)
    args = ["hub", "import", "hf://acme/cli-lora", "cli", "--registry", registry_url, "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["ref"] == "cli:1" and data["labels"]["source"] == f"hf://acme/cli-lora@{'b' * 40}"


@pytest.mark.parametrize(
    "status, fragment, hint",
    [
        (401, "not authorized (401)", "hf auth login"),
        (403, "forbidden (403)", "a token with write access"),
        (429, "rate limited (429)", "retry"),
        (500, "the Hub failed the request (500)", "status.huggingface.co"),
        (400, "the Hub refused the request (400)", ""),
    ],
)
def test_export_failures_are_their_own_one_line(
    registry_url, lora, fake_hub, status, fragment, hint
):
    reg = Registry.open(registry_url)
    reg.push(lora(seed=9), "a")
    fake_hub.fail = (status, {})
    with pytest.raises(HubFailed) as caught:
        export_to_hf(reg, "a:1", "hf://acme/a")
    message = str(caught.value)
    assert message.startswith("Hugging Face Hub, hf://acme/a: ") and fragment in message
    assert hint in message and "--registry" not in message and "\n" not in message
    assert caught.value.status == status


def test_export_to_an_unreachable_hub(registry_url, lora, fake_hub):
    reg = Registry.open(registry_url)
    reg.push(lora(seed=9), "a")
    fake_hub.unreachable = True
    with pytest.raises(HubFailed, match="cannot reach the Hub .*ConnectError"):
        export_to_hf(reg, "a:1", "hf://acme/a")


@pytest.fixture
def online(monkeypatch, fake_hub):
    """huggingface_hub online (the fake Hub answers), for the import's own requests."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return fake_hub


@pytest.mark.parametrize(
    "status, headers, error, fragment",
    [
        (403, {"X-Error-Code": "GatedRepo"}, HubFailed, "gated"),
        (401, {"X-Error-Code": "RepoNotFound"}, AdapterNotFound, "a private one needs a token"),
        (404, {"X-Error-Code": "RevisionNotFound"}, AdapterNotFound, "no such revision"),
        (429, {}, HubFailed, "rate limited (429)"),
    ],
)
def test_import_failures_are_their_own_one_line(
    registry_url, online, status, headers, error, fragment
):
    online.fail = (status, headers)
    with pytest.raises(error) as caught:
        import_from_hf(Registry.open(registry_url), "hf://acme/never-cached", "x")
    message = str(caught.value)
    assert fragment in message and "--registry" not in message and "\n" not in message


def test_import_cli_failure_is_one_line(registry_url, online):
    from click.testing import CliRunner

    from lorabay.cli.main import cli

    online.fail = (403, {"X-Error-Code": "GatedRepo"})
    args = ["hub", "import", "hf://acme/gated", "x", "--registry", registry_url]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "is gated" in lines[0] and "accept its conditions" in lines[0]
