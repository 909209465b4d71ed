"""`lorabay plan`: sizes from config.json alone, checked against the seed table and against
what PEFT and bitsandbytes really produce on the tiny base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from lorabay.cli.main import cli
from lorabay.train.plan import plan_lora

LLAMA_2_7B = Path(__file__).parent / "fixtures" / "llama-2-7b"


def test_llama_2_7b_seed_table():
    r8 = plan_lora(LLAMA_2_7B, 8, ["q_proj", "v_proj"])
    assert r8.base_parameters == 6_738_415_616
    assert r8.trainable_parameters == 4_194_304
    assert f"{r8.trainable_percent:.2f}%" == "0.06%"
    assert 8.0e6 < r8.adapter_bytes_bf16 < 8.5e6  # "LoRA r=8 ~8 MB"
    assert r8.base_bytes_bf16 == 2 * 6_738_415_616  # ~13.5 GB, "full fine-tune ~14 GB"
    # NF4 with double-quantized constants and 16-bit embeddings: 3.5-3.9 GB ("~3.5 GB" nominal)
    assert 3.5e9 < r8.base_bytes_nf4 < 3.9e9
    assert r8.base_bytes_nf4_nominal == 6_738_415_616 // 2
    assert r8.train_bytes_full > 100e9  # weights + gradients + AdamW, full fine-tune

    r64 = plan_lora(LLAMA_2_7B, 64, ["q_proj", "v_proj"])
    assert r64.trainable_parameters == 33_554_432
    assert 64e6 < r64.adapter_bytes_bf16 < 68e6  # "r=64 ~66 MB"


def test_cli_prints_the_table_and_json():
    runner = CliRunner()
    result = runner.invoke(
        cli,
        [
            "plan",
            "--base",
            str(LLAMA_2_7B / "config.json"),
            "--r",
            "8",
            "--targets",
            "q_proj,v_proj",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "4,194,304 (0.06% of the base)" in result.output
    assert "13.48 GB" in result.output and "NF4 3.87 GB" in result.output
    assert "full fine-tune" in result.output

    result = runner.invoke(
        cli,
        ["plan", "--base", str(LLAMA_2_7B), "--r", "64", "--targets", "q_proj,v_proj", "--json"],
    )
    assert json.loads(result.output)["trainable_parameters"] == 33_554_432


def test_unknown_target_and_architecture_are_refused(tmp_path):
    result = CliRunner().invoke(cli, ["plan", "--base", str(LLAMA_2_7B), "--targets", "qkv"])
    assert result.exit_code == 1
    assert "q_proj" in result.output  # names the modules it knows
    moe = tmp_path / "config.json"
    moe.write_text(
        json.dumps({**json.loads((LLAMA_2_7B / "config.json").read_text()), "num_local_experts": 8})
    )
    result = CliRunner().invoke(cli, ["plan", "--base", str(moe)])
    assert result.exit_code == 1 and "mixture of experts" in result.output


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["all-linear"]])
def test_matches_peft_on_the_tiny_base(tiny_base, tmp_path, targets):
    """Trainable parameters, base parameters and the adapter file size are exact."""
    import torch
    from transformers import AutoModelForCausalLM

    from lorabay.train.base import count_parameters
    from lorabay.train.model import attach_adapter, new_lora_config

    plan = plan_lora(tiny_base, 8, targets)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    peft_model = attach_adapter(model, new_lora_config(8, 16, targets))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert plan.trainable_parameters == trainable
    assert plan.base_parameters == count_parameters(tiny_base)
    peft_model.save_pretrained(tmp_path / "adapter")  # fp32, as PEFT keeps it for an fp32 base
    assert (
        plan.adapter_bytes_fp32
        == (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    )


def test_nf4_size_matches_bitsandbytes(tiny_base):
    """The NF4 estimate is within 0.1% of the tensors bitsandbytes really holds."""
    from lorabay.train.model import load_base

    plan = plan_lora(tiny_base, 8, ["q_proj"], quantize="nf4")
    model, _ = load_base(tiny_base, quantize="nf4")
    held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    # The state dict also carries a ~170-byte serialized quant state per tensor.
    assert abs(held - plan.base_bytes_nf4) / held < 1e-3
