"""`lorabay base create`: deterministic, loadable by transformers, PEFT and vLLM."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from lorabay.cli.main import cli


def test_same_seed_gives_same_bytes(tmp_path):
    runner = CliRunner()
    for name in ("a", "b"):
        result = runner.invoke(cli, ["base", "create", str(tmp_path / name), "--seed", "3"])
        assert result.exit_code == 0, result.output
    for file in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file


def test_other_seed_gives_other_weights(tmp_path, tiny_base):
    from lorabay.train.base import create_base

    other = create_base(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (
        tiny_base / "model.safetensors"
    ).read_bytes()


def test_refuses_nonempty_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    result = CliRunner().invoke(cli, ["base", "create", str(tmp_path / "x")])
    assert result.exit_code == 1
    assert "--overwrite" in result.output
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


def test_tiny_base_files_and_size(tiny_base):
    from lorabay.train.base import count_parameters

    for file in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ):
        assert (tiny_base / file).is_file(), file
    config = json.loads((tiny_base / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert 1_000_000 < count_parameters(tiny_base) < 5_000_000


def test_tokenizer_round_trip_and_chat_template(tiny_base):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    text = "The cat sat on the mat. 6 * 7 = 42!"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"


def test_transformers_and_peft_load_and_lora_changes_output(tiny_base, make_lora):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        base_logits = model(ids).logits
        peft_model = PeftModel.from_pretrained(model, make_lora(r=8))
        lora_logits = peft_model(ids).logits
    assert base_logits.shape == (1, 4, 2048)
    assert not torch.allclose(base_logits, lora_logits)


VLLM_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    if __name__ == "__main__":  # vLLM spawns its engine: the guard is required
        base, lora, prompt = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
        llm = LLM(base, dtype="float32", enable_lora=True, max_lora_rank=8, max_model_len=256)
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        request = [{"prompt_token_ids": prompt}]
        plain = llm.generate(request, params, use_tqdm=False)[0].outputs[0].token_ids
        adapted = llm.generate(request, params, lora_request=LoRARequest("a", 1, lora), use_tqdm=False)[0].outputs[0].token_ids
        print("RESULT " + json.dumps({"base": list(plain), "lora": list(adapted)}))
    """
)


@pytest.mark.vllm
def test_vllm_generates_with_and_without_lora(tiny_base, make_lora, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lora = make_lora(r=8)
    prompt = [5, 6, 7, 8, 9]
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, lora)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        want_lora = peft_model.generate(ids, max_new_tokens=12, do_sample=False)[
            0, len(prompt) :
        ].tolist()
        with peft_model.disable_adapter():
            want_base = peft_model.generate(ids, max_new_tokens=12, do_sample=False)[
                0, len(prompt) :
            ].tolist()

    script = tmp_path / "gen.py"
    script.write_text(VLLM_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(tiny_base), str(lora), json.dumps(prompt)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    got = json.loads(line.removeprefix("RESULT "))
    assert got["base"] == want_base
    assert got["lora"] == want_lora
    assert got["base"] != got["lora"]
