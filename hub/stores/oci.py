"""The ``oci://HOST[:PORT]/REPOSITORY`` store: a lorabay registry inside any OCI registry.

Everything lives in one repository, through the distribution API (blobs, manifests, tags):

- a blob ``blobs/sha256/<hex>`` is the OCI blob ``sha256:<hex>`` itself (OCI blobs are
  content addressed the same way), plus a small *index tag* whose manifest names it as its
  layer: the distribution API cannot list a repository's blobs, only its tags, and the
  index also carries the blob's age for gc (``touch`` rewrites it) and keeps the blob from
  the registry's own garbage collector while no version names it yet;
- every other key is a tag whose manifest holds the record: its bytes are a blob (the
  API checks that every layer exists) and, up to ``EMBED_BYTES``, also inline in the layer
  descriptor's ``data`` field, so a read is one GET;
- an adapter version (``adapters/<ns>/<name>/<version>.json``) is a ModelPack-style model
  artifact: ``artifactType`` application/vnd.cncf.model.manifest.v1+json, a ModelPack
  config, lorabay's manifest as its first layer, then every file of the adapter as a raw
  weight / weight-config / doc layer with ``org.opencontainers.image.title`` and
  ``org.cncf.model.filepath`` set, so ``oras pull HOST/REPOSITORY:TAG`` gives the folder.

Tags are the keys, spelled in the tag alphabet (``tag_of``): ``/`` is ``__``, ``_`` is
``_u``, any other byte outside ``[a-z0-9.-]`` is ``_XX``; a key longer than a tag may be
keeps 80 characters of that and a hash (its key in the manifest's annotations). So
``team/sum`` version 3 is the tag ``adapters__team__sum__3.json``.

Conditional writes without conditional requests
-----------------------------------------------
The distribution API has no ``If-Match``: a tag PUT always wins. create, swap and a delete
with an etag (the etag is the manifest's digest) therefore run under a *claim*, a mutual
exclusion built from plain writes and listings in the sibling repository
``REPOSITORY/locks`` (Lamport's write-then-read idea, as in his fast mutual exclusion):

1. write a claim tag ``<hash of key>.<stamp>.<random>`` (``stamp``: the registry's clock);
2. list that repository's tags: if no other live claim for the key is there, the claim is
   held. Otherwise the oldest claim keeps waiting (re-listing), the others delete theirs
   and back off at random;
3. with it held: read the tag, compare, write; then delete the claim.

Why two writers never hold one claim: each lists after its own write completed. If A's
listing did not show B's claim, B's write completed after A's listing began, so B's
listing, later still, shows A's claim (kept while A holds it): B does not hold it. This
needs what the tag list of one repository gives on distribution (and on registries backed
by strongly consistent storage): a listing shows every tag whose PUT completed before it.
A claim whose writer died expires ``CLAIM_SECONDS`` after its stamp, by the registry's
clock as every client reads it from the ``Date`` of its answers (so the clients' own
clocks need not agree); its holder writes only within the first half of that time, or
gives the claim up and starts again. A writer killed while holding one delays the next
writer of that key by at most ``CLAIM_SECONDS``; ``gc`` deletes such leftovers.

Each manifest carries a random nonce, so no two tags ever share a manifest digest: a delete
by digest (distribution deletes tags only that way, and removes every tag of that digest)
removes exactly one key, and a swap deletes the manifest it replaced.

Limits, said plainly: ``list`` is one tag listing of the repository (distribution has no
prefix filter), reports real sizes and ages for blobs only (records: 0, and no etags, so
packs.py is off for this store); ``list_temporary`` sees expired claims, not unfinished blob
uploads (the registry purges those itself); a version whose push met a ``gc --grace 0``
that had just deleted one of its blobs is written without its file layers (lorabay serves
it all the same, from the blobs put back).

Hosts: plain HTTP for loopback (127.0.0.0/8, ::1, localhost) or with
``LORABAY_OCI_PLAIN_HTTP=1``, else HTTPS (``REQUESTS_CA_BUNDLE`` for a private CA).
Credentials: the docker credential file (``$DOCKER_CONFIG/config.json``, else
``~/.docker/config.json``), its ``auths``, ``credHelpers`` and ``credsStore``, as
``docker login`` / ``oras login`` write it, through the ``oras`` SDK's auth (basic or
bearer tokens).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import random
import re
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from urllib.parse import urlparse

from lorabay.hub.errors import (
    ConfigError,
    Conflict,
    DamagedRecord,
    InvalidAdapter,
    RegistryUnavailable,
    StoreAccessDenied,
    StoreFailed,
    StoreThrottled,
)
from lorabay.hub.store import MARKER, MARKER_CONTENT, ObjectInfo, PreconditionFailed

log = logging.getLogger("lorabay.hub")

CHUNK = 1 << 20
UPLOAD_PART = 64 << 20  # blobs bigger than this go up in PATCH parts of this size
EMBED_BYTES = 16 << 10  # records up to this size are also inline in their manifest
CLAIM_SECONDS = 30.0
CLAIM_WAIT = 120.0  # give up on a claim after this long (Conflict)
TAG_MAX = 128
ATTEMPTS = 3  # per request: connection errors, 429 and 5xx are retried

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
EMPTY_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY = b"{}"
RECORD_ARTIFACT = "application/vnd.lorabay.record.v1"
RECORD_LAYER = "application/vnd.lorabay.record.v1"
BLOB_ARTIFACT = "application/vnd.lorabay.blob-index.v1"
CLAIM_ARTIFACT = "application/vnd.lorabay.claim.v1"
MODEL_ARTIFACT = "application/vnd.cncf.model.manifest.v1+json"
MODEL_CONFIG = "application/vnd.cncf.model.config.v1+json"
ADAPTER_MANIFEST_LAYER = "application/vnd.lorabay.manifest.v1+json"
WEIGHT = "application/vnd.cncf.model.weight.v1.raw"
WEIGHT_CONFIG = "application/vnd.cncf.model.weight.config.v1.raw"
DOC = "application/vnd.cncf.model.doc.v1.raw"
RECORD_LAYERS = (RECORD_LAYER, ADAPTER_MANIFEST_LAYER)

KEY_ANNOTATION = "org.lorabay.key"
TOUCHED_ANNOTATION = "org.lorabay.touched"  # a blob index: seconds since the epoch
NONCE_ANNOTATION = "org.lorabay.nonce"
RECORD_ANNOTATION = "org.lorabay.record"  # a small record, base64, inline
TITLE = "org.opencontainers.image.title"
FILEPATH = "org.cncf.model.filepath"

_REPOSITORY_RE = re.compile(
    r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$"
)
_VERSION_KEY_RE = re.compile(r"^adapters/[^/]+/[^/]+/[0-9]+\.json$")
_BLOB_KEY_RE = re.compile(r"^blobs/sha256/([0-9a-f]{64})$")
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-")
_HEX = "0123456789ABCDEF"


# -- keys and tags ----------------------------------------------------------------------


def tag_of(key: str) -> str:
    """The tag that holds ``key``: a prefix-free spelling in the tag alphabet
    ``[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`` (module docstring)."""
    out = []
    for index, char in enumerate(key):
        if char == "/":
            out.append("__")
        elif char == "_":
            out.append("_u")
        elif char in _SAFE and not (index == 0 and char in ".-"):
            out.append(char)
        else:
            out.extend(f"_{byte:02X}" for byte in char.encode())
    tag = "".join(out)
    if len(tag) > TAG_MAX:  # 'Z' never appears in a spelled key: it marks a shortened one
        tag = tag[:80] + "Z" + hashlib.sha256(key.encode()).hexdigest()[:40]
    return tag


def key_of(tag: str) -> str | None:
    """The key ``tag`` spells; None for a shortened key (read its annotation) or a tag
    lorabay did not write."""
    if "Z" in tag:
        return None
    out = bytearray()
    i = 0
    while i < len(tag):
        char = tag[i]
        if char != "_":
            if char not in _SAFE:
                return None
            out += char.encode()
            i += 1
            continue
        nxt = tag[i + 1 : i + 2]
        if nxt == "_":
            out += b"/"
            i += 2
        elif nxt == "u":
            out += b"_"
            i += 2
        elif len(tag) >= i + 3 and tag[i + 1] in _HEX and tag[i + 2] in _HEX:
            out.append(int(tag[i + 1 : i + 3], 16))
            i += 3
        else:
            return None
    try:
        return out.decode()
    except UnicodeDecodeError:
        return None


def sha256_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def encode_manifest(manifest: dict) -> bytes:
    return json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode()


def media_type_of(path: str) -> str:
    """A ModelPack layer type for an adapter file."""
    if path.endswith(".safetensors"):
        return WEIGHT
    if path.endswith((".md", ".txt")) and not path.endswith("merges.txt"):
        return DOC
    return WEIGHT_CONFIG  # adapter_config.json, tokenizer files, chat templates


def is_loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    name = name.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


# -- credentials --------------------------------------------------------------------------


def docker_config_path() -> Path:
    folder = os.environ.get("DOCKER_CONFIG")
    return (Path(folder) if folder else Path.home() / ".docker") / "config.json"


def read_docker_config() -> dict:
    """The credential part of the docker config file docker itself would use (DOCKER_CONFIG
    replaces ~/.docker, it adds nothing to it), with ``auths`` keyed by host[:port] (docker
    writes ``https://host/v1/`` for some)."""
    path = docker_config_path()
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return {"auths": {}, "credHelpers": {}, "credsStore": None}
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"cannot read the docker credential file {path}: {error}",
            "fix it or log in again with `docker login HOST`",
        ) from None
    auths = {}
    for host, entry in (config.get("auths") or {}).items():
        bare = re.sub(r"^https?://", "", str(host)).split("/", 1)[0]
        auths[bare] = entry
    return {
        "auths": auths,
        "credHelpers": dict(config.get("credHelpers") or {}),
        "credsStore": config.get("credsStore"),
    }


# -- the store ----------------------------------------------------------------------------


@dataclass
class Claim:
    tag: str
    digest: str
    started: float  # time.monotonic() before the claim was written

    def check(self) -> None:
        """Write only within the first half of the claim's life (module docstring)."""
        if time.monotonic() - self.started > CLAIM_SECONDS / 2:
            raise ClaimAged()


class ClaimAged(Exception):
    """A claim got too old to write under (a slow registry): nothing was written; take it
    again."""


class OCIStore:
    concurrent_reads = 16
    remote = False  # no packs: a tag listing gives no etags (module docstring)

    def __init__(self, host: str, repository: str):
        from http.cookiejar import DefaultCookiePolicy

        import requests
        from requests.adapters import HTTPAdapter

        if not host:
            raise ConfigError("an oci:// registry URL names no host", "use oci://HOST[:PORT]/REPO")
        if not repository:
            raise ConfigError(
                f"oci://{host} names no repository", "use oci://HOST[:PORT]/REPOSITORY"
            )
        if not _REPOSITORY_RE.match(repository) or len(repository) > 200:
            raise ConfigError(
                f"oci://{host}/{repository}: {repository!r} is not a valid OCI repository name",
                "use lowercase letters, digits and . _ - separators, with / between parts, "
                "e.g. oci://ghcr.io/team/adapters",
            )
        self.host = host
        self.repo = repository
        self.locks = f"{repository}/locks"
        self.url = f"oci://{host}/{repository}"
        plain = is_loopback(host) or os.environ.get("LORABAY_OCI_PLAIN_HTTP") == "1"
        self.base = f"{'http' if plain else 'https'}://{host}/v2"
        self.session = requests.Session()
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=32)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        # Take no cookies: some registries (Harbor) set CSRF cookies for browsers.
        self.session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
        self._auth = None  # oras's TokenAuth, made at the first challenge
        self._auth_headers: dict[str, dict] = {}  # per repository: a token has one scope
        self._lock = threading.Lock()
        self._offset = 0.0  # the registry's clock minus ours, from the Date of its answers
        self._empty_in: set[str] = set()  # repositories known to hold the empty blob
        self._long_keys: dict[str, str] = {}  # shortened tag -> key (fixed by the hash)
        self._exists = False

    # -- requests --------------------------------------------------------------------
    def _request(
        self,
        method: str,
        repo: str | None,
        path: str,
        *,
        key: str = "",
        ok: tuple[int, ...] = (200,),
        absent: tuple[int, ...] = (),
        **kwargs,
    ):
        """One distribution API call with auth and bounded retries. Returns the response
        (status in ``ok`` or ``absent``); every other answer is one line (StoreFailed and
        its kinds, RegistryUnavailable when the host cannot be reached)."""
        import requests

        url = path if path.startswith("http") else f"{self.base}{'/' + repo if repo else ''}{path}"
        headers = dict(kwargs.pop("headers", None) or {})
        kwargs.setdefault("timeout", (3, 60))
        response = None
        for attempt in range(ATTEMPTS):
            try:
                response = self.session.request(
                    method, url, headers={**headers, **self._credentials_for(repo)}, **kwargs
                )
                if response.status_code == 401 and self._authenticate(response, repo):
                    response = self.session.request(
                        method, url, headers={**headers, **self._credentials_for(repo)}, **kwargs
                    )
            except requests.RequestException as error:
                if attempt + 1 < ATTEMPTS and not isinstance(error, requests.exceptions.SSLError):
                    time.sleep(0.2 * 3**attempt)
                    continue
                raise RegistryUnavailable(
                    self.url, f"cannot reach {self.base.rsplit('/v2', 1)[0]}: {short(error)}"
                ) from None
            self._note_clock(response)
            status = response.status_code
            if status in ok or status in absent:
                return response
            if (status == 429 or status >= 500) and attempt + 1 < ATTEMPTS:
                response.close()
                time.sleep(0.2 * 3**attempt)
                continue
            break
        raise self._error(method, repo, path, key, response)

    def _credentials_for(self, repo: str | None) -> dict:
        return self._auth_headers.get(repo or "") or self._auth_headers.get("*") or {}

    def _authenticate(self, response, repo: str | None) -> bool:
        """Answer a 401's challenge (Basic, or a Bearer token for the challenge's scope) with
        the docker config's credentials; True when there is something to retry with."""
        import oras.auth
        import oras.container
        from oras.auth.utils import parse_auth_header

        challenge = response.headers.get("Www-Authenticate", "")
        with self._lock:
            if self._auth is None:
                auth = oras.auth.get_auth_backend(
                    "token", self.session, insecure=self.base.startswith("http:")
                )
                # oras reads ~/.docker/config.json only; docker reads $DOCKER_CONFIG first.
                auth._auth_config = read_docker_config()
                auth.load_configs(oras.container.Container(self.repo, registry=self.host))
                self._auth = auth
            basic = getattr(self._auth, "_basic_auth", None)
            if challenge.lower().startswith("basic"):
                if not basic:
                    return False
                self._auth_headers["*"] = {"Authorization": f"Basic {basic}"}  # every repository
                return True
            if challenge.lower().startswith("bearer"):
                try:
                    token = self._auth.request_token(parse_auth_header(challenge))
                except Exception as error:  # noqa: BLE001 - the token service is unreachable
                    log.debug("token request failed: %s", error)
                    token = None
                if not token:
                    return False
                self._auth_headers[repo or ""] = {"Authorization": f"Bearer {token}"}
                return True
        return False

    def _error(self, method, repo, path, key, response) -> StoreFailed:
        status = response.status_code
        code, detail = "", ""
        try:
            first = (response.json().get("errors") or [{}])[0]
            code = str(first.get("code") or "")
            detail = str(first.get("message") or "")
            if first.get("detail") and isinstance(first["detail"], str | dict):
                detail += f" ({json.dumps(first['detail'])[:120]})"
        except (ValueError, AttributeError, IndexError, TypeError):
            detail = (response.text or "").strip().splitlines()[0][:200] if response.text else ""
        response.close()
        shown = urlparse(path).path.removeprefix("/v2") if path.startswith("http") else path
        where = f"{method} /v2/{repo + '/' if repo else ''}{shown.split('?')[0].lstrip('/')}"
        facts = (self.url, where, key, status, code, detail)
        if status in (401, 403):
            found = "no credentials for it were found" if not self._has_credentials() else ""
            return StoreAccessDenied(
                *facts,
                hint=f"the registry refused access{': ' + found if found else ''}; log in with "
                f"`docker login {self.host}` (lorabay reads {docker_config_path()}) and check "
                f"that the account may pull, push and delete in {self.repo}",
            )
        if status == 429 or status == 503:
            return StoreThrottled(
                *facts,
                hint=f"the registry is rate limiting (still after {ATTEMPTS} tries): retry later",
            )
        if status == 405 and method == "DELETE":
            return StoreFailed(
                *facts,
                hint="the registry does not allow deletes: enable them (distribution: "
                "storage.delete.enabled: true)",
            )
        if status >= 500:
            return StoreFailed(
                *facts, hint="the registry failed the request: retry, then check its logs"
            )
        return StoreFailed(*facts, hint="the registry refused the request; check its settings")

    def _has_credentials(self) -> bool:
        return bool(self._auth is not None and getattr(self._auth, "_basic_auth", None))

    def _note_clock(self, response) -> None:
        date = response.headers.get("Date")
        if date:
            with contextlib.suppress(TypeError, ValueError, IndexError):
                # A lower bound of the registry's time (Date is floored to the second).
                self._offset = parsedate_to_datetime(date).timestamp() - time.time()

    def registry_now(self) -> float:
        return time.time() + self._offset

    # -- manifests and blobs ---------------------------------------------------------
    def _head_manifest(self, repo: str, tag: str, key: str = "") -> str | None:
        response = self._request(
            "HEAD",
            repo,
            f"/manifests/{tag}",
            key=key,
            absent=(404,),
            headers={"Accept": OCI_MANIFEST},
        )
        if response.status_code == 404:
            return None
        digest = response.headers.get("Docker-Content-Digest")
        if digest is None:  # not every registry says it on a HEAD: hash the manifest
            found = self._get_manifest(repo, tag, key)
            return None if found is None else found[1]
        return digest

    def _get_manifest(self, repo: str, tag: str, key: str = "") -> tuple[dict, str] | None:
        response = self._request(
            "GET",
            repo,
            f"/manifests/{tag}",
            key=key,
            absent=(404,),
            headers={"Accept": OCI_MANIFEST},
        )
        if response.status_code == 404:
            return None
        body = response.content
        digest = sha256_of(body)
        said = response.headers.get("Docker-Content-Digest")
        if said and said != digest:
            raise DamagedRecord(
                f"record {key or tag}", f"manifest digest {said} is not its content's"
            )
        try:
            manifest = json.loads(body)
            if not isinstance(manifest, dict):
                raise ValueError("not a JSON object")
        except ValueError as error:
            raise DamagedRecord(
                f"record {key or tag}", f"its manifest is not JSON: {error}"
            ) from None
        return manifest, digest

    def _put_manifest(self, repo: str, tag: str, manifest: dict, key: str = "") -> str:
        body = encode_manifest(manifest)
        self._request(
            "PUT",
            repo,
            f"/manifests/{tag}",
            key=key,
            ok=(200, 201),
            data=body,
            headers={"Content-Type": OCI_MANIFEST},
        )
        return sha256_of(body)

    def _delete_manifest(self, repo: str, digest: str, key: str = "") -> None:
        self._request("DELETE", repo, f"/manifests/{digest}", key=key, ok=(200, 202), absent=(404,))

    def _upload(self, repo: str, data: bytes, key: str = "") -> str:
        """Put ``data`` as a blob (POST, then PUT with its digest; the registry checks it)."""
        digest = sha256_of(data)
        started = self._request(
            "POST", repo, "/blobs/uploads/", key=key, ok=(202,), headers={"Content-Length": "0"}
        )
        location = self._location(started)
        self._request(
            "PUT",
            repo,
            add_query(location, digest=digest),
            key=key,
            ok=(201, 204),
            data=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        return digest

    def _location(self, response) -> str:
        location = response.headers.get("Location", "")
        if not location:
            raise StoreFailed(self.url, "blob upload", "", response.status_code, "", "no Location")
        if location.startswith("/"):
            location = self.base.rsplit("/v2", 1)[0] + location
        return location

    def _empty(self, repo: str) -> dict:
        """The OCI empty descriptor, its blob put in ``repo`` once per store."""
        if repo not in self._empty_in:
            found = self._request("HEAD", repo, f"/blobs/{sha256_of(EMPTY)}", absent=(404,))
            if found.status_code == 404:
                self._upload(repo, EMPTY)
            self._empty_in.add(repo)
        return {"mediaType": EMPTY_TYPE, "digest": sha256_of(EMPTY), "size": 2, "data": "e30="}

    def _blob_exists(self, digest: str, key: str = "") -> int | None:
        """The blob's size, or None when absent."""
        response = self._request("HEAD", self.repo, f"/blobs/{digest}", key=key, absent=(404,))
        if response.status_code == 404:
            return None
        return int(response.headers.get("Content-Length") or 0)

    # -- the registry itself ---------------------------------------------------------
    def check_reachable(self) -> None:
        """The registry answers (with these credentials), and the repository is empty or
        a lorabay registry (a repository of images is refused, as a folder of other files
        is by file://)."""
        self._request("GET", None, "/", ok=(200,))
        if self.exists():
            return
        tags = self._tags(self.repo)
        if tag_of(MARKER) in tags:  # another process made it a registry since exists() looked
            return
        if tags:
            # Every key but the marker has a '/', spelled '__'; an image's tag (latest, v1.0)
            # has none. One tag's manifest is read too: ours name their key.
            keys = [key_of(t) for t in tags if "Z" not in t]
            foreign = [t for t, k in zip(tags, keys, strict=False) if k is None or "/" not in k]
            if not foreign and keys:
                found = self._get_manifest(self.repo, tag_of(keys[0]))
                annotations = (found[0].get("annotations") or {}) if found else {}
                if found and annotations.get(KEY_ANNOTATION) != keys[0]:
                    foreign = [tag_of(keys[0])]
            if foreign:
                raise RegistryUnavailable(
                    self.url,
                    f"repository {self.repo} holds tags lorabay did not write ({foreign[0]}...), "
                    "so it is not a lorabay registry; use a repository of its own",
                )

    def exists(self) -> bool:
        if not self._exists:
            self._exists = self.has(MARKER)
        return self._exists

    def initialize(self) -> None:
        if not self.exists():
            self.create(MARKER, MARKER_CONTENT)
            self._exists = True

    # -- records ---------------------------------------------------------------------
    def read(self, key: str) -> bytes | None:
        tagged = self.read_tagged(key)
        return None if tagged is None else tagged[0]

    def read_tagged(self, key: str) -> tuple[bytes, str] | None:
        if (blob := _BLOB_KEY_RE.match(key)) is not None:
            try:
                data = b"".join(self.read_chunks(key))
            except FileNotFoundError:
                return None
            return data, f"sha256:{blob.group(1)}"
        found = self._get_manifest(self.repo, tag_of(key), key)
        if found is None:
            return None
        manifest, digest = found
        return self._record_of(manifest, key), digest

    def _record_of(self, manifest: dict, key: str) -> bytes:
        """The record a manifest holds: inline (annotation, or a layer's ``data``) or in
        its first layer's blob."""
        inline = (manifest.get("annotations") or {}).get(RECORD_ANNOTATION)
        if isinstance(inline, str):
            try:
                return base64.b64decode(inline, validate=True)
            except ValueError:
                raise DamagedRecord(f"record {key}", "its inline data is not base64") from None
        layers = manifest.get("layers") or []
        layer = layers[0] if layers and isinstance(layers[0], dict) else {}
        if layer.get("mediaType") not in RECORD_LAYERS or not isinstance(layer.get("digest"), str):
            raise DamagedRecord(f"record {key}", "its tag holds no lorabay record")
        if isinstance(layer.get("data"), str):
            with contextlib.suppress(ValueError):
                data = base64.b64decode(layer["data"], validate=True)
                if sha256_of(data) == layer["digest"]:
                    return data
        response = self._request(
            "GET", self.repo, f"/blobs/{layer['digest']}", key=key, absent=(404,)
        )
        if response.status_code == 404:
            raise DamagedRecord(f"record {key}", f"its blob {layer['digest']} is missing")
        data = response.content
        if sha256_of(data) != layer["digest"]:
            raise DamagedRecord(f"record {key}", f"its blob is not {layer['digest']}")
        return data

    def _prepare(self, key: str, data: bytes) -> tuple[dict, dict | None]:
        """The manifest that will hold ``data`` under ``key`` (its blobs put first: content
        addressed, so harmless if the write then loses); for a version, also the same
        without its file layers, for a registry that misses one of their blobs."""
        if _BLOB_KEY_RE.match(key):
            raise ValueError(f"{key} is a blob key: put it with put_file")
        annotations = {KEY_ANNOTATION: key, NONCE_ANNOTATION: uuid.uuid4().hex}
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": RECORD_ARTIFACT,
            "config": self._empty(self.repo),
            "layers": [self._empty(self.repo)],  # an artifact with no blob of its own
            "annotations": annotations,
        }
        adapter = parse_adapter(data) if _VERSION_KEY_RE.match(key) else None
        if adapter is None:
            if len(data) <= EMBED_BYTES:  # one GET reads it, one PUT writes it
                annotations[RECORD_ANNOTATION] = base64.b64encode(data).decode()
            else:
                digest = self._upload(self.repo, data, key)
                manifest["layers"] = [
                    {"mediaType": RECORD_LAYER, "digest": digest, "size": len(data)}
                ]
            return manifest, None
        # A version: a ModelPack model artifact, lorabay's manifest as its first layer.
        record = {
            "mediaType": ADAPTER_MANIFEST_LAYER,
            "digest": self._upload(self.repo, data, key),
            "size": len(data),
            "annotations": {TITLE: "lorabay-manifest.json"},
        }
        if len(data) <= EMBED_BYTES:
            record["data"] = base64.b64encode(data).decode()
        files = [
            {
                "mediaType": media_type_of(f["path"]),
                "digest": f"sha256:{f['sha256']}",
                "size": f["size"],
                "annotations": {TITLE: f["path"], FILEPATH: f["path"]},
            }
            for f in adapter["files"]
        ]
        model_config = {
            "descriptor": {
                "name": adapter["name"],
                "version": str(adapter["version"]),
                "createdAt": adapter.get("created_at"),
                "description": adapter.get("description") or "",
            },
            "config": {"format": "safetensors"},
            "modelfs": {"type": "layers", "diffIds": [layer["digest"] for layer in files]},
        }
        config_bytes = json.dumps(model_config, sort_keys=True).encode()
        annotations.update(
            {
                "org.opencontainers.image.title": adapter["name"],
                "org.opencontainers.image.version": str(adapter["version"]),
                "org.opencontainers.image.created": str(adapter.get("created_at") or ""),
            }
        )
        full = {
            **manifest,
            "artifactType": MODEL_ARTIFACT,
            "config": {
                "mediaType": MODEL_CONFIG,
                "digest": self._upload(self.repo, config_bytes, key),
                "size": len(config_bytes),
            },
            "layers": [record, *files],
        }
        return full, {**full, "layers": [record]}

    def _write_record(self, key: str, prepared: tuple[dict, dict | None]) -> str:
        """PUT the prepared manifest under ``key``'s tag; its digest."""
        full, bare = prepared
        try:
            return self._put_manifest(self.repo, tag_of(key), full, key)
        except StoreFailed as error:
            if bare is None or error.error_code != "MANIFEST_BLOB_UNKNOWN":
                raise
            log.warning(
                "%s: a blob of the version is gone (a gc ran); its OCI manifest "
                "is written without file layers",
                key,
            )
            return self._put_manifest(self.repo, tag_of(key), bare, key)

    def has(self, key: str) -> bool:
        if (blob := _BLOB_KEY_RE.match(key)) is not None:
            return self._blob_exists(f"sha256:{blob.group(1)}", key) is not None
        return self._head_manifest(self.repo, tag_of(key), key) is not None

    def _under_claim(self, key: str, action):
        """``action(claim)`` while holding the claim on ``key``; a claim that aged past its
        writing window before the write (``Claim.check``) is given up and taken again."""
        for _ in range(5):
            with self._claimed(key) as claim:
                try:
                    return action(claim)
                except ClaimAged:
                    log.info("the claim on %s aged before its write; taking it again", key)
        raise Conflict(
            f"the registry was too slow to write {key} within a claim",
            "retry; if it keeps happening, check the registry's latency",
        )

    def create(self, key: str, data: bytes) -> bool:
        prepared = self._prepare(key, data)

        def write(claim: Claim) -> bool:
            if self._head_manifest(self.repo, tag_of(key), key) is not None:
                return False
            claim.check()
            self._write_record(key, prepared)
            return True

        return self._under_claim(key, write)

    def swap(self, key: str, data: bytes, etag: str | None) -> str:
        prepared = self._prepare(key, data)

        def write(claim: Claim) -> tuple[str, str | None]:
            current = self._head_manifest(self.repo, tag_of(key), key)
            if current != etag:
                raise PreconditionFailed(key)
            claim.check()
            return self._write_record(key, prepared), current

        digest, replaced = self._under_claim(key, write)
        if replaced is not None:
            self._delete_manifest(self.repo, replaced, key)  # no tag names it any more
        return digest

    def delete(self, key: str, etag: str | None = None) -> None:
        if _BLOB_KEY_RE.match(key):
            return self._delete_blob(key, etag)
        tag = tag_of(key)
        if etag is not None:

            def remove(claim: Claim) -> None:
                current = self._head_manifest(self.repo, tag, key)
                if current is None or current != etag:
                    raise PreconditionFailed(key)
                claim.check()
                self._delete_manifest(self.repo, current, key)

            return self._under_claim(key, remove)
        for _ in range(20):  # a swap may move the tag meanwhile: delete what it points at now
            current = self._head_manifest(self.repo, tag, key)
            if current is None:
                return
            self._delete_manifest(self.repo, current, key)
        raise Conflict(f"could not delete {key}: it keeps being rewritten", "try again")

    def list(self, prefix: str) -> list[ObjectInfo]:
        keys = []
        for tag in self._tags(self.repo):
            key = key_of(tag)
            if key is None and "Z" in tag:
                key = self._long_key(tag)
            if key is not None and key.startswith(prefix):
                keys.append(key)
        blobs = [k for k in keys if _BLOB_KEY_RE.match(k)]
        infos = {k: ObjectInfo(k, 0, 0.0) for k in set(keys) - set(blobs)}
        if blobs:
            with ThreadPoolExecutor(self.concurrent_reads) as pool:
                for info in pool.map(self._blob_info, blobs):
                    if info is not None:
                        infos[info.key] = info
        return sorted(infos.values(), key=lambda info: info.key)

    def _long_key(self, tag: str) -> str | None:
        if tag not in self._long_keys:
            found = self._get_manifest(self.repo, tag)
            key = (found[0].get("annotations") or {}).get(KEY_ANNOTATION) if found else None
            if not isinstance(key, str) or tag_of(key) != tag:
                return None
            self._long_keys[tag] = key
        return self._long_keys[tag]

    def _tags(self, repo: str) -> list[str]:
        """Every tag of ``repo`` (following the Link header's pages, where it gives any)."""
        tags: list[str] = []
        path = "/tags/list?n=1000"
        for _ in range(100_000):
            response = self._request("GET", repo, path, absent=(404,))
            if response.status_code == 404:
                return tags  # the repository does not exist yet
            tags += response.json().get("tags") or []
            link = response.links.get("next", {}).get("url")
            if not link:
                return tags
            path = link if link.startswith("http") else self.base.rsplit("/v2", 1)[0] + link
        return tags

    # -- blobs -----------------------------------------------------------------------
    def _index(self, key: str, digest: str, size: int) -> dict:
        return {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": BLOB_ARTIFACT,
            "config": self._empty(self.repo),
            "layers": [{"mediaType": "application/octet-stream", "digest": digest, "size": size}],
            "annotations": {
                KEY_ANNOTATION: key,
                TOUCHED_ANNOTATION: f"{time.time():.6f}",
                NONCE_ANNOTATION: uuid.uuid4().hex,
            },
        }

    def _blob_info(self, key: str) -> ObjectInfo | None:
        found = self._get_manifest(self.repo, tag_of(key), key)
        if found is None:
            return None
        manifest, _ = found
        try:
            size = int(manifest["layers"][0]["size"])
            touched = float(manifest["annotations"][TOUCHED_ANNOTATION])
        except (KeyError, IndexError, TypeError, ValueError):
            size, touched = 0, 0.0  # a damaged index: as old as can be, gc may take it
        return ObjectInfo(key, size, touched)

    def put_file(self, key: str, source: Path, sha256: str) -> bool:
        if self.touch(key):
            return False
        digest = f"sha256:{sha256}"
        size = source.stat().st_size
        for _ in range(5):  # a gc may delete the blob between its upload and its index
            if size <= UPLOAD_PART:
                data = source.read_bytes()
                if hashlib.sha256(data).hexdigest() != sha256:
                    raise changed_while_pushing(source)
                self._upload(self.repo, data, key)
            else:
                self._upload_parts(key, source, sha256)
            if self._put_index(key, digest, size):
                return True
        raise Conflict(f"{key} kept disappearing while it was pushed", "retry the push")

    def _put_index(self, key: str, digest: str, size: int) -> bool:
        """Write the blob's index tag (its time now); False when the blob is gone (the
        registry refuses an index of a blob it does not hold)."""
        try:
            self._put_manifest(self.repo, tag_of(key), self._index(key, digest, size), key)
            return True
        except StoreFailed as error:
            if error.error_code == "MANIFEST_BLOB_UNKNOWN":
                return False
            raise

    def _upload_parts(self, key: str, source: Path, sha256: str) -> None:
        """A chunked upload (PATCH per part), hashed as it goes; completed only when the
        whole file matched (else cancelled: the registry purges an unfinished upload)."""
        started = self._request(
            "POST",
            self.repo,
            "/blobs/uploads/",
            key=key,
            ok=(202,),
            headers={"Content-Length": "0"},
        )
        location = self._location(started)
        digest = hashlib.sha256()
        offset = 0
        try:
            with open(source, "rb") as handle:
                while data := handle.read(UPLOAD_PART):
                    digest.update(data)
                    answer = self._request(
                        "PATCH",
                        self.repo,
                        location,
                        key=key,
                        ok=(202,),
                        data=data,
                        headers={
                            "Content-Type": "application/octet-stream",
                            "Content-Range": f"{offset}-{offset + len(data) - 1}",
                        },
                    )
                    offset += len(data)
                    location = self._location(answer)
            if digest.hexdigest() != sha256:
                raise changed_while_pushing(source)
            self._request(
                "PUT",
                self.repo,
                add_query(location, digest=f"sha256:{sha256}"),
                key=key,
                ok=(201, 204),
                headers={"Content-Length": "0"},
            )
        except BaseException:
            with contextlib.suppress(Exception):
                self._request("DELETE", self.repo, location, ok=(204,), absent=(404,))
            raise

    def touch(self, key: str) -> bool:
        """A new index manifest (its time now) for a blob that is there; the old one goes."""
        blob = _BLOB_KEY_RE.match(key)
        if blob is None:  # a record: written again, the same bytes (a lost race is a touch too)
            tagged = self.read_tagged(key)
            if tagged is None:
                return False
            with contextlib.suppress(PreconditionFailed):
                self.swap(key, *tagged)
            return True
        digest = f"sha256:{blob.group(1)}"
        size = self._blob_exists(digest, key)
        if size is None:
            return False
        old = self._head_manifest(self.repo, tag_of(key), key)
        if not self._put_index(key, digest, size):
            return False  # a gc deleted it meanwhile: absent
        if old is not None:
            self._delete_manifest(self.repo, old, key)
        return True

    def _delete_blob(self, key: str, etag: str | None) -> None:
        digest = "sha256:" + key.rsplit("/", 1)[1]
        if etag is not None and etag != digest:
            raise PreconditionFailed(key)
        if etag is not None and self._blob_exists(digest, key) is None:
            raise PreconditionFailed(key)
        index = self._head_manifest(self.repo, tag_of(key), key)
        # The blob first: an index left without its blob is listed and deleted again, while
        # a blob left without its index could no longer be listed.
        self._request("DELETE", self.repo, f"/blobs/{digest}", key=key, ok=(202,), absent=(404,))
        if index is not None:
            self._delete_manifest(self.repo, index, key)

    def read_chunks(self, key: str) -> Iterator[bytes]:
        yield from self._get_blob(key, {})

    def read_range(self, key: str, offset: int, length: int) -> Iterator[bytes]:
        if length <= 0:
            return
        yield from self._get_blob(key, {"Range": f"bytes={offset}-{offset + length - 1}"})

    def _get_blob(self, key: str, headers: dict) -> Iterator[bytes]:
        blob = _BLOB_KEY_RE.match(key)
        if blob is None:
            data = self.read(key)
            if data is None:
                raise FileNotFoundError(key)
            yield data
            return
        response = self._request(
            "GET",
            self.repo,
            f"/blobs/sha256:{blob.group(1)}",
            key=key,
            ok=(200, 206),
            absent=(404, 416),
            headers=headers,
            stream=True,
        )
        with contextlib.closing(response):
            if response.status_code == 404:
                raise FileNotFoundError(key)
            if response.status_code == 416:
                return  # the range starts past the end: nothing there
            yield from response.iter_content(CHUNK)

    # -- claims ----------------------------------------------------------------------
    @contextlib.contextmanager
    def _claimed(self, key: str) -> Iterator[Claim]:
        claim = self._acquire(key)
        try:
            yield claim
        finally:
            try:
                self._delete_manifest(self.locks, claim.digest, key)
            except Exception as error:  # noqa: BLE001 - it expires by itself
                log.warning("could not release the claim on %s: %s", key, error)

    def _acquire(self, key: str) -> Claim:
        prefix = hashlib.sha256(key.encode()).hexdigest()[:32]
        given_up = time.monotonic() + CLAIM_WAIT
        for attempt in range(1_000_000):
            started = time.monotonic()
            mine = (int(self.registry_now() * 1000), uuid.uuid4().hex[:12])
            tag = f"{prefix}.{mine[0]:013d}.{mine[1]}"
            manifest = {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "artifactType": CLAIM_ARTIFACT,
                "config": self._empty(self.locks),
                "layers": [],
                "annotations": {KEY_ANNOTATION: key, NONCE_ANNOTATION: uuid.uuid4().hex},
            }
            digest = self._put_manifest(self.locks, tag, manifest, key)
            while True:
                live = []
                for other in self._tags(self.locks):
                    parsed = parse_claim(other)
                    if other == tag or parsed is None or parsed[0] != prefix:
                        continue
                    if self.claim_expired(parsed):
                        self._drop_claim(other, key)
                    else:
                        live.append(parsed[1:])
                if not live:
                    return Claim(tag, digest, started)
                # The oldest claim waits for the others to step back; they do.
                if mine < min(live) and time.monotonic() - started < CLAIM_SECONDS / 4:
                    time.sleep(random.uniform(0.002, 0.01))
                    continue
                break
            with contextlib.suppress(StoreFailed):  # best effort: one left behind expires
                self._delete_manifest(self.locks, digest, key)
            if time.monotonic() > given_up:
                break
            time.sleep(random.uniform(0, min(0.5, 0.005 * 2 ** min(attempt, 10))))
        raise Conflict(
            f"could not claim {key} in {self.url} within {CLAIM_WAIT:.0f} s",
            "too many concurrent writers of one record; try again",
        )

    def claim_expired(self, parsed: tuple[str, int, str]) -> bool:
        return parsed[1] / 1000 + CLAIM_SECONDS < self.registry_now()

    def _drop_claim(self, tag: str, key: str = "") -> None:
        with contextlib.suppress(StoreFailed):
            digest = self._head_manifest(self.locks, tag, key)
            if digest is not None:
                self._delete_manifest(self.locks, digest, key)

    # -- leftovers -------------------------------------------------------------------
    def list_temporary(self) -> list[ObjectInfo]:
        """Claims whose writer died (expired); unfinished blob uploads are the registry's to
        purge (distribution: storage.maintenance.uploadpurging)."""
        found = []
        for tag in self._tags(self.locks):
            parsed = parse_claim(tag)
            if parsed is not None and self.claim_expired(parsed):
                mtime = parsed[1] / 1000 - self._offset  # our clock, as gc's cutoff is
                found.append(ObjectInfo(f"locks/{tag}", 0, mtime))
        return found

    def delete_temporary(self, key: str) -> None:
        self._drop_claim(key.removeprefix("locks/"))


def parse_adapter(data: bytes) -> dict | None:
    """A version record's name, version and files, or None if it is not one lorabay can read
    (then it is stored as a plain record: the tests damage manifests on purpose)."""
    try:
        adapter = json.loads(data)
        files = [
            {"path": str(f["path"]), "size": int(f["size"]), "sha256": str(f["sha256"])}
            for f in adapter["files"]
        ]
        if not all(re.fullmatch(r"[0-9a-f]{64}", f["sha256"]) for f in files):
            return None
        return {**adapter, "name": str(adapter["name"]), "files": files}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def parse_claim(tag: str) -> tuple[str, int, str] | None:
    parts = tag.split(".")
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1]), parts[2]


def add_query(url: str, **params) -> str:
    from urllib.parse import urlencode

    return url + ("&" if "?" in url else "?") + urlencode(params)


def short(error: Exception) -> str:
    text = str(error)
    match = re.search(r"\] ([^'\"]+)", text) or re.search(r"(Connection refused|timed out)", text)
    return (match.group(1) if match else text)[:200]


def changed_while_pushing(source: Path) -> InvalidAdapter:
    return InvalidAdapter(
        str(source), "changed while it was being pushed", "push again once nothing writes to it"
    )
