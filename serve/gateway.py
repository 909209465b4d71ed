"""The gateway's state and its conversations with the engine and the peer gateways.

The gateway talks to the engine over its private Unix socket (with the token the
engine's guard wants): generation requests through an aiohttp session (a streamed
answer costs the gateway ~10x less CPU than through httpx, on the cores the engine
computes on), everything else (adapter loads, health, the model list) through an
``httpx.AsyncClient``. With ``--peers``, another aiohttp session forwards requests to
the other gateways, for the same reason.
What one request does with these parts, in order, is serve/generate.py.

The gateway trusts only engine state it made (STYLE 14): an adapter is loaded from
the folder the registry verified, under a name carrying its digest; an adapter the
engine already holds under that name is not "already loaded" but a stranger, which
is unloaded and replaced; strangers are swept at connect and after every restart.

A request holds the adapter it was resolved to from start to finish: the pool does
not unload an adapter while a request uses it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import httpx

from lorabay.hub.errors import IncompatibleBase, LorabayError, UntrustedAdapter
from lorabay.hub.reference import parse_reference
from lorabay.serve.engine import ENGINE_KEEPALIVE_SECONDS, EngineSupervisor, engine_answer
from lorabay.serve.errors import AdapterLoadFailed, EngineUnavailable, InvalidRequest
from lorabay.serve.keys import OPEN, ApiKeys, KeyGrant
from lorabay.serve.metrics import GatewayMetrics
from lorabay.serve.options import DEFAULT_MAX_N, SearchLimits
from lorabay.serve.peers import BUSY, FORWARDED, Peers, sign_forward, verify_forward
from lorabay.serve.pool import AdapterPool, LoadedAdapter
from lorabay.serve.resolve import POLICY, ModelResolver, Target

log = logging.getLogger("lorabay.serve")
# What a forwarded request keeps of the client's headers (the peer checks the key again).
FORWARDED_HEADERS = ("authorization", "content-type", "accept")

ENGINE_CONNECTIONS = 1024  # enough for every request in flight
ENGINE_IDLE_SECONDS = ENGINE_KEEPALIVE_SECONDS / 3  # well before the engine closes them
ENGINE_CONNECT_SECONDS = 10.0
JSON = {"content-type": "application/json"}

BODY_IDLE_SECONDS = 10.0  # a body that sends nothing for this long gets 408
BODY_SECONDS = 60.0  # and one that is not all there after this long
ALREADY_LOADED = "has already been loaded"  # vLLM's answer to a load under a taken name


def engine_down(reason: str) -> EngineUnavailable:
    return EngineUnavailable(
        f"the engine is not available: {reason}", "retry in a few seconds; it is being restarted"
    )


class ClientGone(Exception):
    """The client hung up before its request was whole (HTTP 499 in the metrics)."""


class RequestTooLarge(InvalidRequest):
    """A request body over --max-body-bytes."""

    code = "request_too_large"
    closes_connection = True  # the rest of the body is never read (responses.py)

    def __init__(self, message: str):
        super().__init__(message, http_status=413)


class RequestTimeout(InvalidRequest):
    """A request body that did not arrive in time (a stalled or very slow upload)."""

    code = "request_timeout"
    closes_connection = True

    def __init__(self, message: str):
        super().__init__(message, http_status=408)


@dataclass
class Gateway:
    supervisor: EngineSupervisor
    resolver: ModelResolver
    keys: ApiKeys | None
    max_loaded: int
    max_body_bytes: int
    spill_at: int  # --spill-at: in-flight requests past which forwarded ones go back
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    max_model_len: int | None = None
    max_n: int = DEFAULT_MAX_N  # --max-n: choices one request may ask for
    search_limits: SearchLimits = field(default_factory=SearchLimits)  # best_of, search (ttc.py)
    peers: Peers | None = None  # --peers: adapter affinity across gateways (peers.py)
    peer_secret: bytes | None = None  # --peer-secret-file: proves a request came from a peer
    engine: httpx.AsyncClient | None = None
    pool: AdapterPool | None = None

    def __post_init__(self) -> None:
        # Enough connections for every request in flight; no overall timeout, since a
        # generation may take minutes (a dead engine surfaces as a transport error).
        limits = httpx.Limits(
            max_connections=ENGINE_CONNECTIONS,
            max_keepalive_connections=256,
            keepalive_expiry=ENGINE_IDLE_SECONDS,
        )
        timeout = httpx.Timeout(None, connect=ENGINE_CONNECT_SECONDS)
        self.engine = self.supervisor.client(limits=limits, timeout=timeout)
        # aiohttp sessions are made in the running loop, on first use
        self._generation_session: aiohttp.ClientSession | None = None
        self._peer_session: aiohttp.ClientSession | None = None
        # Each key's prefix-cache salt: another key's prompts never warm its cache.
        self._salt_key = secrets.token_bytes(32)
        self.pool = AdapterPool(
            self.max_loaded,
            self.load_adapter,
            self.unload_adapter,
            self.metrics,
            generation=lambda: self.supervisor.generation,
        )
        self.supervisor.on_restart = self.engine_restarted
        self.supervisor.on_down = self.engine_went_down
        self.metrics.engine_up.set_function(lambda: 1.0 if self.supervisor.ready else 0.0)
        self.metrics.registry_fetches.set_function(
            lambda: self.resolver.registry.pull_stats.fetched
        )
        self._sweeps: set[asyncio.Task] = set()

    # -- engine ----------------------------------------------------------------------
    async def connect(self) -> None:
        """Read what the engine serves (its context length) once it is ready, and unload
        every adapter in it this gateway did not load."""
        cards = await self.engine_cards()
        for card in cards:
            if card.get("id") == self.resolver.served_name:
                self.max_model_len = card.get("max_model_len")
        await self.unload_strangers(cards)

    async def engine_cards(self) -> list[dict]:
        response = await self.engine.get("/v1/models")
        response.raise_for_status()
        return response.json().get("data", [])

    async def unload_strangers(self, cards: list[dict] | None = None) -> list[str]:
        """Unload the engine's adapters the pool did not load (``--engine-arg=--lora-modules``,
        a previous gateway's, anything): the names it unloaded."""
        if cards is None:
            cards = await self.engine_cards()
        ours = self.pool.owned
        strangers = [
            card["id"]
            for card in cards
            if card.get("id") != self.resolver.served_name and card.get("id") not in ours
        ]
        for name in strangers:
            log.warning("unloading adapter %r from the engine: this gateway did not load it", name)
            await self.unload_adapter(name)
        return strangers

    def engine_went_down(self, reason: str) -> None:
        # Everything the dead engine had loaded is gone; loads in flight fail with it.
        self.pool.reset()

    def engine_restarted(self, generation: int) -> None:
        self.pool.reset()
        self.metrics.engine_restarts.inc()
        task = asyncio.get_running_loop().create_task(self._sweep())
        self._sweeps.add(task)
        task.add_done_callback(self._sweeps.discard)

    async def _sweep(self) -> None:
        try:
            await self.unload_strangers()
        except (httpx.HTTPError, LorabayError) as error:
            log.warning("could not list the restarted engine's adapters: %s", error)

    async def load_adapter(self, engine_name: str, path) -> None:
        """Load ``path`` (a folder the registry verified) as ``engine_name``. A name the
        engine already holds is not adopted: that adapter is unloaded and ours loaded."""
        response = await self._engine_post("/v1/load_lora_adapter", engine_name, path)
        if response.status_code == 200:
            return
        message = engine_answer(response)
        if ALREADY_LOADED in message:
            log.warning(
                "the engine holds an adapter named %r this gateway did not load: "
                "unloading it and loading the verified folder",
                engine_name,
            )
            await self.unload_adapter(engine_name)
            response = await self._engine_post("/v1/load_lora_adapter", engine_name, path)
            if response.status_code == 200:
                return
            message = engine_answer(response)
        raise AdapterLoadFailed(engine_name, message)

    async def unload_adapter(self, engine_name: str) -> None:
        response = await self._engine_post("/v1/unload_lora_adapter", engine_name)
        if response.status_code not in (200, 404):
            raise AdapterLoadFailed(engine_name, engine_answer(response))

    async def _engine_post(self, path: str, engine_name: str, folder=None) -> httpx.Response:
        body = {"lora_name": engine_name}
        if folder is not None:
            body["lora_path"] = os.fspath(folder)  # a path, or the cache lease holding it
        try:
            return await self.engine.post(path, json=body)
        except httpx.TransportError as error:
            self.supervisor.mark_down()
            raise engine_down(f"{type(error).__name__} while changing adapters") from None

    async def engine_answers(self) -> bool:
        """Whether the engine says it is healthy now (after it failed a request)."""
        try:
            response = await self.engine.get("/health", timeout=3.0)
            return response.status_code == 200
        except httpx.HTTPError:
            return False

    async def close(self) -> None:
        await self.pool.drain()
        for session in (self._generation_session, self._peer_session):
            if session is not None:
                await session.close()
        await self.engine.aclose()

    # -- requests --------------------------------------------------------------------
    def authenticate(self, authorization: str | None) -> KeyGrant:
        return OPEN if self.keys is None else self.keys.authenticate(authorization)

    def cache_salt(self, grant: KeyGrant) -> str:
        """vLLM's prefix-cache salt for one key: requests of other keys never share cached
        prefixes with it, so no tenant can time another's prompts."""
        return hmac.new(self._salt_key, grant.tenant.encode(), hashlib.sha256).hexdigest()[:32]

    async def read_body(self, request) -> bytes:
        """The whole body, or RequestTooLarge (413), RequestTimeout (408), ClientGone."""
        from starlette.requests import ClientDisconnect

        limit = self.max_body_bytes
        length = request.headers.get("content-length")
        if length and length.isascii() and length.isdigit() and int(length) > limit:
            raise RequestTooLarge(f"the body is {length} bytes, over the limit of {limit}")
        chunks, size = [], 0
        deadline = time.monotonic() + BODY_SECONDS
        stream = request.stream().__aiter__()
        while True:
            wait = min(BODY_IDLE_SECONDS, deadline - time.monotonic())
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), max(wait, 0.0))
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise RequestTimeout(
                    f"the body did not arrive in time ({size} bytes after "
                    f"{BODY_SECONDS - max(deadline - time.monotonic(), 0):.0f} s)"
                ) from None
            except ClientDisconnect:
                raise ClientGone() from None
            size += len(chunk)
            if size > limit:
                raise RequestTooLarge(f"the body is over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def open_target(
        self, body: dict, grant: KeyGrant, role: str = POLICY
    ) -> tuple[Target, LoadedAdapter | None]:
        """The adapter ``body["model"]`` names, loaded, for use as ``role`` (the policy, or
        the verifier of best-of-N and search: serve/ttc.py)."""
        target = await self.resolver.resolve(body["model"], grant)
        if not self.supervisor.ready:
            raise engine_down("it is starting or restarting")
        if target.is_base and role == POLICY:
            return target, None
        # One key for the pool and the engine: the engine name (name@digest). Two names
        # with the same content are two engine adapters, and the gauge counts both.
        try:
            self.resolver.check_role(target, role)
            lease = await self.pool.acquire(
                target.engine_name,
                target.engine_name,
                target.labels,
                lambda: self.resolver.prepare(target, role),
            )
        except (IncompatibleBase, UntrustedAdapter) as error:
            reason = getattr(error, "kind", "incompatible")
            self.metrics.refusals.labels(*target.labels, reason).inc()
            raise
        return target, lease

    def forwarded_by_peer(self, path: str, raw: bytes, headers) -> bool:
        """Whether another gateway of ours forwarded this request: its x-lorabay-forwarded
        header carries an HMAC of the request under the peers' shared secret. A client's
        own header proves nothing and is ignored."""
        value = headers.get(FORWARDED)
        if not value or self.peer_secret is None:
            return False
        return verify_forward(self.peer_secret, value, path, raw)

    async def peer_for(self, body: dict, forwarded: bool) -> str | None:
        """The peer gateway that is home to this request's adapter, when it is not this one
        (None: answer here: no peers, the base, a request forwarded once already)."""
        if self.peers is None or forwarded:
            return None
        model = body["model"]
        if model == self.resolver.served_name:
            return None
        try:
            name = parse_reference(model).name
        except (LorabayError, ValueError):
            return None  # answered here, with the reference's own error
        return await self.peers.home(name)

    async def forward(self, peer: str, path: str, raw: bytes, headers) -> StreamedAnswer | None:
        """Send the request as it came to ``peer``, signed; its response (streamed), or None
        when the peer cannot answer it (unreachable, or its engine down: 503); then the peer
        is skipped for a while and this gateway answers."""
        sent = {k: v for k, v in headers.items() if k.lower() in FORWARDED_HEADERS}
        sent[FORWARDED] = sign_forward(self.peer_secret, path, raw)
        try:
            answer = await self.peer_session().post(f"{peer}{path}", data=raw, headers=sent)
        except aiohttp.ClientError as error:
            self.peers.mark_down(peer, f"unreachable ({type(error).__name__})")
            return None
        response = StreamedAnswer(answer)
        if response.status_code == 503:
            await response.aclose()
            self.peers.mark_down(peer, "its engine is not available (503)")
            return None
        if response.status_code == 429 and BUSY in response.headers:
            await response.aclose()  # the home has --spill-at requests in flight: answer here
            self.metrics.spilled.labels(peer).inc()
            return None
        return response

    def too_busy_for(self, forwarded: bool) -> bool:
        """Whether to turn away a request another gateway forwarded (it answers it itself):
        more than --spill-at others are in flight here."""
        return forwarded and self.metrics.active - 1 >= self.spill_at

    def peer_session(self) -> aiohttp.ClientSession:
        if self._peer_session is None or self._peer_session.closed:
            connector = aiohttp.TCPConnector(
                limit=ENGINE_CONNECTIONS, keepalive_timeout=ENGINE_IDLE_SECONDS
            )
            self._peer_session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=ENGINE_CONNECT_SECONDS),
                auto_decompress=False,
                # The request goes on as the client sent it: no headers of aiohttp's own.
                skip_auto_headers=("content-type", "accept-encoding", "user-agent"),
            )
        return self._peer_session

    def generation_session(self) -> aiohttp.ClientSession:
        if self._generation_session is None or self._generation_session.closed:
            self._generation_session = self.supervisor.session(
                ENGINE_CONNECTIONS, ENGINE_IDLE_SECONDS, ENGINE_CONNECT_SECONDS
            )
        return self._generation_session

    async def send(self, endpoint: str, body: dict) -> StreamedAnswer:
        """Send a generation request to the engine; its response, streamed (the caller
        reads it and closes it)."""
        data = json.dumps(body, separators=(",", ":")).encode()
        for attempt in (1, 2):
            try:
                answer = await self.generation_session().post(
                    f"/v1/{endpoint}", data=data, headers=JSON
                )
                return StreamedAnswer(answer)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as error:
                # The engine closed the connection without an answer: a kept-alive one it
                # was closing as the request went out, or the engine dying. Alive: once
                # more, on a new connection.
                failure = error
                if attempt == 1 and await self.engine_answers():
                    log.warning("the engine closed a connection unanswered (%r): again", error)
                    continue
            except aiohttp.ClientError as error:
                failure = error
            self.supervisor.mark_down()
            raise engine_down(type(failure).__name__) from None


class StreamedAnswer:
    """The engine's answer to a generation request, or a peer gateway's to a forwarded
    one, its body not yet read: what the gateway reads of it (the names are
    httpx.Response's: engine_answer reads both)."""

    def __init__(self, answer: aiohttp.ClientResponse):
        self._answer = answer
        self.status_code = answer.status
        self.headers = answer.headers
        self.content = b""  # once aread

    def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive (aiohttp.ClientError if the engine dies)."""
        return self._answer.content.iter_any()

    async def aread(self) -> bytes:
        self.content = await self._answer.read()
        return self.content

    def json(self):
        return json.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")

    async def aclose(self) -> None:
        """Read to its end, the connection is kept for the next request; otherwise it is
        closed, and the engine (or the peer), seeing that, aborts the generation."""
        if self._answer.content.at_eof():
            self._answer.release()
        else:
            self._answer.close()
