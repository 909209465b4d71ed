"""The grouped CPU LoRA path inside the real vLLM engine equals transformers+PEFT.

One batch mixes the base and as many adapters as the engine has slots
(``max_loras``), of ranks 8 and 16, on q/v and on every linear layer, with prompts
long enough to be prefilled in chunks; greedy token ids must equal PEFT's for every
request, with chunked prefill on and off, and with two slots for the four adapters
(swapped in and out). Slots all full is the case where vLLM's own CPU ops gave base
requests the last slot's adapter.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTERS = [  # (rank, targets, seed)
    (8, ("q_proj", "v_proj"), 11),
    (16, ("q_proj", "v_proj"), 12),
    (8, ALL_LINEAR, 13),
    (16, ALL_LINEAR, 14),
]
NEW_TOKENS = 10

ENGINE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    if __name__ == "__main__":  # vLLM spawns its engine: the guard is required
        job = json.loads(sys.argv[1])
        engine = {"max_loras": len(job["adapters"]), **job["engine"]}
        llm = LLM(job["base"], dtype="float32", enable_lora=True, max_lora_rank=16,
                  max_model_len=256, seed=0, **engine)
        loras = [LoRARequest(f"a{i}", i + 1, path) for i, path in enumerate(job["adapters"])]
        prompts = [{"prompt_token_ids": ids} for ids, _ in job["requests"]]
        which = [None if k < 0 else loras[k] for _, k in job["requests"]]
        params = SamplingParams(max_tokens=job["new_tokens"], temperature=0, ignore_eos=True)
        outs = llm.generate(prompts, params, lora_request=which, use_tqdm=False)
        print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
    """
)


def requests_for(n_adapters: int) -> list[tuple[list[int], int]]:
    """Prompts of 3 to 70 tokens; adapter index -1 is the base. Every adapter and the
    base appear several times, long and short, interleaved."""
    requests = []
    for i in range(15):
        length = [3, 9, 70, 24, 41][i % 5]
        ids = [(7 * i + 13 * j) % 1900 + 3 for j in range(length)]
        requests.append((ids, (i % (n_adapters + 1)) - 1))
    return requests


def peft_reference(base, adapters, requests) -> list[list[int]]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
    for i, path in enumerate(adapters[1:], start=1):
        model.load_adapter(path, adapter_name=f"a{i}")
    outputs = []
    with torch.no_grad():
        for ids, k in requests:
            inputs = torch.tensor([ids])
            if k < 0:
                with model.disable_adapter():
                    out = model.generate(inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
            else:
                model.set_adapter(f"a{k}")
                out = model.generate(inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
            outputs.append(out[0, len(ids) :].tolist())
    return outputs


@pytest.fixture(scope="module")
def adapters(make_lora):
    return [str(make_lora(r=r, alpha=2 * r, targets=t, seed=s)) for r, t, s in ADAPTERS]


@pytest.mark.vllm
@pytest.mark.parametrize(
    "engine",
    [
        {"enable_chunked_prefill": True, "max_num_batched_tokens": 64},
        {"enable_chunked_prefill": False, "max_num_batched_tokens": 256},
        # Two slots for four adapters: each activation replaces another adapter (of
        # another rank, on other modules) in a slot, the case cpu_lora.SlotWrites follows.
        {"enable_chunked_prefill": True, "max_num_batched_tokens": 64, "max_loras": 2},
    ],
    ids=["chunked-prefill", "whole-prefill", "two-slots-swapping"],
)
def test_grouped_path_equals_peft(engine, tiny_base, adapters, tmp_path, monkeypatch):
    requests = requests_for(len(adapters))
    want = peft_reference(tiny_base, adapters, requests)

    script = tmp_path / "engine.py"
    script.write_text(ENGINE_SCRIPT)
    job = {
        "base": str(tiny_base),
        "adapters": adapters,
        "requests": requests,
        "engine": engine,
        "new_tokens": NEW_TOKENS,
    }
    monkeypatch.setenv("LORABAY_VLLM_PLUGIN", "1")
    done = subprocess.run(
        [sys.executable, str(script), json.dumps(job)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Using GroupedPunicaWrapperCPU" in done.stderr + done.stdout
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    got = json.loads(line.removeprefix("RESULT "))
    mismatches = [
        (i, k, g, w)
        for i, ((_, k), g, w) in enumerate(zip(requests, got, want, strict=True))
        if g != w
    ]
    assert not mismatches, f"request, adapter, vllm, peft: {mismatches}"
