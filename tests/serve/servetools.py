"""Helpers for the serve tests: run `lorabay serve` as a real process, greedy references.

``GatewayProcess`` starts the command exactly as a user would (a subprocess of
``python -m lorabay.cli.main serve``), reads its log lines on a thread, learns the
URL from the "gateway listening on URL" line, and stops it with a signal, then
checks that every process it started is gone (killing leftovers so a failing test
never leaks an engine).
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

import psutil

LISTENING = re.compile(r"gateway listening on (http://\S+)")


class GatewayProcess:
    def __init__(self, args: list[str], env: dict[str, str] | None = None):
        self.args = args
        self.env = {**os.environ, **(env or {})}
        self.lines: list[str] = []
        self.process: subprocess.Popen | None = None
        self.url: str | None = None
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
                    return self
            if self.process.poll() is not None:
                time.sleep(0.5)  # let the reader take the last lines
                return self
            time.sleep(0.2)
        raise TimeoutError("the gateway did not start in time:\n" + self.output)

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

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
            if "vllm.entrypoints.openai.api_server" in " ".join(child.cmdline()):
                return child
        raise LookupError("no engine process under the gateway")

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


def tiny_serve_args(tiny_base, registry_url: str, port: int | str = 0) -> list[str]:
    """The flags every serve test starts with: the tiny base in float32, one registry."""
    return [
        *("--base", str(tiny_base), "--served-name", "tiny", "--dtype", "float32"),
        *("--registry", registry_url, "--port", str(port)),
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
