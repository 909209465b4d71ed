"""Multi-LoRA throughput on CPU: vLLM's stock path against lorabay's grouped path.

Offline ``LLM.generate`` on the ``small`` base (155M parameters, bf16; ``--base
smollm2-135m-instruct``: the real base, 30 layers with GQA): the same
workload (REQUESTS prompts of 16 tokens, NEW_TOKENS greedy tokens each) with no
LoRA at all, then spread round-robin over 1, 8, 32 and 128 rank-8 q/v adapters
with the stock path (``LORABAY_VLLM_PLUGIN=0``) and with the grouped path
(serve/cpu_lora.py). Each configuration runs in its own process (its own engine);
the table reports tok/s and the ratio to the base-only run of the same invocation.

    .venv/bin/python bench/cpu_lora_bench.py                 # full table (~10 min on 2 cores)
    .venv/bin/python bench/cpu_lora_bench.py --base smollm2-135m-instruct
    .venv/bin/python bench/cpu_lora_bench.py --adapters 1 8 --repeats 1
    .venv/bin/python bench/cpu_lora_bench.py --profile 32    # where the time goes, grouped path
    .venv/bin/python bench/cpu_lora_bench.py --profile 32 --stock
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from benchbase import BASES, bench_base, describe, load_average

from lorabay.hub.machine import bf16_is_emulated

OUT = Path(__file__).resolve().parent / "out"
REQUESTS = 128
NEW_TOKENS = 32
PROMPT_TOKENS = 16
MAX_NUM_SEQS = 64
RANK = 8


def write_random_adapter(base: Path, out: Path, seed: int, rank: int = RANK) -> Path:
    """A PEFT-format LoRA on q_proj and v_proj with random A and B, written directly
    (no model load), the way `PeftModel.save_pretrained` lays it out."""
    import torch
    from safetensors.torch import save_file

    if (out / "adapter_model.safetensors").exists():
        return out
    config = json.loads((base / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    kv = config["num_key_value_heads"] * config.get(
        "head_dim", hidden // config["num_attention_heads"]
    )
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for module, out_features in (("q_proj", hidden), ("v_proj", kv)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (
                torch.randn(rank, hidden, generator=g) / hidden**0.5
            )
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, rank, generator=g) * 0.01
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()},
        out / "adapter_model.safetensors",
    )
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": str(base),
        "fan_in_fan_out": False,
        "use_rslora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return out


def run_config(job: dict) -> dict:
    """One engine, one workload (runs in a child process; see main)."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    n = job["adapters"]
    lora_args = {}
    if n:
        lora_args = dict(
            enable_lora=True, max_loras=min(n, MAX_NUM_SEQS), max_cpu_loras=n, max_lora_rank=RANK
        )
    llm = LLM(
        job["base"],
        dtype=job["dtype"],
        max_model_len=256,
        max_num_seqs=MAX_NUM_SEQS,
        seed=0,
        **lora_args,
    )
    prompts = [
        {"prompt_token_ids": [(31 * i + 7 * j) % 30000 + 3 for j in range(PROMPT_TOKENS)]}
        for i in range(REQUESTS)
    ]
    loras = [LoRARequest(f"a{k}", k + 1, job["paths"][k]) for k in range(n)]
    which = [loras[i % n] for i in range(REQUESTS)] if n else None
    # Warm up: load every adapter into the engine and run each code path once.
    llm.generate(
        prompts[: max(n, 8)],
        SamplingParams(max_tokens=2, temperature=0),
        lora_request=which[: max(n, 8)] if n else None,
        use_tqdm=False,
    )
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    results = []
    for _ in range(job["repeats"]):
        start = time.perf_counter()
        if job.get("profile"):
            import torch

            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                outs = llm.generate(prompts, params, lora_request=which, use_tqdm=False)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        else:
            outs = llm.generate(prompts, params, lora_request=which, use_tqdm=False)
        elapsed = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        results.append(tokens / elapsed)
    return {"tok_s": max(results), "runs": results}


def spawn(job: dict, env: dict) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(job)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
    )
    if job.get("profile"):
        print(done.stdout)
    line = next((s for s in done.stdout.splitlines() if s.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise SystemExit(f"benchmark run {job['label']} failed:\n{done.stderr[-3000:]}")
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--base", choices=BASES, default="small", help="the base to serve")
    parser.add_argument(
        "--repeats", type=int, default=2, help="timed runs per engine (best is kept)"
    )
    parser.add_argument(
        "--profile", type=int, metavar="N", help="profile one run with N adapters instead"
    )
    parser.add_argument("--stock", action="store_true", help="with --profile: the stock path")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(run_config(json.loads(args.worker))))
        return

    base = bench_base(args.base, OUT)
    dtype = "float32" if bf16_is_emulated() else "bfloat16"  # as `lorabay serve`'s auto
    most = max(args.adapters + [args.profile or 0])
    paths = [
        str(write_random_adapter(base, OUT / f"adapters-{args.base}" / f"a{k}", seed=k))
        for k in range(most)
    ]
    common = {"VLLM_CPU_KVCACHE_SPACE": "2", "TOKENIZERS_PARALLELISM": "false"}
    if (os.cpu_count() or 0) <= 4:  # as `lorabay serve` runs it (serve/engine.py)
        common["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    stock = {"LORABAY_VLLM_PLUGIN": "0"}
    grouped = {"LORABAY_VLLM_PLUGIN": "1"}

    if args.profile:
        env = {
            **common,
            **(stock if args.stock else grouped),
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        }
        job = {
            "base": str(base),
            "paths": paths,
            "adapters": args.profile,
            "dtype": dtype,
            "repeats": 1,
            "profile": True,
            "label": "profile",
        }
        spawn(job, env)
        return

    rows = []
    load_before = os.getloadavg()
    base_only = spawn(
        {
            "base": str(base),
            "paths": [],
            "adapters": 0,
            "dtype": dtype,
            "repeats": args.repeats,
            "label": "base",
        },
        common,
    )
    rows.append(("base only", 0, base_only["tok_s"], None))
    for n in args.adapters:
        job = {
            "base": str(base),
            "paths": paths,
            "adapters": n,
            "dtype": dtype,
            "repeats": args.repeats,
        }
        s = spawn({**job, "label": f"stock-{n}"}, {**common, **stock})
        g = spawn({**job, "label": f"grouped-{n}"}, {**common, **grouped})
        rows.append(("stock", n, s["tok_s"], None))
        rows.append(("lorabay", n, g["tok_s"], g["tok_s"] / s["tok_s"]))
        print(
            f"  {n} adapters: stock {s['tok_s']:.0f} tok/s, lorabay {g['tok_s']:.0f} tok/s",
            flush=True,
        )

    ref = base_only["tok_s"]
    print(
        f"\n{describe(args.base)} computed in {dtype}, {REQUESTS} requests x {NEW_TOKENS} new tokens, rank-{RANK} q/v adapters,"
        f" {os.cpu_count()} cores, {platform.processor() or platform.machine()};"
        f" {load_average(load_before)}\n"
    )
    print("| path | adapters | tok/s | vs base only | lorabay vs stock |")
    print("|---|---|---|---|---|")
    for path, n, tok_s, gain in rows:
        print(
            f"| {path} | {n} | {tok_s:.0f} | {tok_s / ref:.2f}x | {'' if gain is None else f'{gain:.2f}x'} |"
        )
    OUT.mkdir(exist_ok=True)
    (OUT / f"cpu_lora_bench-{args.base}.json").write_text(
        json.dumps({"rows": rows, "base_only": ref}, indent=1)
    )


if __name__ == "__main__":
    main()
