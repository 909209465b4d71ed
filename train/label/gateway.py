"""A `lorabay serve` started for one labelling run, and stopped after it, always.

`lorabay label` without ``--endpoint`` serves ``--base`` itself: the same command a user
runs, as a child process on 127.0.0.1 and a free port (``--port 0``; the URL comes from
its "gateway listening on URL" log line), its output in ``$LORABAY_HOME/logs/``. The
child runs in its own session, so a ctrl-C in the terminal reaches only `lorabay label`,
which then stops the gateway (SIGTERM, then SIGKILL for anything left of it); SIGTERM
to `lorabay label` does the same.

    with started_gateway("./tiny", registry="file:///tmp/reg") as gateway:
        gateway.url  # http://127.0.0.1:PORT
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lorabay.hub.errors import LorabayError
from lorabay.hub.settings import lorabay_home

LISTENING = re.compile(r"gateway listening on (http://\S+)")
METRICS = re.compile(r"metrics on (http://\S+)")
STOP_SECONDS = 60


@dataclass(frozen=True)
class StartedGateway:
    url: str  # the OpenAI-compatible API
    log: Path
    metrics_url: str | None = None  # with --serve-args '--metrics-port 0'


class GatewayStartFailed(LorabayError):
    def __init__(self, reason: str, log: Path):
        self.log = log
        super().__init__(f"`lorabay serve` did not start: {reason}", f"its log: {log}")


def serve_command(base: str, registry: str | None, quantization: str, serve_args: str) -> list[str]:
    command = [sys.executable, "-m", "lorabay.cli.main", "serve", "--base", str(base)]
    command += ["--host", "127.0.0.1", "--port", "0", "--quantization", quantization]
    if registry:
        command += ["--registry", registry]
    return command + shlex.split(serve_args)


@contextlib.contextmanager
def started_gateway(
    base: str,
    registry: str | None = None,
    quantization: str = "none",
    serve_args: str = "",
    timeout: float = 900,
    notify=None,
) -> Iterator[StartedGateway]:
    """Start `lorabay serve --base BASE`, yield it once it serves, stop it after."""
    logs = lorabay_home() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"label-serve-{os.getpid()}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    command = serve_command(base, registry, quantization, serve_args)
    if notify:
        notify(f"starting {shlex.join(['lorabay', *command[3:]])} (log: {log})")
    with log.open("ab") as out, _sigterm_as_interrupt():
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            yield wait_listening(process, log, timeout)
        finally:
            stop_gateway(process)


def wait_listening(process: subprocess.Popen, log: Path, timeout: float) -> StartedGateway:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        match = LISTENING.search(text)
        if match:  # the metrics line, when there is one, comes first
            metrics = METRICS.search(text)
            return StartedGateway(match.group(1), log, metrics.group(1) if metrics else None)
        if process.poll() is not None:
            errors = [line for line in text.splitlines() if line.startswith("Error:")]
            reason = (
                errors[-1].removeprefix("Error: ") if errors else f"exit code {process.returncode}"
            )
            raise GatewayStartFailed(reason, log)
        time.sleep(0.2)
    raise GatewayStartFailed(f"not serving after {timeout:.0f} s", log)


def stop_gateway(process: subprocess.Popen) -> None:
    """SIGTERM (the gateway stops its engine), then SIGKILL for anything left below it."""
    family = _descendants(process.pid)
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for child in family:  # an engine the gateway could not stop in time
        with contextlib.suppress(Exception):
            if child.is_running() and child.status() != "zombie":
                child.kill()


def _descendants(pid: int) -> list:
    try:
        import psutil

        return psutil.Process(pid).children(recursive=True)
    except Exception:  # psutil comes with the serve extra; without it SIGTERM must do
        return []


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """While the gateway runs, SIGTERM to us unwinds like ctrl-C, so `finally` stops it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
