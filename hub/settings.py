"""Settings read from the environment, in one place.

``LORABAY_HOME`` (default ``~/.lorabay``) holds the embedded registry and the
pull cache; ``LORABAY_REGISTRY`` overrides the registry URL.
"""

from __future__ import annotations

import os
from pathlib import Path


def lorabay_home() -> Path:
    return Path(os.environ.get("LORABAY_HOME") or Path.home() / ".lorabay").expanduser()


def default_registry_url() -> str:
    return os.environ.get("LORABAY_REGISTRY") or f"file://{lorabay_home() / 'registry'}"


def cache_dir() -> Path:
    return lorabay_home() / "cache"


def debug() -> bool:
    return os.environ.get("LORABAY_DEBUG", "") not in ("", "0", "false")
