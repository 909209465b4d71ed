"""The event log: one small object per change, kept by name, never rewritten.

    events/<ns or _>/<name>/<time-ns>-<random>.json   {"event", "at", "by", "name", ...}

Events are pushed, aliased, unaliased, yanked, unyanked and removed, each written only
when the change happened (yanking a yanked version writes none). Keyed by name, so the
log of one adapter is one listing of its prefix; ``since`` and ``limit`` are applied to
the keys' time stamps, so only the events shown are read. Registries written before
events were kept by name hold ``events/<time-ns>-<random>.json``: they are listed with
the whole log, and ``gc`` moves them under their name (upkeep.py).

    write_event(store, "yanked", name="team/a", version=3, reason="regressed")
    read_events(store, "team/a", limit=20)
"""

from __future__ import annotations

import getpass
import json
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

from lorabay.hub.errors import DamagedRecord
from lorabay.hub.keys import event_prefix
from lorabay.hub.store import Store


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def current_user() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def write_event(store: Store, event: str, **facts) -> None:
    """Append one event about ``facts['name']`` (created once, under a fresh key)."""
    record = {"event": event, "at": now_iso(), "by": current_user(), **facts}
    stamp = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"
    key = f"{event_prefix(facts['name'])}{stamp}.json"
    store.create(key, json.dumps(record, sort_keys=True).encode())


def parse_event(raw: bytes, key: str) -> dict:
    """One stored event, checked: an object naming its event and time."""
    try:
        event = json.loads(raw)
        if not isinstance(event, dict):
            raise ValueError("not a JSON object")
        if not isinstance(event.get("event"), str) or not isinstance(event.get("at"), str):
            raise ValueError("it has no 'event' or no 'at'")
    except (ValueError, RecursionError) as error:
        damaged = DamagedRecord(f"event {key}", str(error)[:200])
        damaged.hint = (
            "restore that object from a backup or delete it; `lorabay hub verify` lists all"
        )
        raise damaged from None
    return event


def event_keys(store: Store, name: str | None) -> list[tuple[int, str]]:
    """(time in ns, key) of every event (of ``name``), oldest first, from one listing."""
    keys = []
    for info in store.list(event_prefix(name) if name else "events/"):
        stamp = info.key.rsplit("/", 1)[1].split("-", 1)[0]
        if not (stamp.isascii() and stamp.isdigit()):
            raise DamagedRecord(f"event {info.key}", "its name holds no time stamp")
        keys.append((int(stamp), info.key))
    return sorted(keys, key=lambda item: (item[0], item[1].rsplit("/", 1)[1]))


def read_events(
    store: Store, name: str | None, *, limit: int | None = None, since: float | None = None
) -> list[dict]:
    """The events (of ``name``) since ``since`` (seconds since the epoch), the newest
    ``limit`` of them, oldest first; DamagedRecord for one that cannot be read."""
    keys = event_keys(store, name)
    if since is not None:
        keys = [(at, key) for at, key in keys if at >= since * 1e9]
    if limit is not None:
        keys = keys[len(keys) - limit :] if limit else []
    workers = max(1, getattr(store, "concurrent_reads", 1))
    with ThreadPoolExecutor(workers) as pool:
        raws = list(pool.map(store.read, [key for _, key in keys]))
    return [parse_event(raw, key) for (_, key), raw in zip(keys, raws, strict=True) if raw]


def damaged_events(store: Store) -> list[tuple[str, DamagedRecord]]:
    """Every event that cannot be read (``verify``): (key, error)."""
    try:
        keys = event_keys(store, None)
    except DamagedRecord as error:
        return [(error.where.removeprefix("event "), error)]
    found = []
    for _, key in keys:
        raw = store.read(key)
        try:
            if raw is not None:
                parse_event(raw, key)
        except DamagedRecord as error:
            found.append((key, error))
    return found
