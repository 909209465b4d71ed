"""Hugging Face Hub repositories as a source and a destination, through huggingface_hub.

    lorabay hub import hf://org/repo@main team/summarize
    lorabay hub export team/summarize:prod hf://org/summarize-lora

Import takes the accepted adapter files of a snapshot (``snapshot_download`` with
``allow_patterns``, so pickled weights are never even downloaded; offline it reads
the local Hugging Face cache) and pushes them with the source recorded in the
labels. Export uploads a verified pull in one commit, plus ``lorabay-manifest.json``
(the manifest: lineage and base survive the round trip; import reads it back and
leaves it out of the adapter's files).
"""

from __future__ import annotations

import fnmatch
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lorabay.hub.content import OPTIONAL_SUFFIXES, WEIGHTS_FILE
from lorabay.hub.errors import AdapterNotFound, ConfigError, HubFailed, LorabayError

if TYPE_CHECKING:
    from lorabay.hub.registry import Pushed

MANIFEST_FILE = "lorabay-manifest.json"
ALLOW_PATTERNS = [WEIGHTS_FILE] + [f"*{suffix}" for suffix in sorted(OPTIONAL_SUFFIXES)]


@dataclass(frozen=True)
class HfLocation:
    repo_id: str
    revision: str | None

    def __str__(self) -> str:
        return f"hf://{self.repo_id}" + (f"@{self.revision}" if self.revision else "")


def parse_hf_url(url: str) -> HfLocation:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not url.startswith("hf://"):
        raise ConfigError(f"{url!r} is not a Hugging Face location", "write hf://ORG/REPO[@REV]")
    repo_id, _, revision = url[len("hf://") :].partition("@")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ConfigError(f"{url!r}: {error}", "write hf://ORG/REPO[@REV]") from None
    if "/" not in repo_id:
        raise ConfigError(f"{url!r} names no organisation or user", "write hf://ORG/REPO[@REV]")
    return HfLocation(repo_id, revision or None)


def hub_failure(
    location: HfLocation | str, error: Exception, writing: bool = False
) -> LorabayError:
    """One line for what huggingface_hub raised, by its type and the Hub's HTTP status,
    naming the fix (huggingface_hub's own CLI does the same: cli/_errors.py)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = str(location)
    cause = error.__cause__
    if isinstance(error, LocalEntryNotFoundError) and isinstance(cause, Exception):
        if not isinstance(cause, (OfflineModeIsEnabled, LocalEntryNotFoundError)):
            # snapshot_download falls back to the cache when the Hub fails; not cached,
            # it raises this with the Hub's own failure as the cause: that is the news.
            return hub_failure(location, cause, writing)
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    server = str(getattr(error, "server_message", None) or "").strip().splitlines()
    said = f" ({server[0][:160]})" if server else ""
    login = "log in with `hf auth login` or set HF_TOKEN"
    if isinstance(error, GatedRepoError):
        return HubFailed(
            where,
            f"the repository is gated{said}",
            f"accept its conditions on huggingface.co, then {login}",
            status,
        )
    if isinstance(error, RevisionNotFoundError):
        return AdapterNotFound(where, "the repository has no such revision; check the @REVISION")
    if isinstance(error, RepositoryNotFoundError):
        return AdapterNotFound(
            where, f"check the repository name; a private one needs a token ({login})"
        )
    if isinstance(error, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        return HubFailed(
            where,
            "not in the local Hugging Face cache, and the Hub cannot be reached",
            "unset HF_HUB_OFFLINE and check the network, or download it first "
            "(`hf download ORG/REPO`)",
        )
    if isinstance(error, HfHubHTTPError) and status is not None:
        if status == 401:
            return HubFailed(where, f"not authorized (401){said}", login, status)
        if status == 403:
            need = "a token with write access to it" if writing else "access to it"
            return HubFailed(
                where,
                f"forbidden (403){said}",
                f"use {need} (huggingface.co/settings/tokens)",
                status,
            )
        if status == 429:
            return HubFailed(
                where, f"rate limited (429){said}", f"wait a while and retry; {login}", status
            )
        if status >= 500:
            return HubFailed(
                where,
                f"the Hub failed the request ({status}){said}",
                "retry later (status.huggingface.co)",
                status,
            )
        return HubFailed(where, f"the Hub refused the request ({status}){said}", "fix it", status)
    first = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
    return HubFailed(
        where,
        f"cannot reach the Hub ({type(error).__name__}: {first})",
        "check the network and HF_ENDPOINT, or use the local cache (HF_HUB_OFFLINE=1)",
    )


def hub_errors() -> tuple[type[Exception], ...]:
    """What huggingface_hub raises for the Hub's answers and for the network under it."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    errors: tuple[type[Exception], ...] = (HfHubHTTPError, OfflineModeIsEnabled, OSError)
    try:
        import httpx2

        errors += (httpx2.HTTPError,)
    except ImportError:  # an older huggingface_hub on httpx or requests: OSError covers it
        pass
    return errors


