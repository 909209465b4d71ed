"""`lorabay serve`, run: start the engine, wait for it, serve the gateway, stop both.

    from lorabay.serve.server import ServeOptions, run_server
    run_server(ServeOptions(base="./tiny", port=8000))

One log line per stage (engine starting, engine ready in N s, gateway listening on
URL, stopping). SIGINT or SIGTERM at any point stops the gateway and the engine's
whole process group; an engine that fails to start ends the command with its own
error (:class:`~lorabay.hub.errors.EngineStartFailed`) and nothing left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import sys
import time

from lorabay.hub.errors import ConfigError
from lorabay.serve.engine import EngineConfig, EngineSupervisor
from lorabay.serve.options import ServeOptions, check_options

__all__ = ["ServeOptions", "run_server"]

log = logging.getLogger("lorabay.serve")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "time": round(record.created, 3),
                "level": record.levelname.lower(),
                "logger": record.name,
                "message": record.getMessage(),
            }
        )


def configure_logging(json_logs: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if json_logs
        else logging.Formatter("%(asctime)s lorabay %(levelname)s %(message)s", "%H:%M:%S")
    )
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False


def bind_socket(host: str, port: int) -> socket.socket:
    """The gateway's listening socket, bound before the engine starts: a taken port
    fails in a second, not after the engine's minute of loading."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as error:
        raise ConfigError(
            f"--host {host} --port {port}: cannot listen there ({error.strerror or error})",
            "pick another --port (0: any free one)",
        ) from None
    sock.set_inheritable(False)
    return sock


def socket_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run_server(options: ServeOptions) -> None:
    """Serve until SIGINT/SIGTERM. Raises ConfigError or EngineStartFailed."""
    from lorabay.hub import Registry
    from lorabay.serve.keys import load_api_keys

    check_options(options)
    configure_logging(options.json_logs)
    keys = load_api_keys(options.api_keys) if options.api_keys else None
    registry = Registry.open(options.registry)
    asyncio.run(serve_async(options, registry, keys))


async def serve_async(options: ServeOptions, registry, keys) -> None:
    supervisor = EngineSupervisor(EngineConfig.from_options(options))
    sock = bind_socket(options.host, options.port)
    try:
        if not await start_engine_interruptibly(supervisor):
            return
        await serve_gateway(options, supervisor, registry, keys, sock)
    finally:
        await supervisor.stop()
        sock.close()
        log.info("stopped")


async def start_engine_interruptibly(supervisor: EngineSupervisor) -> bool:
    """Start the engine; False when SIGINT/SIGTERM came first (then nothing is running)."""
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    received: list[int] = []

    def on_signal(signum: int) -> None:
        received.append(signum)
        if len(received) == 1:
            log.info("stopping (%s) while the engine starts", signal.Signals(signum).name)
            main.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await supervisor.start()
        return True
    except asyncio.CancelledError:
        if received:
            return False
        raise
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


async def serve_gateway(options, supervisor, registry, keys, sock) -> None:
    import uvicorn
    from lorabay.serve.app import create_app
    from lorabay.serve.gateway import Gateway
    from lorabay.serve.peers import Peers
    from lorabay.serve.resolve import ModelResolver

    resolver = ModelResolver(
        registry, options.served_model_name, options.base, max_rank=options.max_lora_rank
    )
    gateway = Gateway(
        supervisor=supervisor,
        resolver=resolver,
        keys=keys,
        max_loaded=options.max_loaded,
        max_body_bytes=options.max_body_bytes,
        peers=Peers(options.peers, sock.getsockname()[1]) if options.peers else None,
        spill_at=options.spill_at if options.spill_at is not None else options.max_num_seqs,
    )
    await gateway.connect()
    await asyncio.to_thread(resolver.warm_up)
    supervisor.start_watching()
    config = uvicorn.Config(
        create_app(gateway),
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
        timeout_keep_alive=30,
    )
    server = uvicorn.Server(config)

    # uvicorn catches SIGINT/SIGTERM while it serves, shuts down gracefully, then
    # re-raises the signal to the handler it found: make that one harmless, so the
    # caller's `finally` (which stops the engine) runs instead of the default action.
    def request_exit(signum, frame) -> None:
        server.should_exit = True

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, request_exit)
    announcer = asyncio.create_task(announce(server, socket_url(sock), options))
    try:
        await server.serve(sockets=[sock])
    finally:
        announcer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await announcer
        log.info("gateway stopped")


async def announce(server, url: str, options: ServeOptions) -> None:
    started = time.monotonic()
    while not server.started:
        await asyncio.sleep(0.02)
        if time.monotonic() - started > 60:
            return
    keys = "API keys required" if options.api_keys else "no API keys"
    log.info("gateway listening on %s (base %s, %s)", url, options.served_model_name, keys)
