"""The web console's routes: its pages under ``/ui``, its JSON under ``/ui/api``.

    GET /ui                      the page (static: it holds no data)
    GET /ui/static/NAME          its scripts and style (a fixed list: no path from a client)
    GET /ui/api/info             what this server offers (base, playground, traffic)
    GET /ui/api/adapters[?all=1] the rows of `hub list` (`--all`) for the key's names
    GET /ui/api/version?ref=REF  one version: manifest, fit, aliases, events, lineage
    GET /ui/api/traffic          the gateway's counters for the key's adapters

Every ``/ui/api`` call wants the key (``Authorization: Bearer``), checked as ``/v1``
checks it; the page keeps it in the tab's session storage and sends it as that header,
never as a cookie, so no other site can make the browser send it. Nothing here changes
state: the playground generates through ``/v1`` itself. Every answer carries a strict
Content-Security-Policy (scripts only from this origin, no inline code, no framing) and
the page writes data with ``textContent`` only.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import Response

from lorabay.hub.errors import LorabayError
from lorabay.serve.responses import AsciiJSONResponse, lorabay_error_response
from lorabay.serve.ui.console import Console

STATIC = Path(__file__).parent / "static"
# name -> media type: the only files served (a client's path never reaches the disk)
FILES = {
    "console.css": "text/css",
    "console.js": "text/javascript",
    "dom.js": "text/javascript",
    "graph.js": "text/javascript",
    "charts.js": "text/javascript",
    "pages.js": "text/javascript",
    "playground.js": "text/javascript",
}
CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


def secured(response: Response) -> Response:
    response.headers.update(SECURITY_HEADERS)
    return response


def add_console(app: FastAPI, console: Console) -> None:
    """Mount the console's routes on ``app`` (the gateway's, or `hub ui`'s own)."""

    async def answer(request: Request, work) -> Response:
        try:
            grant = console.authenticate(request.headers.get("authorization"))
            body = await asyncio.to_thread(work, grant)
            return secured(AsciiJSONResponse(body))
        except LorabayError as error:
            return secured(lorabay_error_response(error))

    @app.get("/ui")
    @app.get("/ui/")
    async def page():
        html = (STATIC / "index.html").read_bytes()
        return secured(Response(html, media_type="text/html; charset=utf-8"))

    @app.get("/ui/static/{name}")
    async def static(name: str):
        media = FILES.get(name)
        if media is None:
            response = AsciiJSONResponse({"error": {"message": "not found"}}, status_code=404)
            return secured(response)
        return secured(Response((STATIC / name).read_bytes(), media_type=media))

    @app.get("/ui/api/info")
    async def info(request: Request):
        return await answer(request, console.info)

    @app.get("/ui/api/adapters")
    async def adapters(request: Request, all: str = ""):
        include_yanked = all in ("1", "true")
        return await answer(request, lambda grant: console.adapters(grant, include_yanked))

    @app.get("/ui/api/version")
    async def version(request: Request, ref: str = ""):
        return await answer(request, lambda grant: console.version(grant, ref))

    @app.get("/ui/api/traffic")
    async def traffic(request: Request):
        return await answer(request, console.traffic)
