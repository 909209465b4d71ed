"""Serving benchmark: the gateway against the engine directly and a naive PEFT server.

    .venv/bin/python bench/serve_bench.py            # 0, 1, 8, 32 adapters; 64 requests x 32 tokens
    .venv/bin/python bench/serve_bench.py --quick    # 0, 1, 8 adapters; 32 requests x 16 tokens
    .venv/bin/python bench/serve_bench.py --stock-lora   # + (a) on vLLM's stock CPU LoRA ops

On the `small` base (155M parameters, bf16), built locally (or `--base
smollm2-135m-instruct`, the real pretrained base), with rank-8 q/v adapters
pushed to a file:// registry, the same mixed workload (--requests concurrent
streaming requests, --new-tokens each, round-robin over the adapters; 0 = the base
alone) is sent
  (a) through the gateway (`lorabay serve`, by registry reference),
  (b) straight to the engine it supervises (same process, same loaded adapters,
      the engine names the gateway would forward), alternating with (a),
  (c) to the server a user would write with transformers + PEFT: one request at a
      time, `set_adapter` per request (non-streaming: its first token arrives with
      the answer, so its TTFT is its latency).
Reported: tok/s, p50/p99 latency and TTFT, and cold-adapter latency: TTFT of the
first request for a freshly pushed adapter (resolve, pull + verify from the
registry, compatibility check, load) minus TTFT of the next request for it.
Goals (issue 4): (a) >= 0.95 x (b); (a) >= 5 x (c) at 8 adapters; cold - warm p50
<= 100 ms. Prints a markdown table (bench/README.md keeps the latest) and writes a
PNG of tok/s against adapter count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchbase import BASES, bench_base, describe  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
PROMPTS = [
    "Summarize the following note about adapters and base models in one sentence:",
    "Write a short reply to a customer who asks when the order will arrive.",
    "List three facts about the ocean that a child would enjoy hearing.",
    "Translate the meaning of this sentence into plain words: the base is shared.",
    "Explain why one base with many small adapters saves memory on a server.",
    "Describe a quiet morning in a small town in two sentences.",
    "Give a recipe title for a soup made of carrots, ginger and coconut milk.",
    "What should a new engineer read first when joining a team that trains models?",
]


@dataclass
class Run:
    path: str  # gateway | engine | naive | stock-lora
    adapters: int
    requests: int
    tokens: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def pct(self, values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


# -- setup -----------------------------------------------------------------------------


def build_adapters(base: Path, out: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` random rank-8 q/v LoRA folders for ``base`` (one PEFT model, re-seeded)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folders = [out / f"lora-{i:02d}" for i in range(count)]
    if all((f / "adapter_model.safetensors").is_file() for f in folders):
        return folders
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(model, config)
    for i, folder in enumerate(folders):
        generator = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
                    param.copy_(noise * 0.02)
        model.save_pretrained(folder)
    return folders


def push_adapters(registry_url: str, base: Path, folders: list[Path], prefix: str) -> list:
    from lorabay.hub import Registry

    registry = Registry.open(registry_url)
    return [
        registry.push(folder, f"{prefix}{i:02d}", base=base) for i, folder in enumerate(folders)
    ]


class Gateway:
    """`lorabay serve` as a child process; the engine's URL and token read from its child."""

    def __init__(self, base: Path, registry_url: str, env: dict, max_loras: int):
        self.served_name = base.name
        self.args = [
            PYTHON,
            "-m",
            "lorabay.cli.main",
            "serve",
            "--base",
            str(base),
            "--served-name",
            self.served_name,
            "--dtype",
            "bfloat16",
            "--registry",
            registry_url,
            "--port",
            "0",
            "--max-loras",
            str(max_loras),
            "--max-lora-rank",
            "8",
            "--max-loaded",
            "128",
        ]
        self.env = env
        self.lines: list[str] = []

    def start(self) -> None:
        import threading

        self.process = subprocess.Popen(
            self.args, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        threading.Thread(target=lambda: [self.lines.append(x) for x in self.process.stdout]).start()
        while True:
            if self.process.poll() is not None:
                raise SystemExit("the gateway did not start:\n" + "".join(self.lines[-40:]))
            for line in list(self.lines):
                if "gateway listening on " in line:
                    self.url = line.split("gateway listening on ")[1].split()[0]
                    self._find_engine()
                    return
            time.sleep(0.2)

    def _find_engine(self) -> None:
        import psutil

        for child in psutil.Process(self.process.pid).children():
            command = child.cmdline()
            if "vllm.entrypoints.openai.api_server" in command:
                port = command[command.index("--port") + 1]
                self.engine_url = f"http://127.0.0.1:{port}"
                self.engine_token = child.environ()["VLLM_API_KEY"]
                return
        raise SystemExit("no engine process under the gateway")

    def stop(self, log_path: Path | None = None) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(120)
        if log_path is not None:
            log_path.write_text("".join(self.lines))


# -- the workload ----------------------------------------------------------------------


async def one_request(client, url, headers, model, prompt, new_tokens, stream) -> tuple:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": new_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    started = time.perf_counter()
    first = None
    tokens = 0
    if not stream:
        response = await client.post(url, json=body, headers=headers)
        response.raise_for_status()
        end = time.perf_counter()
        return end - started, end - started, response.json()["usage"]["completion_tokens"]
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", url, json=body, headers=headers) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            # The first event with a choice carries the first token (its text may be
            # empty: a random model's tokens often decode to partial characters).
            if first is None and '"choices":[{' in line:
                first = time.perf_counter()
            if '"usage":{' in line:
                tokens = json.loads(line[5:])["usage"]["completion_tokens"]
    end = time.perf_counter()
    return end - started, (first or end) - started, tokens


async def run_workload(
    url: str, headers: dict, models: list[str], requests: int, new_tokens: int, stream: bool
) -> tuple[float, list]:
    import httpx

    limits = httpx.Limits(max_connections=requests + 8, max_keepalive_connections=requests + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        started = time.perf_counter()
        results = await asyncio.gather(
            *(
                one_request(
                    client,
                    url,
                    headers,
                    models[i % len(models)],
                    PROMPTS[i % len(PROMPTS)],
                    new_tokens,
                    stream,
                )
                for i in range(requests)
            )
        )
        return time.perf_counter() - started, results


def measure(path, url, headers, models, count, requests, new_tokens, stream=True) -> Run:
    seconds, results = asyncio.run(run_workload(url, headers, models, requests, new_tokens, stream))
    return Run(
        path=path,
        adapters=count,
        requests=requests,
        tokens=sum(r[2] for r in results),
        seconds=seconds,
        latencies=[r[0] for r in results],
        ttfts=[r[1] for r in results],
    )


def cold_adapter_latency(gateway: Gateway, manifests: list, new_tokens: int) -> list[dict]:
    """TTFT of the first request for each fresh adapter, and of the one after it."""
    url = f"{gateway.url}/v1/completions"
    rows = []
    for manifest in manifests:
        cold = asyncio.run(run_workload(url, {}, [manifest.name], 1, new_tokens, True))[1][0]
        warm = asyncio.run(run_workload(url, {}, [manifest.name], 1, new_tokens, True))[1][0]
        rows.append({"adapter": manifest.name, "cold_ttft": cold[1], "warm_ttft": warm[1]})
    # The gateway's own account of each load: pull + verify + check + the engine's load call.
    import httpx

    for line in httpx.get(f"{gateway.url}/metrics").text.splitlines():
        if line.startswith("lorabay_adapter_load_seconds_sum{"):
            for row in rows:
                if f'adapter="{row["adapter"]}"' in line:
                    row["load_s"] = float(line.rsplit(" ", 1)[1])
    return rows


# -- (c) the naive server --------------------------------------------------------------


def serve_naive(base: str, adapters_json: str, port: int) -> None:
    """transformers + PEFT behind FastAPI: one generate at a time, set_adapter per request."""
    import contextlib
    import threading

    import torch
    import uvicorn
    from fastapi import FastAPI
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapters = json.loads(Path(adapters_json).read_text())  # name -> folder
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).eval()
    names = list(adapters)
    if names:
        model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(adapters[name], adapter_name=name)
    lock = threading.Lock()
    app = FastAPI()

    @app.post("/v1/completions")
    def complete(body: dict):
        ids = tokenizer(body["prompt"], return_tensors="pt")
        with lock, torch.no_grad():
            if body["model"] in adapters:
                model.set_adapter(body["model"])
                context = contextlib.nullcontext()
            else:
                context = model.disable_adapter() if names else contextlib.nullcontext()
            with context:
                out = model.generate(
                    **ids,
                    max_new_tokens=body["max_tokens"],
                    min_new_tokens=body["max_tokens"],
                    do_sample=False,
                )
        new = out.shape[1] - ids["input_ids"].shape[1]
        text = tokenizer.decode(out[0, ids["input_ids"].shape[1] :])
        return {"choices": [{"text": text}], "usage": {"completion_tokens": new}}

    @app.get("/health")
    def health():
        return {"status": "ok"}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def start_naive(base: Path, adapters: dict[str, str], workdir: Path, env: dict):
    import httpx
    from lorabay.serve.engine import find_free_port

    spec = workdir / "naive-adapters.json"
    spec.write_text(json.dumps(adapters))
    port = find_free_port()
    process = subprocess.Popen(
        [PYTHON, __file__, "naive-server", str(base), str(spec), str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("the naive server did not start")
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit("the naive server did not start in time")


PATHS = ["gateway", "engine", "naive", "stock-lora"]


# -- report ----------------------------------------------------------------------------


def table(runs: list[Run], cold: list[dict], counts: list[int]) -> str:
    lines = [
        "| adapters | path | tok/s | p50 latency s | p99 latency s | p50 TTFT s | p99 TTFT s |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for run in sorted(runs, key=lambda r: (r.adapters, PATHS.index(r.path))):
        lines.append(
            f"| {run.adapters} | {run.path} | {run.tok_s:.1f} | {run.pct(run.latencies, 0.5):.2f} "
            f"| {run.pct(run.latencies, 0.99):.2f} | {run.pct(run.ttfts, 0.5):.3f} "
            f"| {run.pct(run.ttfts, 0.99):.3f} |"
        )
    by = {(r.path, r.adapters): r for r in runs}
    lines += [
        "",
        "| adapters | gateway / engine tok/s (goal >= 0.95) | gateway / naive tok/s "
        "| gateway / gateway on stock CPU LoRA |",
        "|---:|---:|---:|---:|",
    ]
    for count in counts:
        gateway, engine, naive, stock = (by.get((p, count)) for p in PATHS)
        ratio_e = f"{gateway.tok_s / engine.tok_s:.3f}" if gateway and engine else "-"
        ratio_n = f"{gateway.tok_s / naive.tok_s:.1f}x" if gateway and naive else "-"
        ratio_s = f"{gateway.tok_s / stock.tok_s:.2f}x" if gateway and stock else "-"
        goal = " (goal >= 5x)" if count == 8 and naive else ""
        lines.append(f"| {count} | {ratio_e} | {ratio_n}{goal} | {ratio_s} |")
    if cold:
        deltas = [(c["cold_ttft"] - c["warm_ttft"]) * 1000 for c in cold]
        lines += [
            "",
            f"Cold adapter (registry to first token), {len(cold)} fresh rank-8 adapters, one "
            f"request at a time: cold TTFT p50 {statistics.median(c['cold_ttft'] for c in cold) * 1000:.0f} ms, "
            f"warm TTFT p50 {statistics.median(c['warm_ttft'] for c in cold) * 1000:.0f} ms, "
            f"cold - warm p50 {statistics.median(deltas):.0f} ms, max {max(deltas):.0f} ms "
            "(goal: p50 <= 100 ms); of it, the load as the gateway times it (pull, verify, "
            "check, the engine's load call) p50 "
            f"{statistics.median(c.get('load_s', 0) for c in cold) * 1000:.0f} ms.",
        ]
    return "\n".join(lines)


def plot(runs: list[Run], counts: list[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.6), dpi=120)
    labels = {
        "gateway": "(a) lorabay gateway",
        "engine": "(b) vLLM engine directly",
        "naive": "(c) transformers + PEFT, set_adapter",
        "stock-lora": "(a) on vLLM's stock CPU LoRA ops",
    }
    for path_name, label in labels.items():
        points = sorted((r.adapters, r.tok_s) for r in runs if r.path == path_name)
        if points:
            xs = [counts.index(a) for a, _ in points]
            axis.plot(xs, [t for _, t in points], marker="o", label=label)
    axis.set_xticks(range(len(counts)), [str(c) for c in counts])
    axis.set_xlabel("adapters in the workload (0 = base only)")
    axis.set_ylabel("generated tokens / s")
    axis.set_ylim(bottom=0)
    axis.grid(alpha=0.3)
    # Below the axes, not on them: the lines cross the whole plot.
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, fontsize="small")
    axis.set_title(f"{title}, CPU")
    figure.tight_layout()
    figure.savefig(path)


def measure_gateway(gateway, path_name: str, manifests, count: int, args, rounds: int) -> Run:
    """(a) alone, best of ``rounds`` after a warm-up that loads the adapters."""
    models = [gateway.served_name] if count == 0 else [m.name for m in manifests[:count]]
    url = f"{gateway.url}/v1/completions"
    measure(path_name, url, {}, models, count, max(len(models), 8), 4)
    best = None
    for _ in range(rounds):
        run = measure(path_name, url, {}, models, count, args.requests, args.new_tokens)
        print(f"  {count:>2} adapters  {path_name:<8} {run.tok_s:7.1f} tok/s", flush=True)
        best = run if best is None or run.tok_s > best.tok_s else best
    return best


def measure_count(gateway, naive_url, manifests, count: int, args, rounds: int) -> list[Run]:
    """(b) and (a) alternating ``rounds`` times (best of each kept), then (c) once."""
    base_model = [gateway.served_name]
    gateway_models = base_model if count == 0 else [m.name for m in manifests[:count]]
    engine_models = (
        base_model if count == 0 else [f"{m.name}@{m.digest}" for m in manifests[:count]]
    )
    # Warm-up through the gateway: it loads the adapters (the engine names (b) uses).
    warm = max(len(gateway_models), 8)
    measure("gateway", f"{gateway.url}/v1/completions", {}, gateway_models, count, warm, 4)
    paths = [
        (
            "engine",
            gateway.engine_url,
            {"Authorization": f"Bearer {gateway.engine_token}"},
            engine_models,
        ),
        ("gateway", gateway.url, {}, gateway_models),
    ]
    best: dict[str, Run] = {}
    for _ in range(rounds):
        for path_name, url, headers, models in paths:
            run = measure(
                path_name,
                f"{url}/v1/completions",
                headers,
                models,
                count,
                args.requests,
                args.new_tokens,
            )
            print(f"  {count:>2} adapters  {path_name:<8} {run.tok_s:7.1f} tok/s", flush=True)
            if path_name not in best or run.tok_s > best[path_name].tok_s:
                best[path_name] = run
    runs = list(best.values())
    if naive_url:
        run = measure(
            "naive",
            f"{naive_url}/v1/completions",
            {},
            gateway_models,
            count,
            args.requests,
            args.new_tokens,
            stream=False,
        )
        print(f"  {count:>2} adapters  naive    {run.tok_s:7.1f} tok/s", flush=True)
        runs.append(run)
    return runs


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "naive-server":
        serve_naive(*sys.argv[2:4], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer adapters/requests/tokens")
    parser.add_argument("--base", choices=BASES, default="small", help="the base to serve")
    parser.add_argument("--counts", default=None, help="adapter counts, e.g. 0,1,8,32")
    parser.add_argument("--requests", type=int, default=None, help="concurrent requests")
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None, help="alternating (b)/(a) rounds")
    parser.add_argument("--cold", type=int, default=None, help="fresh adapters for cold latency")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument(
        "--stock-lora",
        action="store_true",
        help="also (a) again with vLLM's stock CPU LoRA path (LORABAY_CPU_LORA=0), after",
    )
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out" / "serve")
    parser.add_argument("--plot", type=Path, default=ROOT / "bench" / "serve_bench.png")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    quick = args.quick
    counts = [int(c) for c in (args.counts or ("0,1,8" if quick else "0,1,8,32")).split(",")]
    args.requests = args.requests or (32 if quick else 64)
    args.new_tokens = args.new_tokens or (16 if quick else 32)
    rounds = args.rounds or (1 if quick else 2)
    cold_count = args.cold if args.cold is not None else (3 if quick else 8)

    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    home = workdir / f"home-{int(time.time())}"
    env = {
        **os.environ,
        "LORABAY_HOME": str(home),
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.update({k: env[k] for k in ("LORABAY_HOME", "HF_HUB_OFFLINE")})

    base = bench_base(args.base, workdir)
    most = max(counts)
    print(f"building {most + cold_count} adapters ...", flush=True)
    folders = build_adapters(base, workdir / f"adapters-{args.base}", most + cold_count)
    registry_url = f"file://{home / 'registry'}"
    manifests = push_adapters(registry_url, base, folders[:most], "bench/a")
    cold_manifests = push_adapters(registry_url, base, folders[most:], "bench/cold")

    runs: list[Run] = []
    load_before = os.getloadavg()[0]
    naive = naive_url = None
    if not args.skip_naive:
        # Up beside the gateway, idle while the others run: all three paths are measured
        # in the same minutes, so the other users of a shared machine weigh on each alike.
        print("starting the naive transformers + PEFT server ...", flush=True)
        names = {m.name: str(folders[i]) for i, m in enumerate(manifests)}
        naive, naive_url = start_naive(base, names, workdir, env)
    gateway = Gateway(base, registry_url, env, max_loras=max(1, most))
    print("starting lorabay serve ...", flush=True)
    try:
        gateway.start()
        for count in counts:
            runs += measure_count(gateway, naive_url, manifests, count, args, rounds)
        print("cold adapters ...", flush=True)
        cold = cold_adapter_latency(gateway, cold_manifests, args.new_tokens) if cold_count else []
    finally:
        gateway.stop(home / "gateway.log")
        if naive is not None:
            naive.send_signal(signal.SIGTERM)
            naive.wait(60)

    if args.stock_lora:
        # Issue 5 end to end: the same gateway and workload on vLLM's own CPU LoRA ops.
        stock = Gateway(base, registry_url, {**env, "LORABAY_CPU_LORA": "0"}, max(1, most))
        print("starting lorabay serve on vLLM's stock CPU LoRA path ...", flush=True)
        try:
            stock.start()
            for count in counts:
                runs.append(measure_gateway(stock, "stock-lora", manifests, count, args, rounds))
        finally:
            stock.stop(home / "gateway-stock.log")

    requests, new_tokens = args.requests, args.new_tokens
    load = f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    report = table(runs, cold, counts)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    print()
    print(
        f"{describe(args.base)}, {requests} concurrent requests x {new_tokens} new tokens, "
        f"best of {rounds} alternating round(s) for (a)/(b); {machine}; {load}"
    )
    print(report)
    plot(runs, counts, args.plot, describe(args.base))
    print(f"\nplot: {args.plot}")
    if args.json:
        args.json.write_text(
            json.dumps({"runs": [asdict(r) for r in runs], "cold": cold}, indent=1)
        )


if __name__ == "__main__":
    main()
