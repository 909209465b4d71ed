"""The oci:// store beyond the contract suite: its tags, the model artifact other OCI
tools read, docker credentials, one-line failures, and the claim protocol that gives an
OCI registry create-if-absent and compare-and-swap (hub/stores/oci.py)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
import uuid

import pytest

from lorabay.hub import Registry
from lorabay.hub.errors import RegistryUnavailable, StoreAccessDenied
from lorabay.hub.store import PreconditionFailed
from lorabay.hub.stores.oci import (
    CLAIM_SECONDS,
    MODEL_ARTIFACT,
    OCI_MANIFEST,
    OCIStore,
    key_of,
    tag_of,
)

TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


def test_every_key_has_a_valid_tag_that_spells_it_back():
    keys = [
        "lorabay-registry.json",
        "adapters/_/a/1.json",
        "adapters/team/sum.v2/12.yanked",
        "aliases/_/a_b.json",
        "events/team/x/00000000001700000000-abcdef.json",
        "blobs/sha256/" + "ab" * 32,
        ".hidden/Upper/ü/-x",
        "a__b/_u/_2F",
    ]
    for key in keys:
        tag = tag_of(key)
        assert TAG_RE.match(tag), tag
        assert key_of(tag) == key
    # A prefix of a key spells a prefix of its tag: one listing finds a folder.
    assert tag_of("adapters/team/sum.v2/12.yanked").startswith(tag_of("adapters/team/"))
    assert tag_of("adapters/team/sum/1.json") == "adapters__team__sum__1.json"
    long = "events/" + "n" * 64 + "/" + "_" * 60 + "/1.json"
    assert len(tag_of(long)) <= 128 and TAG_RE.match(tag_of(long)) and key_of(tag_of(long)) is None
    assert tag_of(long) != tag_of(long[:-5] + "2.json")


@pytest.mark.oci
def test_a_version_is_a_model_artifact_oras_pulls(oci_registry_url, lora, tmp_path):
    """Another OCI client (the oras SDK's own pull) gets the adapter's files by tag."""
    import oras.client

    folder = lora(seed=4)
    reg = Registry.open(oci_registry_url)
    m = reg.push(folder, "team/sum", description="sums").manifest
    store = reg.store
    found, digest = store._get_manifest(store.repo, "adapters__team__sum__1.json")
    assert found["artifactType"] == MODEL_ARTIFACT and found["mediaType"] == OCI_MANIFEST
    assert found["config"]["mediaType"] == "application/vnd.cncf.model.config.v1+json"
    record, *files = found["layers"]
    assert record["mediaType"] == "application/vnd.lorabay.manifest.v1+json"
    assert json.loads(base64.b64decode(record["data"]))["digest"] == m.digest
    assert [(f["annotations"]["org.cncf.model.filepath"], f["digest"]) for f in files] == [
        (e["path"], f"sha256:{e['sha256']}") for e in m.files
    ]
    kinds = {f["annotations"]["org.opencontainers.image.title"]: f["mediaType"] for f in files}
    assert kinds["adapter_model.safetensors"] == "application/vnd.cncf.model.weight.v1.raw"
    assert kinds["adapter_config.json"] == "application/vnd.cncf.model.weight.config.v1.raw"
    assert kinds["README.md"] == "application/vnd.cncf.model.doc.v1.raw"

    client = oras.client.OrasClient(hostname=store.host, insecure=True)
    out = tmp_path / "oras-pull"
    client.pull(target=f"{store.host}/{store.repo}:adapters__team__sum__1.json", outdir=str(out))
    for entry in m.files:
        assert (out / entry["path"]).read_bytes() == (folder / entry["path"]).read_bytes()
    assert json.loads((out / "lorabay-manifest.json").read_bytes())["digest"] == m.digest


@pytest.mark.oci
def test_an_unreachable_registry_is_one_line_at_once():
    from lorabay.hub.ports import free_port

    port = free_port()  # nothing listens there
    started = time.monotonic()
    with pytest.raises(
        RegistryUnavailable, match=f"cannot reach http://127.0.0.1:{port}"
    ) as caught:
        Registry.open(f"oci://127.0.0.1:{port}/lorabay")
    assert time.monotonic() - started < 10
    assert "\n" not in str(caught.value) and "Traceback" not in str(caught.value)


@pytest.mark.oci
def test_a_repository_of_something_else_is_refused(oci_server):
    import requests

    repo = f"images/app{uuid.uuid4().hex[:8]}"
    base = f"http://{oci_server.host}/v2/{repo}"
    started = requests.post(f"{base}/blobs/uploads/")
    empty = "sha256:" + hashlib.sha256(b"{}").hexdigest()
    requests.put(started.headers["Location"] + f"&digest={empty}", data=b"{}")
    image = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
        "layers": [],
    }
    answer = requests.put(
        f"{base}/manifests/v1.0", data=json.dumps(image), headers={"Content-Type": OCI_MANIFEST}
    )
    assert answer.status_code == 201
    with pytest.raises(RegistryUnavailable, match="holds tags lorabay did not write"):
        Registry.open(oci_server.url(repo))


@pytest.mark.oci
def test_credentials_come_from_the_docker_config(tmp_path, monkeypatch, lora):
    """A registry that wants a login: refused in one line naming `docker login`; then the
    credentials of $DOCKER_CONFIG/config.json (inline, or from a credential helper)."""
    import os
    import stat

    from ociserver import running_oci_server

    config_dir = tmp_path / "docker"
    config_dir.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(config_dir))
    with running_oci_server(tmp_path / "auth-oci", htpasswd={"alice": "s3cret"}) as server:
        url = server.url("team/adapters")
        with pytest.raises(StoreAccessDenied) as caught:
            Registry.open(url)
        line = str(caught.value)
        assert f"docker login {server.host}" in line and str(config_dir) in line
        assert "\n" not in line

        wrong = base64.b64encode(b"alice:wrong").decode()
        (config_dir / "config.json").write_text(
            json.dumps({"auths": {server.host: {"auth": wrong}}})
        )
        with pytest.raises(StoreAccessDenied):
            Registry.open(url)

        good = base64.b64encode(b"alice:s3cret").decode()
        auths = {"auths": {f"https://{server.host}/v1/": {"auth": good}}}  # docker's old spelling
        (config_dir / "config.json").write_text(json.dumps(auths))
        reg = Registry.open(url)
        m = reg.push(lora(seed=1), "a").manifest
        assert reg.pull("a:1").name == m.digest_hex

        # The credential-helper protocol: `docker-credential-NAME get` answers the secret.
        helper = tmp_path / "bin" / "docker-credential-lorabaytest"
        helper.parent.mkdir()
        helper.write_text(
            "#!/bin/sh\nread host\n"
            'echo \'{"ServerURL": "\'$host\'", "Username": "alice", "Secret": "s3cret"}\'\n'
        )
        helper.chmod(helper.stat().st_mode | stat.S_IEXEC)
        monkeypatch.setenv("PATH", f"{helper.parent}{os.pathsep}{os.environ['PATH']}")
        helpers = {"credHelpers": {server.host: "lorabaytest"}}
        (config_dir / "config.json").write_text(json.dumps(helpers))
        assert Registry.open(url).resolve("a").digest == m.digest


# -- the claim protocol ---------------------------------------------------------------------


@pytest.mark.oci
def test_a_registry_another_process_creates_meanwhile_is_not_foreign(oci_registry_url):
    """Its marker may appear between the looks check_reachable takes (exists(), then the
    tags): seen with eight processes pushing the first versions to a new repository."""
    from lorabay.hub.store import open_store

    creator, late = open_store(oci_registry_url), open_store(oci_registry_url)
    creator.check_reachable()
    creator.initialize()
    late.exists = lambda: False  # it looked before the marker was there
    late.check_reachable()


def fresh_stores(url: str, count: int) -> list[OCIStore]:
    """Separate clients (own sessions), as separate processes would be."""
    from lorabay.hub.store import open_store

    stores = [open_store(url) for _ in range(count)]
    for store in stores:
        store.check_reachable()
    return stores


@pytest.mark.oci
def test_concurrent_creates_of_one_key_have_one_winner(oci_registry_url):
    stores = fresh_stores(oci_registry_url, 8)
    start = threading.Barrier(len(stores))
    results: dict[int, bool] = {}

    def create(index: int) -> None:
        start.wait()
        results[index] = stores[index].create("aliases/_/race.json", f"writer {index}".encode())

    threads = [threading.Thread(target=create, args=(i,)) for i in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    winners = [i for i, won in results.items() if won]
    assert len(results) == 8 and len(winners) == 1
    assert stores[0].read("aliases/_/race.json") == f"writer {winners[0]}".encode()


@pytest.mark.oci
def test_compare_and_swap_loses_no_update(oci_registry_url):
    """6 clients each add 1 to a counter 4 times by read + swap(etag), retrying on a lost
    race: 24 at the end, as on S3 with If-Match."""
    stores = fresh_stores(oci_registry_url, 6)
    key = "aliases/_/counter.json"
    stores[0].create(key, b"0")
    start = threading.Barrier(len(stores))
    lost = []

    def add(store: OCIStore) -> None:
        start.wait()
        for _ in range(4):
            while True:
                data, etag = store.read_tagged(key)
                try:
                    store.swap(key, str(int(data) + 1).encode(), etag)
                    break
                except PreconditionFailed:
                    lost.append(1)

    threads = [threading.Thread(target=add, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert stores[0].read(key) == b"24"
    with pytest.raises(PreconditionFailed):
        stores[0].swap(key, b"99", "sha256:" + "0" * 64)
    with pytest.raises(PreconditionFailed):
        stores[0].delete(key, "sha256:" + "0" * 64)
    stores[0].delete(key, stores[0].read_tagged(key)[1])
    assert stores[0].read(key) is None


@pytest.mark.oci
def test_a_held_claim_blocks_writers_until_it_is_released(oci_registry_url):
    holder, writer = fresh_stores(oci_registry_url, 2)
    done = threading.Event()
    result = []
    with holder._claimed("aliases/_/held.json"):
        thread = threading.Thread(
            target=lambda: (result.append(writer.create("aliases/_/held.json", b"x")), done.set())
        )
        thread.start()
        assert not done.wait(1.0), "a writer went ahead while another held the claim"
    assert done.wait(60) and result == [True]
    thread.join()


@pytest.mark.oci
def test_a_dead_writers_claim_expires_and_gc_removes_it(oci_registry_url):
    """A claim whose writer was killed is ignored once CLAIM_SECONDS old (by the
    registry's clock), and gc deletes it as a leftover."""
    (store,) = fresh_stores(oci_registry_url, 1)
    reg = Registry.open(oci_registry_url)
    reg.store.initialize()

    def dead_claim(key: str) -> str:
        prefix = hashlib.sha256(key.encode()).hexdigest()[:32]
        stamp = int((store.registry_now() - 2 * CLAIM_SECONDS) * 1000)
        tag = f"{prefix}.{stamp:013d}.deadbeef0000"
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": store._empty(store.locks),
            "layers": [],
        }
        store._put_manifest(store.locks, tag, manifest)
        return tag

    dead_claim("aliases/_/a.json")
    started = time.monotonic()
    assert store.create("aliases/_/a.json", b"{}")
    assert time.monotonic() - started < CLAIM_SECONDS / 2
    tag = dead_claim("aliases/_/b.json")
    assert [i.key for i in store.list_temporary()] == [f"locks/{tag}"]
    assert reg.gc(grace_seconds=0).temporary == [f"locks/{tag}"]
    assert store.list_temporary() == []
