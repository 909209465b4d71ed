"""Helpers for the serve tests: run `lorabay serve` as a real process, greedy references.

``GatewayProcess`` starts the command exactly as a user would (a subprocess of
``python -m lorabay.cli.main serve``), reads its log lines on a thread, learns the
URL from the "gateway listening on URL" line (and the metrics URL from "metrics on
URL"), and stops it with a signal, then checks that every process it started is gone
(killing leftovers so a failing test never leaks an engine).

``EngineDoor`` is the test's insider view of the private engine: the socket path from
the engine's command line and the token from its environment (readable by its own user
only), for checking what the engine holds. No client of the gateway has either.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

LISTENING = re.compile(r"gateway listening on (http://\S+)")
METRICS = re.compile(r"metrics on (http://\S+)/metrics")
ENGINE_MODULE = "vllm.entrypoints.openai.api_server"


class GatewayProcess:
    def __init__(self, args: list[str], env: dict[str, str] | None = None, on_line=None):
        self.args = args
        self.env = {**os.environ, **(env or {})}
        self.lines: list[str] = []
        self.process: subprocess.Popen | None = None
        self.url: str | None = None
        self.metrics_url: str | None = None
        self.on_line = on_line  # called with each line on the reader thread, as it comes
        self._seen: dict[int, psutil.Process] = {}

    def launch(self) -> GatewayProcess:
        """Start the command; do not wait for anything."""
        command = [sys.executable, "-m", "lorabay.cli.main", "serve", *self.args]
        self.process = subprocess.Popen(
            command,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def start(self, timeout: float = 600.0) -> GatewayProcess:
        """Start the command and wait until it listens (``url``) or exits."""
        return self.launch().wait_listening(timeout)

    def wait_listening(self, timeout: float = 600.0) -> GatewayProcess:
        """Wait until the launched command listens (``url``) or exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.remember_descendants()
            for line in list(self.lines):
                match = LISTENING.search(line)
                if match:
                    self.url = match.group(1)
                    self._wait_metrics_line(deadline)
                    return self
            if self.process.poll() is not None:
                time.sleep(0.5)  # let the reader take the last lines
                return self
            time.sleep(0.2)
        raise TimeoutError("the gateway did not start in time:\n" + self.output)

    def _wait_metrics_line(self, deadline: float) -> None:
        if "--metrics-port" not in self.args:
            return
        while time.monotonic() < deadline:
            found = [METRICS.search(line) for line in list(self.lines)]
            found = [m for m in found if m]
            if found:
                self.metrics_url = found[0].group(1)
                return
            time.sleep(0.05)

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            if self.on_line is not None:
                self.on_line(self, self.lines[-1])

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def remember_descendants(self) -> None:
        """Every process below the gateway seen so far (to check none outlives it)."""
        try:
            for child in psutil.Process(self.process.pid).children(recursive=True):
                self._seen.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            pass

    def engine_process(self) -> psutil.Process:
        """The vLLM server the gateway supervises (its direct child)."""
        for child in psutil.Process(self.process.pid).children():
            if ENGINE_MODULE in " ".join(child.cmdline()):
                return child
        raise LookupError("no engine process under the gateway")

    def engine_door(self) -> EngineDoor:
        return EngineDoor.of(self.engine_process())

    def metrics(self) -> str:
        return httpx.get(f"{self.metrics_url}/metrics", timeout=30).text

    def log_files(self, path: Path) -> int:
        """How many open handles the gateway process holds on ``path``."""
        return sum(1 for f in psutil.Process(self.process.pid).open_files() if f.path == str(path))

    def leftovers(self) -> list[psutil.Process]:
        return [p for p in self._seen.values() if p.is_running() and p.status() != "zombie"]

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        """Signal the gateway, wait for it; its exit code. Kills anything left over."""
        if self.process is None:
            return None
        self.remember_descendants()
        if self.process.poll() is None:
            self.process.send_signal(signum)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def kill_leftovers(self) -> list[str]:
        """Kill (and name) processes that outlived the gateway."""
        left = self.leftovers()
        names = [f"{p.pid} {' '.join(p.cmdline())[:80]}" for p in left if p.is_running()]
        for proc in left:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        return names


class EngineDoor:
    """What only the engine's own user can see: its socket and token (tests only)."""

    def __init__(self, process: psutil.Process, socket: str, token: str):
        self.process, self.socket, self.token = process, socket, token

    @classmethod
    def of(cls, process: psutil.Process) -> EngineDoor:
        command = process.cmdline()
        socket = command[command.index("--uds") + 1]
        return cls(process, socket, process.environ()["VLLM_API_KEY"])

    def client(self, token: bool = True) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.token}"} if token else {}
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=self.socket),
            base_url="http://engine",
            headers=headers,
            timeout=60,
        )

    def adapters(self) -> set[str]:
        """Names of the LoRA adapters the engine holds now."""
        with self.client() as client:
            cards = client.get("/v1/models").json()["data"]
        return {card["id"] for card in cards if card.get("parent")}

    def metric(self, name: str) -> float:
        with self.client() as client:
            text = client.get("/metrics").text
        return sum(
            float(line.rpartition(" ")[2])
            for line in text.splitlines()
            if line.startswith(name + "{") or line.startswith(name + " ")
        )


def metric(text: str, name: str, **labels) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def tiny_serve_args(tiny_base, registry_url: str, port: int | str = 0) -> list[str]:
    """The flags every serve test starts with: the tiny base in float32, one registry,
    metrics on a port of their own."""
    return [
        *("--base", str(tiny_base), "--served-name", "tiny", "--dtype", "float32"),
        *("--registry", registry_url, "--port", str(port), "--metrics-port", "0"),
    ]


def wait_gone(processes: list[psutil.Process], timeout: float = 15.0) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    return [p for p in alive if p.status() != "zombie"]


def greedy_reference(
    base: Path, adapters: dict[str, Path], prompts: list[list[int]], new_tokens: int
) -> dict[str | None, list[list[int]]]:
    """Greedy continuations by transformers + PEFT, float32: {adapter or None (base): ids}.

    EOS does not stop generation (the engine is asked for ignore_eos).
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()

    def greedy(net, prompt: list[int]) -> list[int]:
        out, ids = [], torch.tensor([prompt])
        past = None
        with torch.no_grad():
            for _ in range(new_tokens):
                step = net(input_ids=ids, past_key_values=past, use_cache=True)
                past = step.past_key_values
                out.append(int(torch.argmax(step.logits[0, -1])))
                ids = torch.tensor([[out[-1]]])
        return out

    results: dict[str | None, list[list[int]]] = {None: [greedy(model, p) for p in prompts]}
    names = list(adapters)
    if not names:
        return results
    peft = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(adapters[name], adapter_name=name)
    for name in names:
        peft.set_adapter(name)
        results[name] = [greedy(peft, p) for p in prompts]
    return results
