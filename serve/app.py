"""The gateway's HTTP surface (FastAPI): its routes, and nothing else.

    /v1/chat/completions, /v1/completions   generation (serve/generate.py; stream=true:
                                            SSE; best_of and search: serve/ttc.py)
    /v1/verify                              a verifier scores given solutions
    /v1/models, /v1/models/{id}             the base and the adapters the key may use
                                            (serve/models.py)
    /health                                 the gateway is alive
    /ready                                  the engine answers (the one engine state)
    /ui                                     the web console (serve/ui/)

Metrics are not here: :func:`create_metrics_app` serves ``/metrics`` on its own
listener (``--metrics-port``), for the scraper, since they name every tenant's adapters.

Every error is an OpenAI-style body (serve/responses.py); nothing a client sends stops
the gateway or shows a traceback. Without API keys on a loopback address
(:class:`LoopbackOnly`), only requests to a loopback Host with JSON bodies are
answered: a web page the user visits can send neither without the browser asking
first, so it cannot drive the gateway.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorabay.hub.errors import LorabayError
from lorabay.serve.gateway import Gateway
from lorabay.serve.generate import generate, verify
from lorabay.serve.models import find_model, list_models
from lorabay.serve.responses import error_response, lorabay_error_response
from lorabay.serve.validate import CHAT, COMPLETIONS

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})


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
    async def verify_route(request: Request):  # a verifier scores given solutions (serve/ttc.py)
        return await verify(gateway, request)

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
