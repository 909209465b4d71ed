"""The real base (SmolLM2-135M-Instruct, pulled from its PyPI package) through `lorabay serve`.

A pretrained model's shapes differ from the tiny base's: 30 layers, grouped-query
attention 9/3, a 49,152-token vocabulary with tied embeddings, and its own chat template.
One gateway (float32, so vLLM can be compared with transformers + PEFT token for token)
serves the module.
"""

from __future__ import annotations

import asyncio
import random
import signal

import openai
import pytest
from servetools import GatewayProcess, greedy_reference

from lorabay.hub import Registry

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

NEW_TOKENS = 12
CHATS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "What is 2+2?",
    "Name three colours.",
]
# name -> build_lora parameters: three shapes of adapter on the real base.
ADAPTERS = {
    "real/qv": dict(seed=31, scale=0.05),
    "real/attn": dict(seed=32, r=16, targets=("q_proj", "k_proj", "v_proj", "o_proj"), scale=0.05),
    "real/mlp": dict(seed=33, r=4, targets=("gate_proj", "up_proj", "down_proj"), scale=0.05),
}


@pytest.fixture(scope="module")
def adapters(real_base, lora_builder, tmp_path_factory):
    root = tmp_path_factory.mktemp("real-adapters")
    return {name: lora_builder(real_base, root / name, **p) for name, p in ADAPTERS.items()}


@pytest.fixture(scope="module")
def served(real_base, adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("real-serve")
    registry_url = f"file://{root / 'registry'}"
    registry = Registry.open(registry_url)
    for name, folder in adapters.items():
        registry.push(folder, name, base=real_base)
    gateway = GatewayProcess(
        [
            *("--base", str(real_base), "--dtype", "float32", "--registry", registry_url),
            *("--port", "0", "--max-loras", "3"),
        ],
        env={"LORABAY_HOME": str(root / "home")},
    )
    try:
        gateway.start()
        assert gateway.url, gateway.output
        yield gateway
    finally:
        gateway.stop(signal.SIGTERM)
        gateway.kill_leftovers()


@pytest.fixture(scope="module")
def prompts(real_base) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(real_base)
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )["input_ids"]
        for text in CHATS
    ]


@pytest.fixture(scope="module")
def reference(real_base, adapters, prompts):
    return greedy_reference(real_base, adapters, prompts, NEW_TOKENS)


def models() -> list[tuple[str, str | None]]:
    return [("smollm2", None)] + [(name, name) for name in ADAPTERS]


async def complete_all(url: str, jobs: list[tuple[str, list[int]]]) -> list[list[int]]:
    # The openai client's own retries, as a user has them. Its pool keeps an idle connection
    # 5 s; the gateway kept them as long (a ReadError once in a two-worker suite run) and
    # now keeps them 30 s (serve/server.py KEEP_ALIVE_SECONDS). Retries change no token.
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=2, timeout=600)
    semaphore = asyncio.Semaphore(64)

    async def one(model: str, prompt: list[int]) -> list[int]:
        async with semaphore:
            response = await client.completions.create(
                model=model,
                prompt=prompt,
                max_tokens=NEW_TOKENS,
                temperature=0,
                extra_body={"return_token_ids": True, "ignore_eos": True},
            )
            return response.choices[0].model_extra["token_ids"]

    try:
        return await asyncio.gather(*(one(model, prompt) for model, prompt in jobs))
    finally:
        await client.close()


def test_chat_answers_like_the_instruct_model(served):
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="none", max_retries=0)
    reply = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16,
        temperature=0,
    )
    assert "Paris" in reply.choices[0].message.content


def test_the_pulled_folder_generates_the_same_greedy_tokens_in_vllm_and_transformers(
    served, prompts, reference
):
    """One request at a time, base and every adapter: vLLM (fp32) equals transformers + PEFT."""
    for model, adapter in models():
        got = asyncio.run(complete_all(served.url, [(model, p) for p in prompts]))
        assert got == reference[adapter], model


def test_mixed_concurrent_traffic_equals_peft(served, prompts, reference):
    jobs = [
        (model, adapter, index)
        for model, adapter in models()
        for index in range(len(prompts))
        for _ in range(7)
    ]
    random.Random(0).shuffle(jobs)
    assert len(jobs) >= 100
    results = asyncio.run(complete_all(served.url, [(m, prompts[i]) for m, _, i in jobs]))
    wrong = [
        (model, index)
        for (model, adapter, index), ids in zip(jobs, results, strict=True)
        if ids != reference[adapter][index]
    ]
    assert not wrong, f"{len(wrong)} of {len(jobs)} differ from PEFT: {wrong[:5]}"
