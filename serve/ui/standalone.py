"""`lorabay hub ui`: the web console for a registry with no engine behind it.

    run_console("file:///srv/registry", port=8700, on_ready=print)   # until SIGINT/SIGTERM

The adapters list and the version pages, as a gateway serves them at ``/ui``; no
playground and no traffic (nothing generates here). Loopback by default; any other
address needs ``--api-keys`` (the key file ``lorabay serve`` reads), and without keys on
loopback only requests addressed to a loopback Host are answered (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

from lorabay.hub.errors import ConfigError


def create_console_app(console, loopback_only: bool):
    from fastapi import FastAPI
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from lorabay.serve.app import LoopbackOnly
    from lorabay.serve.responses import error_response
    from lorabay.serve.ui.routes import add_console

    app = FastAPI(title="lorabay console", docs_url=None, redoc_url=None, openapi_url=None)
    if loopback_only:
        app.add_middleware(LoopbackOnly)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, error: StarletteHTTPException):
        return error_response(error.status_code, str(error.detail), None)

    add_console(app, console)
    return app


def run_console(
    registry_url: str | None,
    *,
    host: str = "127.0.0.1",
    port: int = 8700,
    api_keys: str | None = None,
    base: str | None = None,
    max_rank: int | None = None,
    on_ready: Callable[[str], None] = print,
) -> None:
    """Serve the console until SIGINT/SIGTERM; ``on_ready`` gets its URL once it listens."""
    try:
        import uvicorn

        from lorabay.serve.options import is_loopback
        from lorabay.serve.server import bind_socket, bounded_protocol, socket_url
    except ImportError as error:
        raise ConfigError(
            f"the console needs the serve extra ({error.name} is missing)",
            "pip install 'lorabay[serve]'",
        ) from None
    from lorabay.hub import Registry
    from lorabay.serve.keys import load_api_keys
    from lorabay.serve.ui.console import registry_console

    loopback = is_loopback(host)
    if not loopback and api_keys is None:
        raise ConfigError(
            f"--host {host} is not a loopback address: anyone who reaches it would read "
            "the registry",
            "pass --api-keys FILE (the keys `lorabay serve` reads), or keep the default host",
        )
    keys = load_api_keys(api_keys) if api_keys else None
    console = registry_console(Registry.open(registry_url), keys, base, max_rank)
    app = create_console_app(console, loopback_only=keys is None and loopback)
    sock = bind_socket(host, port)
    config = uvicorn.Config(
        app, http=bounded_protocol(), log_level="warning", access_log=False, lifespan="off"
    )
    server = uvicorn.Server(config)

    async def serve() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        if server.started:
            on_ready(f"{socket_url(sock)}/ui")
        await task

    # SIGINT/SIGTERM end the command with status 0: before uvicorn serves, at once; while
    # it serves, uvicorn shuts down and then raises the signal again, which lands here.
    def stop(signum, frame):
        raise SystemExit(0)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        asyncio.run(serve())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
