"""The gateway's request path: authenticate, validate, resolve, load, forward, stream.

One shared ``httpx.AsyncClient`` talks to the engine. Streams are passed through as
the engine's bytes, whole SSE events at a time; only the one event that carries
usage is parsed (the gateway asks for it, for its token metrics, and drops it
again when the client did not ask). Nothing is re-encoded per token.

A request holds the adapter it was resolved to from start to finish: the pool
does not unload an adapter while a request uses it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import httpx
from lorabay.hub.errors import (
    AdapterLoadFailed,
    EngineUnavailable,
    InvalidRequest,
    LorabayError,
)
from lorabay.hub.reference import parse_reference
from lorabay.serve.engine import EngineSupervisor
from lorabay.serve.keys import OPEN, ApiKeys, KeyGrant
from lorabay.serve.metrics import GatewayMetrics
from lorabay.serve.peers import BUSY, FORWARDED, Peers
from lorabay.serve.pool import AdapterPool, LoadedAdapter
from lorabay.serve.resolve import ModelResolver, Target

log = logging.getLogger("lorabay.serve")
# What a forwarded request keeps of the client's headers (the peer checks the key again).
FORWARDED_HEADERS = ("authorization", "content-type", "accept")

USAGE_MARK = b'"usage":{'
EVENT_END = b"\n\n"


def engine_down(reason: str) -> EngineUnavailable:
    return EngineUnavailable(
        f"the engine is not available: {reason}", "retry in a few seconds; it is being restarted"
    )


@dataclass
class Gateway:
    supervisor: EngineSupervisor
    resolver: ModelResolver
    keys: ApiKeys | None
    max_loaded: int
    max_body_bytes: int
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    max_model_len: int | None = None
    client: httpx.AsyncClient | None = None
    pool: AdapterPool | None = None
    peers: Peers | None = None  # --peers: adapter affinity across gateways (peers.py)
    spill_at: int = 128  # --spill-at: in-flight requests past which forwarded ones go back

    def __post_init__(self) -> None:
        # Enough connections for every request in flight; no overall timeout, since a
        # generation may take minutes (a dead engine surfaces as a transport error).
        self.client = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256),
            timeout=httpx.Timeout(None, connect=10.0),
        )
        self.pool = AdapterPool(
            self.max_loaded, self.load_adapter, self.unload_adapter, self.metrics
        )
        self.supervisor.on_restart = self.engine_restarted
        self.supervisor.on_exit = self.engine_exited

    # -- engine ----------------------------------------------------------------------
    async def connect(self) -> None:
        """Read what the engine serves (its context length) once it is ready."""
        response = await self.client.get(
            f"{self.supervisor.url}/v1/models", headers=self.supervisor.headers
        )
        response.raise_for_status()
        for card in response.json().get("data", []):
            if card.get("id") == self.resolver.served_name:
                self.max_model_len = card.get("max_model_len")
        self.metrics.engine_up.set(1)

    def engine_exited(self, code: int | None) -> None:
        # Everything the dead engine had loaded is gone; loads in flight fail with it.
        self.pool.reset()
        self.metrics.engine_up.set(0)

    def engine_restarted(self, generation: int) -> None:
        self.pool.reset()
        self.metrics.engine_restarts.inc()
        self.metrics.engine_up.set(1)

    async def load_adapter(self, engine_name: str, path) -> None:
        try:
            response = await self.client.post(
                f"{self.supervisor.url}/v1/load_lora_adapter",
                json={"lora_name": engine_name, "lora_path": str(path)},
                headers=self.supervisor.headers,
            )
        except httpx.TransportError as error:
            self.supervisor.mark_down()
            raise engine_down(f"{type(error).__name__} while loading an adapter") from None
        if response.status_code == 200:
            return
        message = engine_error_message(response)
        if "has already been loaded" in message:
            return  # the engine has it (an earlier load we lost track of): use it
        raise AdapterLoadFailed(engine_name, message)

    async def unload_adapter(self, engine_name: str) -> None:
        response = await self.client.post(
            f"{self.supervisor.url}/v1/unload_lora_adapter",
            json={"lora_name": engine_name},
            headers=self.supervisor.headers,
        )
        if response.status_code not in (200, 404):
            raise AdapterLoadFailed(engine_name, engine_error_message(response))

    async def close(self) -> None:
        await self.pool.drain()
        await self.client.aclose()

    # -- requests --------------------------------------------------------------------
    def authenticate(self, authorization: str | None) -> KeyGrant:
        return OPEN if self.keys is None else self.keys.authenticate(authorization)

    async def read_body(self, request) -> bytes:
        limit = self.max_body_bytes
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            raise InvalidRequest(f"the body is {length} bytes, over the limit of {limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise InvalidRequest(f"the body is over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def open_target(self, body: dict, grant: KeyGrant) -> tuple[Target, LoadedAdapter | None]:
        target = await self.resolver.resolve(body["model"], grant)
        if not self.supervisor.ready:
            raise engine_down("it is starting")
        if target.is_base:
            return target, None
        lease = await self.pool.acquire(
            target.manifest.digest,
            target.engine_name,
            target.labels,
            lambda: self.resolver.prepare(target),
        )
        return target, lease

    async def peer_for(self, body: dict, headers) -> str | None:
        """The peer gateway that is home to this request's adapter, when it is not this one
        (None: answer here: no peers, the base, a request forwarded once already)."""
        if self.peers is None or FORWARDED in headers:
            return None
        model = body["model"]
        if model == self.resolver.served_name:
            return None
        try:
            name = parse_reference(model).name
        except LorabayError:
            return None  # answered here, with the reference's own error
        return await self.peers.home(name)

    async def forward(self, peer: str, endpoint: str, raw: bytes, headers) -> httpx.Response | None:
        """Send the request as it came to ``peer``; its response (streamed), or None when
        the peer cannot answer it (unreachable, or its engine down: 503); then the peer is
        skipped for a while and this gateway answers."""
        sent = {k: v for k, v in headers.items() if k.lower() in FORWARDED_HEADERS}
        request = self.client.build_request(
            "POST", f"{peer}/v1/{endpoint}", content=raw, headers={**sent, FORWARDED: "1"}
        )
        try:
            response = await self.client.send(request, stream=True)
        except httpx.TransportError as error:
            self.peers.mark_down(peer, f"unreachable ({type(error).__name__})")
            return None
        if response.status_code == 503:
            await response.aclose()
            self.peers.mark_down(peer, "its engine is not available (503)")
            return None
        if response.status_code == 429 and BUSY in response.headers:
            await response.aclose()  # the home has --spill-at requests in flight: answer here
            self.metrics.spilled.labels(peer).inc()
            return None
        return response

    def too_busy_for(self, headers) -> bool:
        """Whether to turn away a request another gateway forwarded (it answers it itself):
        more than --spill-at others are in flight here."""
        return FORWARDED in headers and self.metrics.active - 1 >= self.spill_at

    async def send(self, endpoint: str, body: dict, stream: bool) -> httpx.Response:
        request = self.client.build_request(
            "POST",
            f"{self.supervisor.url}/v1/{endpoint}",
            content=json.dumps(body, separators=(",", ":")).encode(),
            headers={**self.supervisor.headers, "content-type": "application/json"},
        )
        try:
            return await self.client.send(request, stream=stream)
        except httpx.TransportError as error:
            self.supervisor.mark_down()
            raise engine_down(type(error).__name__) from None


def engine_error_message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
        return error.get("message", str(error)) if isinstance(error, dict) else str(error)
    except (ValueError, AttributeError):
        return response.text[:500] or f"HTTP {response.status_code}"


def read_usage(event: bytes) -> dict | None:
    """The usage object of one SSE event (``data: {...}``), if it has one."""
    try:
        payload = json.loads(event.partition(b"data:")[2])
    except ValueError:
        return None
    usage = payload.get("usage") if isinstance(payload, dict) else None
    return usage if isinstance(usage, dict) else None


async def relay_events(
    response: httpx.Response,
    client_wants_usage: bool,
    on_first: Callable[[], None],
    on_usage: Callable[[dict], None],
) -> AsyncIterator[bytes]:
    """The engine's SSE bytes, whole events at a time, minus a usage event we added."""
    pending = b""
    first = True
    async for chunk in response.aiter_raw():
        pending += chunk
        end = pending.rfind(EVENT_END)
        if end < 0:
            continue
        ready, pending = pending[: end + 2], pending[end + 2 :]
        if USAGE_MARK in ready:  # rare: the last event or two of a stream
            kept = []
            for event in ready.split(EVENT_END)[:-1]:
                usage = read_usage(event) if USAGE_MARK in event else None
                if usage is not None:
                    on_usage(usage)
                    if not client_wants_usage and b'"choices":[]' in event:
                        continue
                kept.append(event + EVENT_END)
            ready = b"".join(kept)
            if not ready:
                continue
        if first:
            on_first()
            first = False
        yield ready
    if pending:
        yield pending


