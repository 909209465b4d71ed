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

from lorabay.hub.content import OPTIONAL_SUFFIXES, WEIGHTS_FILE
from lorabay.hub.errors import AdapterNotFound, ConfigError, RegistryUnavailable
from lorabay.hub.manifest import Manifest

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


def download_snapshot(location: HfLocation, allow_patterns: list[str] = ALLOW_PATTERNS) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(
            snapshot_download(
                location.repo_id, revision=location.revision, allow_patterns=allow_patterns
            )
        )
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise AdapterNotFound(str(location), "check the repository name and revision") from None
    except LocalEntryNotFoundError:
        raise RegistryUnavailable(
            str(location),
            "not in the local Hugging Face cache and the Hub cannot be reached "
            "(unset HF_HUB_OFFLINE or download it first)",
        ) from None
    except (HfHubHTTPError, OSError) as error:
        raise RegistryUnavailable(str(location), str(error).splitlines()[0]) from None


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
            exported = json.loads(real.read_text())
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
) -> Manifest:
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
    from huggingface_hub.errors import HfHubHTTPError

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
    except HfHubHTTPError as error:
        raise RegistryUnavailable(str(location), str(error).splitlines()[0]) from None
    return commit.commit_url
