"""`lorabay serve`, run: start the engine, wait for it, serve the gateway, stop both.

    from lorabay.serve.server import ServeOptions, run_server
    run_server(ServeOptions(base="./tiny", port=8000))

One log line per stage (engine starting, engine ready in N s, gateway listening on
URL, stopping). SIGINT or SIGTERM at any point, from the first line to the last,
stops the gateway and the engine's whole process group (the engine runs in its own
session, so nothing else would reach it); an engine that fails to start ends the
command with its own error (:class:`~lorabay.serve.errors.EngineStartFailed`) and
nothing left running.

Connections are bounded (:func:`bounded_protocol`): a client has
``HEADER_TIMEOUT_SECONDS`` to send a request line and headers once it has started
(a new connection: at once; 408, then the connection closes) and an idle keep-alive
connection closes after ``KEEP_ALIVE_SECONDS``; the gateway bounds the body itself (408 after
``BODY_IDLE_SECONDS`` without a byte). ``--metrics-port`` opens a second listener
that serves ``/metrics`` and nothing else, while the API listener never serves it.
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
from lorabay.serve.options import ServeOptions, check_options, is_loopback

__all__ = ["ServeOptions", "run_server"]

log = logging.getLogger("lorabay.serve")

HEADER_TIMEOUT_SECONDS = 10.0
# Longer than the idle time of the clients' connection pools (httpx, so the openai client,
# 5 s; aiohttp 15 s): a server that closes an idle connection first races a client
# sending on it (a ReadError now and then).
KEEP_ALIVE_SECONDS = 30
TIMEOUT_ANSWER = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
)


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


def bind_socket(host: str, port: int, flag: str = "--port") -> socket.socket:
    """A listening socket, bound before the engine starts: a taken port fails in a
    second, not after the engine's minute of loading."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as error:
        raise ConfigError(
            f"{flag} {port} on {host}: cannot listen there ({error.strerror or error})",
            f"pick another {flag} (0: any free one)",
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
    from lorabay.serve.peers import read_peer_secret

    check_options(options)
    configure_logging(options.json_logs)
    keys = load_api_keys(options.api_keys) if options.api_keys else None
    secret = read_peer_secret(options.peer_secret_file) if options.peer_secret_file else None
    registry = Registry.open(options.registry)
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(serve_async(options, registry, keys, secret))


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The gateway's event loop: uvloop's (the serve extra pins it; vLLM's API server runs
    on it too), else asyncio's. Every streamed token is a socket read from the engine and
    a write to the client; on a 2-core machine the gateway's loop took 12% of a core under
    32 streams, half of it in asyncio's Python transports (py-spy), CPU the engine beside
    it computes with."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class Stopper:
    """SIGINT/SIGTERM for the whole run: before uvicorn serves, the first signal cancels
    the task that starts things (its ``finally`` stops the engine); while it serves,
    uvicorn's own handlers take over and shut it down gracefully. Later signals are
    ignored, so nothing interrupts the engine's stop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.task = asyncio.current_task()
        self.received: int | None = None
        self.server = None  # the uvicorn.Server, once there is one
        self.stopping = False  # set once the engine is being stopped: nothing may cancel that

    def __enter__(self) -> Stopper:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.loop.add_signal_handler(signum, self.on_signal, signum)
        return self

    def __exit__(self, *exc) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.loop.remove_signal_handler(signum)

    def on_signal(self, signum: int) -> None:
        if self.received is not None or self.stopping:
            return
        self.received = signum
        if self.server is not None and self.server.started:
            self.server.should_exit = True
            return
        log.info("stopping (%s)", signal.Signals(signum).name)
        self.task.cancel()


def ignore_cancelled_socket_waits(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """The loop's exception handler, but for one harmless race in anyio (4.16) under
    httpx's Unix-socket transport to the engine: a socket wait is a Future whose
    ``set_result`` is the socket's reader; when a client hangs up and its request is
    cancelled in the same loop turn as the engine's answer arrives, the reader calls
    ``set_result`` on the cancelled Future and asyncio logs InvalidStateError with a
    traceback. Nothing is lost (the request is gone); every other error is logged as before.
    (uvloop's handles do not show their callback's Future: there, a set_result callback.)"""
    error = context.get("exception")
    handle = context.get("handle")
    callback = getattr(handle, "_callback", None)
    future = getattr(callback, "__self__", None)
    if isinstance(error, asyncio.InvalidStateError) and (
        (
            isinstance(future, asyncio.Future)
            and future.cancelled()
            and getattr(callback, "__name__", "") == "set_result"
        )
        or (callback is None and repr(handle) == "<Handle Future.set_result>")  # uvloop
    ):
        log.debug("a cancelled request's socket wait was woken after its cancel")
        return
    loop.default_exception_handler(context)


async def serve_async(options: ServeOptions, registry, keys, peer_secret=None) -> None:
    asyncio.get_running_loop().set_exception_handler(ignore_cancelled_socket_waits)
    supervisor = EngineSupervisor(EngineConfig.from_options(options))
    sockets = [bind_socket(options.host, options.port)]
    if options.metrics_port is not None:
        sockets.append(bind_socket(options.metrics_host, options.metrics_port, "--metrics-port"))
    with Stopper() as stopper:
        try:
            await supervisor.start()
            await serve_gateway(options, supervisor, registry, keys, peer_secret, sockets, stopper)
        except asyncio.CancelledError:
            if stopper.received is None:
                raise
        finally:
            stopper.stopping = True
            await supervisor.stop()
            for sock in sockets:
                sock.close()
            log.info("stopped")


async def serve_gateway(options, supervisor, registry, keys, peer_secret, sockets, stopper):
    import uvicorn

    from lorabay.hub.signing import TrustPolicy
    from lorabay.serve.app import create_app, create_metrics_app
    from lorabay.serve.gateway import Gateway
    from lorabay.serve.peers import Peers
    from lorabay.serve.resolve import ModelResolver

    resolver = ModelResolver(
        registry,
        options.served_model_name,
        options.base,
        max_rank=options.max_lora_rank,
        trust=TrustPolicy.load(options.trust) if options.trust else None,
    )
    api_socket = sockets[0]
    gateway = Gateway(
        supervisor=supervisor,
        resolver=resolver,
        keys=keys,
        max_loaded=options.loaded_limit,
        max_body_bytes=options.max_body_bytes,
        max_n=options.max_n,
        search_limits=options.search_limits,
        peers=Peers(options.peers, api_socket.getsockname()[1]) if options.peers else None,
        peer_secret=peer_secret,
        spill_at=options.spill_limit,
    )
    await gateway.connect()
    await asyncio.to_thread(resolver.warm_up)
    supervisor.start_watching()
    api = create_app(gateway, loopback_only=keys is None and is_loopback(options.host))
    app = api
    if len(sockets) > 1:
        app = ByListener(api, create_metrics_app(gateway), sockets[1].getsockname()[1])
    config = uvicorn.Config(
        app,
        http=bounded_protocol(),
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
    )
    server = uvicorn.Server(config)
    stopper.server = server
    urls = [socket_url(sock) for sock in sockets]
    announcer = asyncio.create_task(announce(server, urls, options))
    try:
        await server.serve(sockets=sockets)
    finally:
        announcer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await announcer
        log.info("gateway stopped")


class ByListener:
    """One uvicorn server, two listeners: requests to the metrics port reach only the
    metrics app, every other request only the API."""

    def __init__(self, api, metrics, metrics_port: int) -> None:
        self.api, self.metrics, self.metrics_port = api, metrics, metrics_port

    async def __call__(self, scope, receive, send) -> None:
        server = scope.get("server") or (None, None)
        if scope["type"] != "lifespan" and server[1] == self.metrics_port:
            await self.metrics(scope, receive, send)
        else:
            await self.api(scope, receive, send)


def bounded_protocol(header_seconds: float = HEADER_TIMEOUT_SECONDS) -> type:
    """uvicorn's HTTP protocol (httptools, else h11) with a deadline for each request's
    headers: a new connection that sends nothing, or headers byte by byte, is answered 408
    and closed after ``header_seconds``, instead of holding a slot for ever. Between two
    requests on one connection the clock is uvicorn's keep-alive instead; the next
    request's first byte starts its header deadline."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    body = json.dumps(
        {
            "error": {
                "message": f"the request headers did not arrive within {header_seconds:.0f} s",
                "type": "invalid_request_error",
                "param": None,
                "code": "request_timeout",
            }
        }
    ).encode()

    class BoundedProtocol(AutoHTTPProtocol):
        _header_deadline = None
        _waiting_for = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_header_deadline()

        def data_received(self, data: bytes) -> None:
            if self._header_deadline is None and self._between_requests():
                self._arm_header_deadline()  # the next request on a kept-alive connection
            super().data_received(data)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # Idle now until the next request's first byte, for as long as uvicorn's
            # keep-alive allows: a client's pool may hold the connection that long.
            self._cancel_header_deadline()

        def connection_lost(self, exc) -> None:
            self._cancel_header_deadline()
            super().connection_lost(exc)

        def _between_requests(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm_header_deadline(self) -> None:
            self._cancel_header_deadline()
            self._waiting_for = self.cycle  # a new request replaces it once its headers are in
            self._header_deadline = self.loop.call_later(header_seconds, self._header_late)

        def _cancel_header_deadline(self) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
                self._header_deadline = None

        def _header_late(self) -> None:
            self._header_deadline = None
            if self.cycle is self._waiting_for and not self.transport.is_closing():
                self.transport.write(TIMEOUT_ANSWER % (len(body), body))
                self.transport.close()

    return BoundedProtocol


async def announce(server, urls: list[str], options: ServeOptions) -> None:
    started = time.monotonic()
    while not server.started:
        await asyncio.sleep(0.02)
        if time.monotonic() - started > 60:
            return
    keys = "API keys required" if options.api_keys else "no API keys"
    log.info("gateway listening on %s (base %s, %s)", urls[0], options.served_model_name, keys)
    if len(urls) > 1:
        log.info("metrics on %s/metrics", urls[1])
    log.info("adapters: %s", options.describe_adapter_sizes())
    log.info("dtype: %s", options.describe_dtype())
