"""The gateway's HTTP surface (FastAPI): OpenAI-compatible routes, health and metrics.

    /v1/chat/completions, /v1/completions   generation (stream=true: SSE)
    /v1/models                              the base and the adapters the key may use
    /health                                 the gateway is alive
    /ready                                  the engine answers
    /metrics                                Prometheus

Every error is an OpenAI-style body ``{"error": {"message", "type", "param", "code"}}``
built from the :class:`~lorabay.hub.errors.LorabayError` raised (``http_status``,
``code``); nothing a client sends stops the gateway.
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager
from datetime import datetime

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from lorabay.hub.errors import LorabayError
from lorabay.serve.gateway import (
    Gateway,
    RequestTimer,
    engine_down,
    engine_error_message,
    error_event,
    relay_events,
)
from lorabay.serve.peers import BUSY
from lorabay.serve.validate import CHAT, COMPLETIONS, parse_request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("lorabay.serve")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "conflict_error",
    422: "invalid_request_error",
}


def error_response(status: int, message: str, code: str | None, param: str | None = None):
    error_type = ERROR_TYPES.get(
        status, "server_error" if status >= 500 else "invalid_request_error"
    )
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


def lorabay_error_response(error: LorabayError) -> JSONResponse:
    return error_response(error.http_status, str(error), error.code, getattr(error, "param", None))


def create_app(gateway: Gateway) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await gateway.close()

    app = FastAPI(title="lorabay gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.gateway = gateway

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        return error_response(error.status_code, str(error.detail), None)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if gateway.supervisor.ready:
            return {"status": "ready"}
        return error_response(503, "the engine is not ready", "engine_unavailable")

    @app.get("/metrics")
    async def metrics():
        gateway.metrics.registry_fetches.set(gateway.resolver.registry.pull_stats.fetched)
        return Response(gateway.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            grant = gateway.authenticate(request.headers.get("authorization"))
            return {"object": "list", "data": await list_models(gateway, grant)}
        except LorabayError as error:
            return lorabay_error_response(error)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await generate(gateway, request, CHAT)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(gateway, request, COMPLETIONS)

    return app


async def list_models(gateway: Gateway, grant) -> list[dict]:
    resolver = gateway.resolver
    cards = [
        {
            "id": resolver.served_name,
            "object": "model",
            "created": 0,
            "owned_by": "lorabay",
            "kind": "base",
            "max_model_len": gateway.max_model_len,
        }
    ]
    registry = resolver.registry

    def read() -> list[tuple]:
        manifests = [m for m in registry.list() if grant.allows(m.name)]
        aliases = registry.alias_tables({m.name for m in manifests})  # one LIST, few GETs
        return manifests, aliases

    manifests, aliases = await asyncio.to_thread(read)
    latest = {}
    for manifest in manifests:
        latest[manifest.name] = max(latest.get(manifest.name, 0), manifest.version)
    for manifest in sorted(manifests, key=lambda m: (m.name, m.version)):
        if not resolver.fits(manifest):
            continue
        names = sorted(a for a, v in aliases[manifest.name].items() if v == manifest.version)
        if latest[manifest.name] == manifest.version:
            names.append("latest")
        cards.append(
            {
                "id": manifest.ref,
                "object": "model",
                "created": epoch_seconds(manifest.created_at),
                "owned_by": manifest.created_by or "lorabay",
                "parent": resolver.served_name,
                "kind": manifest.kind,
                "name": manifest.name,
                "version": manifest.version,
                "digest": manifest.digest,
                "aliases": names,
                "description": manifest.description,
            }
        )
    return cards


def epoch_seconds(iso: str) -> int:
    try:
        return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())
    except (ValueError, AttributeError):
        return 0


async def generate(gateway: Gateway, request: Request, endpoint: str):
    timer = RequestTimer(gateway.metrics, endpoint)
    lease = None
    streaming = False
    try:
        grant = gateway.authenticate(request.headers.get("authorization"))
        raw = await gateway.read_body(request)
        body = parse_request(raw, endpoint, gateway.max_model_len)
        if gateway.too_busy_for(request.headers):  # the gateway that forwarded it answers it
            timer.finish(429, "busy")
            message = f"{gateway.spill_at} requests in flight here; answer it where it arrived"
            response = error_response(429, message, "busy")
            response.headers[BUSY] = "1"
            return response
        peer = await gateway.peer_for(body, request.headers)
        if peer is not None:  # another gateway is home to this adapter (--peers)
            forwarded = await gateway.forward(peer, endpoint, raw, request.headers)
            if forwarded is not None:
                timer.forwarded(peer)
                return peer_response(forwarded)
        target, lease = await gateway.open_target(body, grant)
        timer.labels = target.labels
        body["model"] = target.engine_name
        stream = body.get("stream") is True
        wants_usage = False
        if stream:
            options = body.get("stream_options") or {}
            wants_usage = options.get("include_usage") is True
            body["stream_options"] = {**options, "include_usage": True}
        response = await gateway.send(endpoint, body, stream)
        if response.status_code == 404 and lease is not None:
            # The engine lost the adapter (it never should): load it again, once.
            await response.aclose()
            gateway.pool.forget(lease.key)
            gateway.pool.release(lease)
            lease = None
            target, lease = await gateway.open_target(body | {"model": target_ref(target)}, grant)
            response = await gateway.send(endpoint, body, stream)
        if not stream or response.status_code != 200:
            return await finish_plain(gateway, response, timer, lease)
        held, lease = lease, None  # the stream releases it when it ends
        streaming = True  # and finishes the timer
        return relay_response(StreamRelay(gateway, response, timer, held, wants_usage))
    except LorabayError as error:
        timer.finish(error.http_status, error.code)
        return lorabay_error_response(error)
    except Exception as error:  # a bug must cost one request, never the gateway
        log.exception("request failed")
        timer.finish(500, "internal_error")
        return error_response(500, f"internal error: {type(error).__name__}", "internal_error")
    finally:
        if lease is not None:
            gateway.pool.release(lease)
        if not streaming:  # cancelled: the client went away before its answer
            timer.finish(499, "client_closed_request")


def target_ref(target) -> str:
    # The exact content this request was resolved to: a retry never picks another version.
    return f"{target.name}@{target.manifest.digest}"


async def finish_plain(gateway: Gateway, response, timer: RequestTimer, lease) -> Response:
    try:
        content = await response.aread()
    except Exception as error:  # the engine died mid-answer
        gateway.supervisor.mark_down()
        down = engine_down(type(error).__name__)
        timer.finish(503, down.code)
        return lorabay_error_response(down)
    finally:
        await response.aclose()
    status = response.status_code
    if status == 200:
        try:
            usage = json.loads(content).get("usage")
            if isinstance(usage, dict):
                timer.usage(usage)
        except ValueError:
            pass
        timer.finish(200)
        return Response(content, status_code=200, media_type="application/json")
    # The engine's own refusal (a prompt beyond the context, a field vLLM rejects): the
    # same message, in the gateway's error shape; its failures are a bad gateway.
    code = {400: "invalid_request_error", 404: "model_not_found"}.get(status, "engine_error")
    if status >= 500 and status != 503:
        status = 502
    timer.finish(status, code)
    return error_response(status, engine_error_message(response), code, engine_error_param(content))


def engine_error_param(content: bytes) -> str | None:
    try:
        param = json.loads(content)["error"].get("param")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return param if isinstance(param, str) else None


class StreamRelay:
    """One streamed answer: the engine's events relayed, then everything it holds let go
    (the engine response, the adapter lease, the in-flight gauge) exactly once, however
    it ends: finished, the engine dead midway, or the client gone before it started."""

    def __init__(self, gateway: Gateway, response, timer: RequestTimer, lease, wants_usage):
        self.gateway, self.response, self.timer = gateway, response, timer
        self.lease, self.wants_usage = lease, wants_usage
        self.status, self.code = 499, "client_closed_request"  # until the body starts
        self.closed = False

    async def events(self):
        self.status, self.code = 200, None
        try:
            async for chunk in relay_events(
                self.response, self.wants_usage, self.timer.first_token, self.timer.usage
            ):
                yield chunk
        except Exception as error:  # the engine died mid-stream: the status line is sent
            self.gateway.supervisor.mark_down()
            down = engine_down(type(error).__name__)
            self.status, self.code = 503, "engine_unavailable"
            yield error_event(down)
        finally:
            await self.close()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.timer.finish(self.status, self.code)
        try:
            await self.response.aclose()
        finally:
            if self.lease is not None:
                self.gateway.pool.release(self.lease)


SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class ClosingStream(StreamingResponse):
    """A StreamingResponse that runs ``on_close`` however it ends, even when the body never
    started: a client that leaves first makes Starlette cancel the body before its generator
    ever runs, and a generator that never ran has no ``finally`` to run."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await asyncio.shield(self.on_close())


def relay_response(relay: StreamRelay) -> ClosingStream:
    return ClosingStream(
        relay.events(), relay.close, media_type="text/event-stream", headers=SSE_HEADERS
    )


def peer_response(response) -> ClosingStream:
    """A peer gateway's answer, passed through as it comes (status, type, bytes)."""
    headers = {k: v for k, v in response.headers.items() if k.lower() in SSE_HEADERS}
    return ClosingStream(
        response.aiter_raw(),
        response.aclose,
        status_code=response.status_code,
        media_type=response.headers.get("content-type"),
        headers=headers,
    )
