"""What a registry accepts as an adapter, checked before anything is written.

Accepted: ``adapter_config.json`` with ``peft_type`` LORA plus
``adapter_model.safetensors`` at the top of the folder, and optional tokenizer,
chat-template and readme files (``.json .txt .md .jinja .model .tiktoken``).
Refused, each with one line naming the file and the fix: pickled weights
(``.bin .pt .pth .pkl .pickle .ckpt .npy .npz .joblib``), other file types,
symbolic links, path components ``..``/absolute paths, tensor shapes that
disagree with ``r``, and folders over the size bound (``LORABAY_MAX_ADAPTER_BYTES``,
default 8 GiB). Hidden files and folders (``.git``, ``.cache``) are skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from lorabay.hub import pieces
from lorabay.hub.adapter_config import module_pattern
from lorabay.hub.errors import InvalidAdapter
from lorabay.hub.manifest import digest_files
from lorabay.hub.pieces import Progress

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz", ".joblib"}
OPTIONAL_SUFFIXES = {".json", ".txt", ".md", ".jinja", ".model", ".tiktoken"}
DEFAULT_MAX_BYTES = 8 << 30
# Unicode categories refused in file names: control (Cc: \x00-\x1f, \x7f-\x9f), format
# (Cf: bidi overrides and isolates, zero-width joiners), line and paragraph separators,
# surrogates, private use, unassigned.
UNPRINTABLE = {"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"}
CHUNK = 1 << 20


@dataclass(frozen=True)
class AdapterFile:
    path: str  # relative, POSIX separators: the name inside the adapter
    source: Path  # where the bytes are read from
    size: int
    sha256: str = ""
    pieces: dict | None = None  # see pieces.py: large files also hash piece by piece

    def entry(self) -> dict:
        entry = {"path": self.path, "size": self.size, "sha256": self.sha256}
        if self.pieces is not None:
            entry["pieces"] = self.pieces
        return entry


@dataclass(frozen=True)
class AdapterContent:
    """A checked adapter folder: its files (hashed), PEFT config and tensor shapes."""

    folder: Path
    files: list[AdapterFile]
    config: dict
    shapes: dict[str, list[int]]

    @property
    def digest(self) -> str:
        return digest_files([f.entry() for f in self.files])

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def peft(self) -> dict:
        c = self.config
        targets = c.get("target_modules")
        return {
            "peft_type": c["peft_type"],
            "r": c["r"],
            "lora_alpha": c.get("lora_alpha"),
            "target_modules": sorted(targets) if isinstance(targets, list) else targets,
            "modules_to_save": c.get("modules_to_save"),
        }


def max_adapter_bytes() -> int:
    return int(os.environ.get("LORABAY_MAX_ADAPTER_BYTES") or DEFAULT_MAX_BYTES)


def check_relative_path(path: str, where: str = "") -> str:
    """Return ``path`` if it is a safe relative POSIX path inside an adapter, else raise."""
    shown = f"{where}: {path!r}" if where else repr(path)
    if not path or "\\" in path or "\x00" in path:
        raise InvalidAdapter(shown, "is not a plain relative file name", "rename the file")
    odd = next((c for c in path if unicodedata.category(c) in UNPRINTABLE), None)
    if odd is not None:
        # Control characters rewrite a terminal (\x1b[...), bidi controls reorder what it
        # shows (U+202E makes 'txt.exe' read 'exe.txt'): `hub show` would print them raw.
        raise InvalidAdapter(
            shown,
            f"holds the control or formatting character U+{ord(odd):04X}",
            "rename the file with printable characters only",
        )
    pure = PurePosixPath(path)
    if pure.is_absolute() or path.startswith("/"):
        raise InvalidAdapter(shown, "is an absolute path", "adapter files must be relative")
    if any(part in ("..", ".", "") for part in path.split("/")):
        raise InvalidAdapter(shown, "contains '..' or an empty component", "rename the file")
    return path


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            if progress:
                progress(len(chunk))
    return digest.hexdigest()


def hash_file(path: Path, progress: Progress | None = None) -> tuple[str, dict | None]:
    """The sha256 of ``path`` and, for a file over one piece, its piece digests (hashed on
    the other cores meanwhile). Refuses a file that changed while it was read."""
    before = path.stat()
    if before.st_size <= pieces.PIECE_BYTES:
        return sha256_file(path, progress), None
    spans = pieces.spans(before.st_size)
    with open(path, "rb", buffering=0) as handle, ThreadPoolExecutor(pieces.hash_workers()) as pool:
        parts = [pool.submit(pieces.sha256_range, handle.fileno(), *span) for span in spans]
        whole = sha256_file(path, progress)
        digests = [part.result() for part in parts]
    after = path.stat()
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise InvalidAdapter(
            str(path), "changed while it was being hashed", "push again once nothing writes to it"
        )
    return whole, pieces.describe(before.st_size, digests)


def list_adapter_files(folder: Path, links_within: Path | None = None) -> list[AdapterFile]:
    """Walk ``folder`` (unhashed) refusing links, odd files and unsafe names.

    ``links_within``: symbolic links whose target lies under this folder are followed
    (the Hugging Face cache keeps snapshot files as links into its blob store).
    """
    found: list[AdapterFile] = []
    for root, dirs, names in os.walk(folder, followlinks=False):
        # Hidden folders (.git, .cache/huggingface) are not part of an adapter.
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for d in dirs:
            if os.path.islink(os.path.join(root, d)):
                rel = os.path.relpath(os.path.join(root, d), folder)
                raise InvalidAdapter(
                    str(folder / rel),
                    "is a symbolic link",
                    "copy the real files into the folder (links are refused)",
                )
        for name in sorted(names):
            if name.startswith("."):
                continue
            full = Path(root) / name
            rel = full.relative_to(folder).as_posix()
            check_relative_path(rel, str(folder))
            source = full
            info = os.lstat(full)
            if stat.S_ISLNK(info.st_mode):
                target = full.resolve()
                if links_within is None or not target.is_relative_to(links_within.resolve()):
                    raise InvalidAdapter(
                        str(full),
                        "is a symbolic link",
                        "copy the real file into the folder (links are refused)",
                    )
                source, info = target, os.stat(target)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidAdapter(str(full), "is not a regular file", "remove it")
            found.append(AdapterFile(path=rel, source=source, size=info.st_size))
    return found


def check_file_types(folder: Path, files: list[AdapterFile]) -> None:
    names = {f.path for f in files}
    for f in files:
        suffix = PurePosixPath(f.path).suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            raise InvalidAdapter(
                str(folder / f.path),
                "is a pickled file, which can run code when loaded",
                "save the adapter with safetensors (PEFT save_pretrained does by default) "
                "and remove the file",
            )
        if f.path != WEIGHTS_FILE and suffix not in OPTIONAL_SUFFIXES:
            raise InvalidAdapter(
                str(folder / f.path),
                f"is not an accepted adapter file (accepted: {CONFIG_FILE}, {WEIGHTS_FILE}, "
                f"and {' '.join(sorted(OPTIONAL_SUFFIXES))} files)",
                "remove it from the folder",
            )
    for required, fix in (
        (CONFIG_FILE, "save the adapter with PEFT's save_pretrained, which writes it"),
        (WEIGHTS_FILE, "save the adapter with PEFT's save_pretrained(safe_serialization=True)"),
    ):
        if required not in names:
            raise InvalidAdapter(str(folder), f"has no {required}", fix)


def read_adapter_config(path: Path) -> dict:
    from lorabay.hub.adapter_config import MAX_CONFIG_BYTES, config_problems

    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise InvalidAdapter(
            str(path),
            f"is over {MAX_CONFIG_BYTES:,} bytes; PEFT configs are a few hundred",
            "re-save the adapter",
        )
    try:
        config = json.loads(path.read_text())
    except RecursionError:
        raise InvalidAdapter(str(path), "nests too deeply to read", "re-save the adapter") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:  # ValueError: json's, int()'s
        raise InvalidAdapter(
            str(path), f"is not valid JSON ({error})", "re-save the adapter"
        ) from None
    if not isinstance(config, dict):
        raise InvalidAdapter(str(path), "is not a JSON object", "re-save the adapter")
    peft_type = config.get("peft_type")
    if str(peft_type).upper() != "LORA":
        raise InvalidAdapter(
            str(path),
            f"peft_type is {peft_type!r}, only LORA adapters are accepted",
            "train a LoRA adapter (peft.LoraConfig)",
        )
    problems = config_problems(config)
    if problems:
        raise InvalidAdapter(str(path), "; ".join(problems), "fix adapter_config.json")
    return config


def read_tensor_shapes(path: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            return {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own SafetensorError and OSErrors
        raise InvalidAdapter(
            str(path), f"is not a readable safetensors file ({error})", "re-save the adapter"
        ) from None


def expected_rank(module: str, config: dict) -> int:
    for pattern, rank in (config.get("rank_pattern") or {}).items():
        if re.match(module_pattern(pattern), module):
            return int(rank)
    return int(config["r"])


# A LoRA tensor's key: ``<module>.lora_A.weight`` or ``lora_B`` (an embedding's:
# ``lora_embedding_A``/``_B``); group 1 says embedding, group 2 the side.
LORA_TENSOR = re.compile(r"\.lora_(embedding_)?([AB])(\.|$)")


def check_shapes(path: Path, shapes: dict[str, list[int]], config: dict) -> None:
    """lora_A is [r, in, ...], lora_B is [out, r, ...] (also lora_embedding_A/B)."""
    lora_keys = 0
    for key, shape in shapes.items():
        match = LORA_TENSOR.search(key)
        if not match:
            continue
        lora_keys += 1
        module = key[: match.start()]
        rank = expected_rank(module, config)
        axis = 0 if match.group(2) == "A" else 1
        if len(shape) < 2 or shape[axis] != rank:
            raise InvalidAdapter(
                str(path),
                f"tensor {key} has shape {shape}, but adapter_config.json says r={rank} "
                f"(lora_{match.group(2)} must have {rank} on axis {axis})",
                "save the config and the weights from the same model",
            )
    if not lora_keys:
        raise InvalidAdapter(
            str(path), "holds no lora_A/lora_B tensors", "save a LoRA adapter with PEFT"
        )


def scan_adapter(
    folder: str | os.PathLike,
    *,
    links_within: Path | None = None,
    progress: Progress | None = None,
) -> AdapterContent:
    """Check ``folder`` completely, then hash its files. Raises InvalidAdapter on any problem."""
    folder = Path(folder).expanduser()
    if folder.is_symlink():
        raise InvalidAdapter(str(folder), "is a symbolic link", "pass the real folder")
    if not folder.is_dir():
        raise InvalidAdapter(
            str(folder),
            "is not a folder" if folder.exists() else "does not exist",
            "pass the folder PEFT's save_pretrained wrote",
        )
    folder = folder.absolute()
    files = list_adapter_files(folder, links_within)
    check_file_types(folder, files)
    limit = max_adapter_bytes()
    total = sum(f.size for f in files)
    if total > limit:
        raise InvalidAdapter(
            str(folder),
            f"holds {total:,} bytes, over the limit of {limit:,}",
            "raise LORABAY_MAX_ADAPTER_BYTES if this adapter is really that large",
        )
    by_path = {f.path: f for f in files}
    config = read_adapter_config(by_path[CONFIG_FILE].source)
    shapes = read_tensor_shapes(by_path[WEIGHTS_FILE].source)
    check_shapes(folder / WEIGHTS_FILE, shapes, config)
    hashed = [
        AdapterFile(f.path, f.source, f.size, *hash_file(f.source, progress))
        for f in sorted(files, key=lambda f: f.path)
    ]
    return AdapterContent(folder=folder, files=hashed, config=config, shapes=shapes)
