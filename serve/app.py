"""The gateway's HTTP surface (FastAPI): OpenAI-compatible routes and health.

    /v1/chat/completions, /v1/completions   generation (stream=true: SSE); best_of and
                                            search with a verifier (serve/ttc.py)
    /v1/verify                              a verifier scores given solutions
    /v1/models, /v1/models/{id}             the base and the adapters the key may use
    /health                                 the gateway is alive
    /ready                                  the engine answers (the one engine state)

Metrics are not here: :func:`create_metrics_app` serves ``/metrics`` on its own
listener (``--metrics-port``), for the scraper, since they name every tenant's adapters.

Every error is an OpenAI-style body ``{"error": {"message", "type", "param", "code"}}``
built from the :class:`~lorabay.hub.errors.LorabayError` raised (``http_status``,
``code``), JSON with every non-ASCII character escaped (a lone surrogate a client sent
must not break the answer); nothing a client sends stops the gateway or shows a
traceback. Without API keys on a loopback address (:class:`LoopbackOnly`), only
requests to a loopback Host with JSON bodies are answered: a web page the user visits
can send neither without the browser asking first, so it cannot drive the gateway.
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager
from datetime import datetime

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorabay.hub.errors import LorabayError
from lorabay.serve.engine import engine_answer
from lorabay.serve.gateway import (
    ClientGone,
    Gateway,
    RequestTimer,
    engine_down,
    error_event,
    relay_events,
)
from lorabay.serve.peers import BUSY
from lorabay.serve.resolve import model_not_found
from lorabay.serve.ttc import answer_ttc, read_plan, read_verify_request
from lorabay.serve.ttc import verify as verify_solutions
from lorabay.serve.validate import CHAT, COMPLETIONS, parse_request

log = logging.getLogger("lorabay.serve")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    408: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
}
CLIENT_CLOSED = 499  # nginx's status for a client that went away before its answer
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: a lone surrogate (``"\\ud800"``) from a client, echoed
    in an error message, cannot be encoded as UTF-8 and would turn the answer into a
    plain-text 500."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(status: int, message: str, code: str | None, param: str | None = None):
    error_type = ERROR_TYPES.get(
        status, "server_error" if status >= 500 else "invalid_request_error"
    )
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return AsciiJSONResponse(body, status_code=status, headers=headers)


def lorabay_error_response(error: LorabayError) -> JSONResponse:
    return error_response(error.http_status, str(error), error.code, getattr(error, "param", None))


class LoopbackOnly:
    """ASGI middleware for a gateway without API keys on a loopback address: a request
    to ``/v1`` must name a loopback Host (DNS rebinding sends the attacker's own name)
    and a POST must be ``application/json`` (a cross-site form or ``text/plain`` fetch
    needs no preflight; JSON does, and the gateway answers no preflight)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        refusal = self.refusal(scope) if scope["type"] == "http" else None
        if refusal is None:
            await self.app(scope, receive, send)
            return
        status, message, code = refusal
        await error_response(status, message, code)(scope, receive, send)

    @staticmethod
    def refusal(scope) -> tuple[int, str, str] | None:
        if not scope["path"].startswith(("/v1", "/ui")):  # /ui: the console and its data
            return None  # /health, /ready: nothing to read or drive
        headers = {k.lower(): v for k, v in scope.get("headers") or []}
        host = headers.get(b"host", b"").decode("latin-1").lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if name not in LOOPBACK_HOSTS:
            return (
                403,
                f"Host {host[:100]!r} is not a loopback name: without --api-keys this gateway "
                "answers only requests addressed to localhost",
                "forbidden_host",
            )
        if scope.get("method") == "POST":
            media = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip()
            if media.lower() != "application/json":
                return (
                    415,
                    f"Content-Type must be application/json, not {media[:60]!r}",
                    "unsupported_media_type",
                )
        return None


def create_app(gateway: Gateway, loopback_only: bool = False) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await gateway.close()

    app = FastAPI(
        title="lorabay gateway",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.gateway = gateway
    if loopback_only:
        app.add_middleware(LoopbackOnly)

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
        return error_response(
            503, f"the engine is not ready ({gateway.supervisor.state})", "engine_unavailable"
        )

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            grant = gateway.authenticate(request.headers.get("authorization"))
            return {"object": "list", "data": await list_models(gateway, grant)}
        except LorabayError as error:
            return lorabay_error_response(error)

    @app.get("/v1/models/{model:path}")
    async def model(model: str, request: Request):
        try:
            grant = gateway.authenticate(request.headers.get("authorization"))
            return await find_model(gateway, grant, model)
        except LorabayError as error:
            return lorabay_error_response(error)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await generate(gateway, request, CHAT)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(gateway, request, COMPLETIONS)

    @app.post("/v1/verify")
    async def verify(request: Request):  # a verifier scores given solutions (serve/ttc.py)
        timer = RequestTimer(gateway.metrics, "verify")
        try:
            grant = gateway.authenticate(request.headers.get("authorization"))
            body = read_verify_request(await gateway.read_body(request))
            timer.begin()
            result = await verify_solutions(gateway, body, grant, timer)
            timer.finish(200)
            return AsciiJSONResponse(result)
        except ClientGone:
            timer.finish(CLIENT_CLOSED, "client_closed_request")
            return Response(status_code=CLIENT_CLOSED)
        except LorabayError as error:
            timer.finish(error.http_status, error.code)
            return lorabay_error_response(error)

    from lorabay.serve.ui import add_gateway_console  # /ui: the web console (serve/ui/)

    add_gateway_console(app, gateway)
    return app


def create_metrics_app(gateway: Gateway) -> FastAPI:
    """``/metrics`` for the scraper, on its own listener: per-adapter names, versions,
    tokens and errors of every tenant are not for the API's clients."""
    app = FastAPI(title="lorabay metrics", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/metrics")
    async def metrics():
        return Response(gateway.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


# -- /v1/models ------------------------------------------------------------------------


def base_card(gateway: Gateway) -> dict:
    return {
        "id": gateway.resolver.served_name,
        "object": "model",
        "created": 0,
        "owned_by": "lorabay",
        "kind": "base",
        "max_model_len": gateway.max_model_len,
    }


def owner_of(name: str) -> str:
    # The namespace, as OpenAI names an organisation; never created_by (user@host).
    return name.split("/", 1)[0] if "/" in name else "lorabay"


def adapter_card(gateway: Gateway, manifest, aliases: list[str]) -> dict:
    return {
        "id": manifest.ref,
        "object": "model",
        "created": epoch_seconds(manifest.created_at),
        "owned_by": owner_of(manifest.name),
        "parent": gateway.resolver.served_name,
        "kind": manifest.kind,
        "name": manifest.name,
        "version": manifest.version,
        "digest": manifest.digest,
        "aliases": aliases,
        "description": manifest.description,
    }


def aliases_of(manifest, table: dict[str, int], latest: int) -> list[str]:
    names = sorted(a for a, v in table.items() if v == manifest.version)
    return names + ["latest"] if latest == manifest.version else names


async def list_models(gateway: Gateway, grant) -> list[dict]:
    resolver = gateway.resolver
    registry = resolver.registry

    def read() -> list[tuple]:
        manifests = [m for m in registry.list() if grant.allows(m.name)]
        aliases = registry.alias_tables({m.name for m in manifests})  # one LIST, few GETs
        return manifests, aliases

    manifests, aliases = await asyncio.to_thread(read)
    latest = {}
    for manifest in manifests:
        latest[manifest.name] = max(latest.get(manifest.name, 0), manifest.version)
    cards = [base_card(gateway)]
    for manifest in sorted(manifests, key=lambda m: (m.name, m.version)):
        if resolver.fits(manifest):
            names = aliases_of(manifest, aliases[manifest.name], latest[manifest.name])
            cards.append(adapter_card(gateway, manifest, names))
    return cards


async def find_model(gateway: Gateway, grant, model: str) -> dict:
    """One card (the openai client's ``models.retrieve``): the same 404 for a model that
    is missing, not the key's, or not one this base serves."""
    if model == gateway.resolver.served_name:
        return base_card(gateway)
    target = await gateway.resolver.resolve(model, grant)
    manifest = target.manifest
    if not gateway.resolver.fits(manifest):
        raise model_not_found(model)
    registry = gateway.resolver.registry

    def read():
        versions = [m.version for m in registry.list() if m.name == manifest.name]
        return registry.alias_tables({manifest.name})[manifest.name], max(versions, default=0)

    table, latest = await asyncio.to_thread(read)
    return adapter_card(gateway, manifest, aliases_of(manifest, table, latest))


def epoch_seconds(iso: str) -> int:
    try:
        return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())
    except (ValueError, AttributeError):
        return 0


# -- generation ------------------------------------------------------------------------


async def generate(gateway: Gateway, request: Request, endpoint: str):
    """One generation request: authenticate, read and check the body, then answer it
    while watching the client: one that hangs up before its (non-streamed) answer
    cancels it, and the engine, seeing its connection close, aborts the generation."""
    timer = RequestTimer(gateway.metrics, endpoint)
    try:
        grant = gateway.authenticate(request.headers.get("authorization"))
        raw = await gateway.read_body(request)
        body = parse_request(raw, endpoint, gateway.max_model_len, gateway.max_n)
        plan = read_plan(body, endpoint, gateway.search_limits)  # best_of, search: ttc.py
    except ClientGone:
        timer.finish(CLIENT_CLOSED, "client_closed_request")
        return Response(status_code=CLIENT_CLOSED)  # nobody reads it
    except LorabayError as error:
        timer.finish(error.http_status, error.code)
        return lorabay_error_response(error)
    timer.begin()  # in flight from here: the body is whole and valid
    work = asyncio.ensure_future(answer(gateway, request, endpoint, raw, body, grant, timer, plan))
    gone = asyncio.ensure_future(wait_disconnect(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not work.done():
            work.cancel()
        gone.cancel()
        await asyncio.gather(work, gone, return_exceptions=True)
    if work.cancelled():
        timer.finish(CLIENT_CLOSED, "client_closed_request")
        return Response(status_code=CLIENT_CLOSED)
    return work.result()


async def wait_disconnect(request: Request) -> None:
    """Return once the client has gone (the body is read by then: nothing else is)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def answer(gateway: Gateway, request: Request, endpoint: str, raw, body, grant, timer, plan):
    lease = None
    streaming = False
    try:
        path = f"/v1/{endpoint}"
        forwarded = gateway.forwarded_by_peer(path, raw, request.headers)
        if gateway.too_busy_for(forwarded):  # the gateway that forwarded it answers it
            timer.finish(429, "busy")
            message = f"{gateway.spill_at} requests in flight here; answer it where it arrived"
            response = error_response(429, message, "busy")
            response.headers[BUSY] = "1"
            return response
        peer = await gateway.peer_for(body, forwarded)
        if peer is not None:  # another gateway is home to this adapter (--peers)
            relayed = await gateway.forward(peer, path, raw, request.headers)
            if relayed is not None:
                timer.forwarded(peer)
                return peer_response(relayed)
        if plan is not None:  # best-of-N or beam search with a verifier (serve/ttc.py)
            result = await answer_ttc(gateway, endpoint, body, plan, grant, timer)
            timer.finish(200)
            return AsciiJSONResponse(result)
        target, lease = await gateway.open_target(body, grant)
        timer.labels = target.labels
        body["model"] = target.engine_name if lease is None else lease.engine_name
        # Each key's own prefix cache: no tenant can tell another's prompts by its speed.
        body["cache_salt"] = gateway.cache_salt(grant)
        stream = body.get("stream") is True
        wants_usage = stream and ask_for_usage(body)
        response = await gateway.send(endpoint, body)
        if response.status_code == 404 and lease is not None:
            # The engine lost the adapter (it never should): load it again, once.
            await response.aclose()
            gateway.pool.forget(lease.key)
            gateway.pool.release(lease)
            lease = None
            target, lease = await gateway.open_target(body | {"model": target_ref(target)}, grant)
            response = await gateway.send(endpoint, body)
        if not stream or response.status_code != 200:
            return await finish_plain(gateway, response, timer)
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
            timer.finish(CLIENT_CLOSED, "client_closed_request")


def ask_for_usage(body: dict) -> bool:
    """Make a stream end with a usage event (the token metrics need it); whether the
    client asked for one itself. A client's own ``stream_options`` go on unchanged; for
    one that did not ask, only the final usage event is requested (never one per chunk),
    and the relay drops it again."""
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return True
    body["stream_options"] = {
        **(options or {}),
        "include_usage": True,
        "continuous_usage_stats": False,
    }
    return False


def target_ref(target) -> str:
    # The exact content this request was resolved to: a retry never picks another version.
    return f"{target.name}@{target.manifest.digest}"


async def finish_plain(gateway: Gateway, response, timer: RequestTimer) -> Response:
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
        except (ValueError, AttributeError):
            pass
        timer.finish(200)
        return Response(content, status_code=200, media_type="application/json")
    if status >= 500 and not await gateway.engine_answers():
        # Its engine core died under the request (vLLM answers 500): that is a 503, the
        # engine is down, not a bad gateway.
        gateway.supervisor.mark_down()
        down = engine_down(f"it failed while answering ({engine_answer(response)[:200]})")
        timer.finish(503, down.code)
        return lorabay_error_response(down)
    # The engine's own refusal (a prompt beyond the context, a field vLLM rejects): the
    # same message, in the gateway's error shape; its failures are a bad gateway.
    code = {400: "invalid_request_error", 404: "model_not_found"}.get(status, "engine_error")
    if status >= 500 and status != 503:
        status = 502
    timer.finish(status, code)
    return error_response(status, engine_answer(response), code, engine_error_param(content))


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
        self.status, self.code = CLIENT_CLOSED, "client_closed_request"  # until the body starts
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