def download_snapshot(location: HfLocation, allow_patterns: list[str] = ALLOW_PATTERNS) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                location.repo_id, revision=location.revision, allow_patterns=allow_patterns
            )
        )
    except hub_errors() as error:
        raise hub_failure(location, error) from None


def stage_snapshot(snapshot: Path, into: Path) -> dict | None:
    """Copy the snapshot's accepted files into ``into`` (the HF cache keeps them as links
    into its blob store; only links that stay inside that repository's cache are followed).
    Returns the exported lorabay manifest when the snapshot carries one."""
    repo_cache = snapshot.parent.parent.resolve()
    exported = None
    for path in sorted(snapshot.rglob("*")):
        if path.is_dir():
            continue
        rel = path.relative_to(snapshot).as_posix()
        if not any(fnmatch.fnmatch(rel, pattern) for pattern in ALLOW_PATTERNS):
            continue  # in the cache from another download; the same filter as the download
        real = path.resolve()
        if not real.is_relative_to(repo_cache) and not real.is_relative_to(snapshot.resolve()):
            raise ConfigError(f"{rel} in {snapshot} points outside the repository's cache")
        if rel == MANIFEST_FILE:
            try:
                exported = json.loads(real.read_text())
                if not isinstance(exported, dict):
                    raise ValueError("not a JSON object")
            except (ValueError, RecursionError, UnicodeDecodeError) as error:
                raise ConfigError(
                    f"{rel} in {snapshot} is not a lorabay manifest ({str(error)[:120]})",
                    "fix or remove it in the repository",
                ) from None
            continue
        target = into / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(real, target)
    return exported


def import_from_hf(
    registry,
    source: str,
    name: str,
    *,
    aliases=(),
    description: str | None = None,
    labels: dict | None = None,
    base=None,
) -> Pushed:
    """Push the adapter of a Hub snapshot as the next version of ``name`` (what the push
    did: ``Pushed``), its source (``hf://repo@commit``) recorded in the labels."""
    location = parse_hf_url(source)
    snapshot = download_snapshot(location)
    commit = snapshot.name  # snapshots/<commit sha>
    with tempfile.TemporaryDirectory(prefix="lorabay-import-") as tmp:
        staged = Path(tmp) / "adapter"
        staged.mkdir()
        exported = stage_snapshot(snapshot, staged)
        carried = exported or {}
        merged_labels = {
            **(carried.get("labels") or {}),
            **(labels or {}),
            "source": f"hf://{location.repo_id}@{commit}",
        }
        return registry.push(
            staged,
            name,
            aliases=aliases,
            description=description if description is not None else carried.get("description", ""),
            labels=merged_labels,
            base=base,
            lineage=carried.get("lineage"),
            kind=carried.get("kind", "lora"),
        )


def export_to_hf(
    registry, ref: str, target: str, *, private: bool = False, token: str | None = None
) -> str:
    """Upload ``ref`` to the Hub repository ``target`` in one commit; returns the commit URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    location = parse_hf_url(target)
    manifest = registry.resolve(ref)
    folder = registry.pull(manifest)
    operations = [
        CommitOperationAdd(path_in_repo=entry["path"], path_or_fileobj=str(folder / entry["path"]))
        for entry in manifest.files
    ]
    operations.append(CommitOperationAdd(MANIFEST_FILE, manifest.to_json()))
    api = HfApi(token=token)
    try:
        api.create_repo(location.repo_id, private=private, exist_ok=True)
        commit = api.create_commit(
            location.repo_id,
            operations=operations,
            commit_message=f"lorabay export {manifest.ref} ({manifest.digest})",
            revision=location.revision,
        )
    except hub_errors() as error:
        raise hub_failure(location, error, writing=True) from None
    return commit.commit_url