def error_event(error: LorabayError) -> bytes:
    body = {"error": {"message": str(error), "type": "server_error", "code": error.code}}
    return b"data: " + json.dumps(body).encode() + EVENT_END


class RequestTimer:
    """Latency, TTFT and tokens of one request, recorded once at its end; in flight until then."""

    def __init__(self, metrics: GatewayMetrics, endpoint: str):
        self.metrics = metrics
        self.endpoint = endpoint
        self.started = time.perf_counter()
        self.labels = ("", "")
        self.done = False
        metrics.active += 1

    def first_token(self) -> None:
        self.metrics.ttft.labels(*self.labels).observe(time.perf_counter() - self.started)

    def usage(self, usage: dict) -> None:
        self.metrics.prompt_tokens.labels(*self.labels).inc(usage.get("prompt_tokens") or 0)
        self.metrics.generated_tokens.labels(*self.labels).inc(usage.get("completion_tokens") or 0)

    def forwarded(self, peer: str) -> None:
        """Sent on to ``peer``, which records the request itself."""
        if not self.done:
            self.done = True
            self.metrics.active -= 1
            self.metrics.forwarded.labels(peer).inc()

    def finish(self, status: int, code: str | None = None) -> None:
        if self.done:
            return
        self.done = True
        self.metrics.active -= 1
        self.metrics.requests.labels(*self.labels, self.endpoint, str(status)).inc()
        if status >= 400:
            self.metrics.errors.labels(*self.labels, code or str(status)).inc()
        else:
            self.metrics.latency.labels(*self.labels).observe(time.perf_counter() - self.started)


async def wait_cancelled(task: asyncio.Task) -> None:
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):
        pass
