"""Settings read from the environment, in one place.

``LORABAY_HOME`` (default ``~/.lorabay``) holds the embedded registry and the
pull cache; ``LORABAY_REGISTRY`` overrides the registry URL.
"""

from __future__ import annotations

import os
from pathlib import Path


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
