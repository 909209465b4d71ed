"""API keys and the adapter names each may use (``--api-keys FILE``).

The file is YAML or JSON, a mapping from key to one pattern or a list of them,
optionally under a top-level ``keys:``::

    keys:
      sk-team-a-0f3c: ["team-a/*"]
      sk-admin-77d1: "*"

Patterns are shell-style (``fnmatch``, case-sensitive) and match the adapter's
name, never its version or alias: ``team-a/*`` allows every version of every
adapter in ``team-a``. The base model is open to every valid key.

Keys are compared in constant time on their sha256, so neither the lookup time
nor an error message says how close a wrong key came.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

from lorabay.hub.errors import ConfigError
from lorabay.serve.errors import Unauthorized


@dataclass(frozen=True)
class KeyGrant:
    """What one authenticated caller may use. ``patterns=None``: everything (no keys set).

    ``tenant`` names the key without revealing it (its sha256, hex; "" without keys): the
    gateway salts each tenant's prefix cache with it.
    """

    patterns: tuple[str, ...] | None
    tenant: str = ""

    def allows(self, name: str) -> bool:
        if self.patterns is None:
            return True
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.patterns)


OPEN = KeyGrant(None)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class ApiKeys:
    def __init__(self, table: dict[str, tuple[str, ...]]):
        self._grants = [
            (_digest(key), KeyGrant(patterns, _digest(key).hex()))
            for key, patterns in table.items()
        ]

    def __len__(self) -> int:
        return len(self._grants)

    def authenticate(self, authorization: str | None) -> KeyGrant:
        """The grant for an ``Authorization: Bearer KEY`` header; :class:`Unauthorized` if none."""
        if not authorization:
            raise Unauthorized("no API key: send `Authorization: Bearer <key>`")
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized("the Authorization header must be `Bearer <key>`")
        wanted = _digest(key.strip())
        found = None
        for digest, grant in self._grants:  # no early exit: same time for every key
            if hmac.compare_digest(digest, wanted):
                found = grant
        if found is None:
            raise Unauthorized("unknown API key")
        return found


def parse_api_keys(data, source: str = "--api-keys") -> ApiKeys:
    """Build :class:`ApiKeys` from parsed YAML/JSON, reporting every problem at once."""
    if isinstance(data, dict) and set(data) == {"keys"}:
        data = data["keys"]
    if not isinstance(data, dict) or not data:
        raise ConfigError(
            f"{source}: expected a mapping of API key to name patterns",
            'write e.g. `keys: {"sk-team-a": ["team-a/*"]}`',
        )
    problems: list[str] = []
    table: dict[str, tuple[str, ...]] = {}
    for key, patterns in data.items():
        shown = f"{str(key)[:4]}..." if isinstance(key, str) else repr(key)
        if not isinstance(key, str) or len(key) < 8 or key != key.strip():
            problems.append(f"{source}: key {shown} must be a string of 8+ characters, no spaces")
            continue
        if isinstance(patterns, str):
            patterns = [patterns]
        if not isinstance(patterns, list) or not all(
            isinstance(p, str) and p.strip() for p in patterns
        ):
            problems.append(f"{source}: key {shown} needs a pattern or a list of patterns")
            continue
        table[key] = tuple(p.strip() for p in patterns)
    if problems:
        raise ConfigError(problems, "fix the key file and start again")
    return ApiKeys(table)


def load_api_keys(path: str | Path) -> ApiKeys:
    import yaml  # YAML is a superset of JSON: one reader for both

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as error:
        raise ConfigError(f"--api-keys {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"--api-keys {path}: not valid YAML/JSON ({error})") from None
    return parse_api_keys(data, f"--api-keys {path}")
