"""Adapter references, parsed the way an OCI image reference is.

    name                  -> name:latest
    name:3                -> version 3 (integers are versions)
    name:prod             -> the version the alias ``prod`` points to
    name@sha256:<hex>     -> exactly that content

Names are lowercase ``[a-z0-9][a-z0-9._-]*``, at most 64 characters, with one
optional namespace: ``team/name``. Aliases follow the same rule, are never all
digits (those are versions) and never ``latest`` (implicit: the highest version
that is not yanked).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lorabay.hub.errors import InvalidReference

LATEST = "latest"
_PART = r"[a-z0-9][a-z0-9._-]{0,63}"
_NAME_RE = re.compile(rf"^{_PART}(?:/{_PART})?$")
_TAG_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_HEX_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_NAME = 64
MAX_VERSION_DIGITS = 15  # a version past 10**15 is no registry's; int() of 5,000 digits raises


@dataclass(frozen=True)
class Reference:
    """A parsed reference: exactly one of ``version``, ``alias`` or ``digest`` is set."""

    name: str
    version: int | None = None
    alias: str | None = None
    digest: str | None = None  # "sha256:<hex>"

    def __str__(self) -> str:
        if self.digest:
            return f"{self.name}@{self.digest}"
        if self.version is not None:
            return f"{self.name}:{self.version}"
        return f"{self.name}:{self.alias}"

    @property
    def is_latest(self) -> bool:
        return self.alias == LATEST


def validate_name(name: str, ref: str | None = None) -> str:
    """Return ``name`` if it is a valid adapter name, else raise InvalidReference."""
    shown = ref if ref is not None else name
    if not isinstance(name, str) or not name:
        raise InvalidReference(str(shown), "the name is empty")
    if len(name) > MAX_NAME:
        raise InvalidReference(shown, f"the name is longer than {MAX_NAME} characters")
    if not _NAME_RE.match(name):
        raise InvalidReference(
            shown,
            "names are lowercase letters, digits, '.', '_', '-' (starting with a letter or "
            "digit), with at most one 'namespace/' in front",
        )
    if any(part in (".", "..") for part in name.split("/")):
        raise InvalidReference(shown, "'.' and '..' are not names")
    return name


def validate_alias(alias: str, ref: str | None = None) -> str:
    """Return ``alias`` if it may be set: not all digits, not ``latest``, same charset as names."""
    shown = ref if ref is not None else alias
    if not isinstance(alias, str) or not alias:
        raise InvalidReference(str(shown), "the alias is empty")
    if alias.isascii() and alias.isdigit():
        raise InvalidReference(
            shown, f"alias {alias!r} is all digits, which is how versions are written"
        )
    if not _TAG_RE.match(alias):
        raise InvalidReference(
            shown, "aliases are lowercase letters, digits, '.', '_', '-', at most 64 characters"
        )
    return alias


def validate_digest(digest: str, ref: str | None = None) -> str:
    shown = ref if ref is not None else digest
    algorithm, _, hex_ = digest.partition(":")
    if algorithm != "sha256" or not _HEX_RE.match(hex_):
        raise InvalidReference(shown, "a digest is 'sha256:' and 64 lowercase hex characters")
    return digest


def parse_reference(ref: str) -> Reference:
    """Parse ``ref`` into a :class:`Reference`; raise InvalidReference naming what is wrong."""
    if not isinstance(ref, str) or not ref.strip():
        raise InvalidReference(str(ref), "the reference is empty")
    if ref != ref.strip():
        raise InvalidReference(ref, "it has leading or trailing spaces")
    if "@" in ref:
        name, _, digest = ref.partition("@")
        validate_name(name, ref)
        validate_digest(digest, ref)
        return Reference(name=name, digest=digest)
    name, sep, tag = ref.rpartition(":")
    if not sep:
        return Reference(name=validate_name(ref), alias=LATEST)
    validate_name(name, ref)
    if not tag:
        raise InvalidReference(ref, "nothing follows ':'")
    if tag.isascii() and tag.isdigit():  # str.isdigit alone also takes '²' and '١'
        if len(tag) > MAX_VERSION_DIGITS:
            raise InvalidReference(
                ref,
                f"the version has {len(tag)} digits; versions have at most {MAX_VERSION_DIGITS}",
            )
        version = int(tag)
        if version < 1 or tag != str(version):
            raise InvalidReference(ref, "versions are whole numbers from 1, without leading zeros")
        return Reference(name=name, version=version)
    if tag != LATEST:
        validate_alias(tag, ref)
    return Reference(name=name, alias=tag)
