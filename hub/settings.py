"""Settings read from the environment, in one place.

``LORABAY_HOME`` (default ``~/.lorabay``) holds the embedded registry and the
pull cache; ``LORABAY_REGISTRY`` overrides the registry URL; ``LORABAY_CACHE_BUDGET``
bounds the pull cache (``20GB``; least recently used adapters go first, hub/cache.py).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def lorabay_home() -> Path:
    """The folder, created 0700 when it does not exist yet: it holds every pulled adapter
    and the embedded registry, which other users of the machine must not read (the
    folders below it are then out of their reach whatever mode they are created with)."""
    home = Path(os.environ.get("LORABAY_HOME") or Path.home() / ".lorabay").expanduser()
    if str(home) not in _MADE:
        try:
            home.parent.mkdir(parents=True, exist_ok=True)
            home.mkdir(mode=0o700)
        except FileExistsError:
            pass
        except OSError:  # a read-only place: whoever reads it finds out
            return home
        _MADE.add(str(home))
    return home


_MADE: set[str] = set()


def default_registry_url() -> str:
    return os.environ.get("LORABAY_REGISTRY") or f"file://{lorabay_home() / 'registry'}"


def cache_dir() -> Path:
    return lorabay_home() / "cache"


def debug() -> bool:
    return os.environ.get("LORABAY_DEBUG", "") not in ("", "0", "false")


def parse_size(text: str, what: str = "size") -> int:
    """Bytes from ``1000``, ``500MB``, ``20G``, ``1.5TiB`` (units are powers of 1024)."""
    from lorabay.hub.errors import ConfigError

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ConfigError(f"{what} {text!r} is not a size", "write bytes or 500MB, 20GB, 1.5TB")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).lower()])


def cache_budget() -> int | None:
    """The most bytes the pull cache keeps (``LORABAY_CACHE_BUDGET``); None: no bound."""
    raw = os.environ.get("LORABAY_CACHE_BUDGET", "").strip()
    return parse_size(raw, "LORABAY_CACHE_BUDGET") if raw else None
