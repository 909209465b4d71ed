"""Adapter affinity across gateways: each adapter name has one home among the replicas.

Behind a plain Kubernetes Service, requests for one adapter land on every replica, so each
one pulls and loads every adapter and its engine's adapter slots churn. With ``--peers``,
the gateways that serve one base agree, with no coordination, which of them serves each
adapter name: rendezvous (highest random weight) hashing of the name over the members,
so adding or losing one replica moves only the names it gains or held. A request that
arrives elsewhere is forwarded there once (marked ``x-lorabay-forwarded``, so it is never
forwarded again; the mark is an HMAC of the request under the secret the peers share,
``--peer-secret-file``, so a client cannot forge it to defeat the affinity or to be
answered as a forwarded request); if the home cannot be reached, or answers 503 (its engine down or
starting), it is served where it arrived and that peer is skipped for a while. A home
with more than ``--spill-at`` requests in flight (default: the engine's --max-num-seqs,
a full batch) turns forwarded ones away at once (429, ``x-lorabay-busy``) and the
gateway that forwarded them answers them itself, loading the adapter there too: a hot
adapter spreads over the replicas instead of queueing at one. The base itself is served
by whichever replica got it.

    --peers http://10.0.0.5:8000,http://10.0.0.6:8000    a fixed list
    --peers dns:lorabay-peers.ns.svc.cluster.local:8000  every address a name resolves
                                                         to (a headless Service), re-read
                                                         every REFRESH_SECONDS

A gateway finds itself among the members by its port and its own addresses.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import socket
import time
from urllib.parse import urlparse

from lorabay.hub.errors import ConfigError

log = logging.getLogger("lorabay.serve")
FORWARDED = "x-lorabay-forwarded"
BUSY = "x-lorabay-busy"  # on a 429 from a home with --spill-at requests in flight
REFRESH_SECONDS = 10.0
DOWN_SECONDS = 10.0
FORWARD_WINDOW_SECONDS = 60.0  # a signed forward older (or newer) than this is refused
MIN_SECRET_CHARS = 16


def forward_mac(secret: bytes, stamp: str, path: str, body: bytes) -> str:
    message = f"{stamp}\n{path}\n".encode() + hashlib.sha256(body).digest()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def sign_forward(secret: bytes, path: str, body: bytes, now: float | None = None) -> str:
    """The x-lorabay-forwarded value for a request to ``path`` with ``body``:
    ``<unix seconds>.<hex HMAC-SHA256 of the time, the path and the body's sha256>``."""
    stamp = str(int(time.time() if now is None else now))
    return f"{stamp}.{forward_mac(secret, stamp, path, body)}"


def verify_forward(
    secret: bytes, value: str, path: str, body: bytes, now: float | None = None
) -> bool:
    """Whether ``value`` is a peer's signature of this request, made in the last minute."""
    stamp, _, mac = value.partition(".")
    if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 12 and len(mac) == 64):
        return False
    now = time.time() if now is None else now
    if abs(now - int(stamp)) > FORWARD_WINDOW_SECONDS:
        return False
    return hmac.compare_digest(mac, forward_mac(secret, stamp, path, body))


def read_peer_secret(path: str) -> bytes:
    """The shared secret from ``--peer-secret-file``; ConfigError when missing or short."""
    from pathlib import Path

    try:
        secret = Path(path).read_text().strip()
    except OSError as error:
        raise ConfigError(f"--peer-secret-file {path}: {error.strerror}") from None
    if len(secret) < MIN_SECRET_CHARS:
        raise ConfigError(
            f"--peer-secret-file {path}: the secret has {len(secret)} characters, "
            f"fewer than {MIN_SECRET_CHARS}",
            "write a long random one, e.g. `openssl rand -hex 32 > FILE`",
        )
    return secret.encode()


