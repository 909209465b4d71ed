"""Where each record lives in a store (the layout is drawn in ``store.py``)."""

from __future__ import annotations


def name_prefix(name: str) -> str:
    namespace, _, short = name.rpartition("/")
    return f"adapters/{namespace or '_'}/{short}/"


def alias_key(name: str) -> str:
    # Beside, not inside, the versions folder: listing every version (``list``) then never
    # reads alias tables, which halves what an S3 LIST returns.
    namespace, _, short = name.rpartition("/")
    return f"aliases/{namespace or '_'}/{short}.json"


def name_from_prefix(key: str) -> tuple[str, str]:
    """``adapters/ns/name/3.json`` -> (``ns/name``, ``3.json``)."""
    _, namespace, short, leaf = key.split("/", 3)
    return (short if namespace == "_" else f"{namespace}/{short}"), leaf


def name_from_alias_key(key: str) -> str:
    """``aliases/ns/name.json`` -> ``ns/name``."""
    _, namespace, leaf = key.split("/", 2)
    short = leaf.removesuffix(".json")
    return short if namespace == "_" else f"{namespace}/{short}"


def manifest_key(name: str, version: int) -> str:
    return f"{name_prefix(name)}{version}.json"


def removed_key(name: str, version: int) -> str:
    """The tombstone ``hub rm`` leaves: the version number stays taken."""
    return f"{name_prefix(name)}{version}.removed"


def yanked_key(name: str, version: int) -> str:
    return f"{name_prefix(name)}{version}.yanked"


def signature_key(name: str, version: int, key_id: str) -> str:
    """A signature of a version (hub/signing.py), one per signing key, beside the manifest."""
    return f"{name_prefix(name)}{version}.sig.{key_id[:32]}"


def event_prefix(name: str) -> str:
    # Keyed by name, so `hub log NAME` lists one prefix instead of reading every event.
    namespace, _, short = name.rpartition("/")
    return f"events/{namespace or '_'}/{short}/"