def weight(member: str, key: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{member}\n{key}".encode(), digest_size=8).digest())


def home_of(key: str, members: list[str]) -> str | None:
    """The member ``key`` belongs to: the one with the highest weight (None: no members)."""
    return max(members, key=lambda m: weight(m, key)) if members else None


def local_addresses() -> set[str]:
    """Every address of this machine's interfaces (a pod: its own IP), and loopback."""
    import psutil

    found = {"127.0.0.1", "::1"}
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family in (socket.AF_INET, socket.AF_INET6):
                found.add(address.address.split("%", 1)[0])
    return found


def url_for(host: str, port: int) -> str:
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"http://[{host}]:{port}"
    except ValueError:
        pass
    return f"http://{host}:{port}"


def parse_peers(spec: str) -> tuple[list[str], tuple[str, int] | None]:
    """``(fixed URLs, (dns name, port) or None)`` from ``--peers``; ConfigError when bad."""
    spec = spec.strip()
    if spec.startswith("dns:"):
        name, _, port = spec[4:].rpartition(":")
        if not name or not port.isdigit():
            raise ConfigError(
                f"--peers {spec!r}: expected dns:NAME:PORT", "e.g. dns:lorabay-peers:8000"
            )
        return [], (name, int(port))
    urls = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        parsed = urlparse(item)
        if parsed.scheme not in ("http", "https") or not parsed.hostname or not parsed.port:
            raise ConfigError(
                f"--peers: {item!r} is not a gateway URL with a port",
                "list them as http://HOST:PORT,... or give dns:NAME:PORT",
            )
        urls.append(f"{parsed.scheme}://{parsed.netloc}")
    if not urls:
        raise ConfigError("--peers names no gateway", "list them as http://HOST:PORT,...")
    return urls, None


class Peers:
    """The gateways serving one base, and which of them is home to each adapter name."""

    def __init__(self, spec: str, port: int):
        self.fixed, self.dns = parse_peers(spec)
        self.port = port  # this gateway's own (bound) port
        self.members: list[str] = list(self.fixed)
        self.me: str | None = None
        self.down_until: dict[str, float] = {}
        self.refreshed = 0.0
        self._lock = asyncio.Lock()
        self._mine = local_addresses()

    def is_me(self, url: str) -> bool:
        parsed = urlparse(url)
        if parsed.port != self.port:
            return False
        try:
            addresses = {i[4][0] for i in socket.getaddrinfo(parsed.hostname, None)}
        except OSError:
            return False
        return bool(addresses & self._mine)

    async def refresh(self) -> None:
        """Re-read the members (DNS) at most every REFRESH_SECONDS; find this gateway. A
        fixed list is read once."""
        if self.refreshed and (
            self.dns is None or time.monotonic() - self.refreshed < REFRESH_SECONDS
        ):
            return
        async with self._lock:
            if time.monotonic() - self.refreshed < REFRESH_SECONDS:
                return
            members = self.fixed
            if self.dns is not None:
                name, port = self.dns
                try:
                    infos = await asyncio.to_thread(
                        socket.getaddrinfo, name, port, 0, socket.SOCK_STREAM
                    )
                    members = sorted({url_for(i[4][0], port) for i in infos})
                except OSError as error:
                    log.warning(
                        "peers: cannot resolve %s (%s); keeping %d", name, error, len(self.members)
                    )
                    members = self.members
            selves = [m for m in members if await asyncio.to_thread(self.is_me, m)]
            me = selves[0] if selves else None
            if me is None and members:
                log.warning("peers: this gateway (port %d) is not among %s", self.port, members)
            members = [m for m in members if m not in selves[1:]]  # one name for itself
            self.members, self.me, self.refreshed = members, me, time.monotonic()

    async def home(self, name: str) -> str | None:
        """The peer to forward ``name``'s requests to, or None to serve them here."""
        await self.refresh()
        now = time.monotonic()
        live = [m for m in self.members if m == self.me or self.down_until.get(m, 0) <= now]
        home = home_of(name, live)
        return None if home is None or home == self.me else home

    def mark_down(self, url: str, reason: str) -> None:
        log.warning(
            "peer %s: %s; its adapters go to the next in line for %.0f s", url, reason, DOWN_SECONDS
        )
        self.down_until[url] = time.monotonic() + DOWN_SECONDS
