"""The reference policy is one adapter switch away from the policy: never a second base."""

from __future__ import annotations

import torch

from lorabay.train.model import (
    add_reference_adapter,
    attach_adapter,
    load_adapter,
    load_base,
    new_lora_config,
    reference_policy,
    save_adapter,
)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_reference_policy_is_the_frozen_parent_or_the_disabled_adapter(
    tiny_base, make_lora, tmp_path
):
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    base, _ = load_base(tiny_base)
    plain = logits(base, ids)
    policy = load_adapter(base, make_lora(r=8), trainable=True)
    parent = logits(policy, ids)
    add_reference_adapter(policy)
    # Only the trained copy learns; the reference copy is frozen.
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n for n in trainable)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if ".default." in name and "lora_B" in name:
                param.add_(0.5)
    assert not torch.allclose(logits(policy, ids), parent)
    with reference_policy(policy):
        assert torch.allclose(logits(policy, ids), parent)
    assert policy.active_adapter == "default"
    # Saving keeps only the trained adapter.
    saved = save_adapter(policy, tmp_path / "adapter")
    assert sorted(p.name for p in saved.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]

    fresh = attach_adapter(load_base(tiny_base)[0], new_lora_config(8, 16, ["q_proj"]))
    with torch.no_grad():
        for name, param in fresh.named_parameters():
            if "lora_B" in name:
                param.add_(0.5)
    with reference_policy(fresh):
        assert torch.allclose(logits(fresh, ids), plain)


def test_all_linear_is_saved_as_leaf_names(tiny_base, tmp_path):
    import json

    model = attach_adapter(load_base(tiny_base)[0], new_lora_config(4, 8, ["all-linear"]))
    saved = save_adapter(model, tmp_path / "adapter")
    config = json.loads((saved / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert config["inference_mode"] is True
    reloaded = load_adapter(load_base(tiny_base)[0], saved, trainable=False)
    assert len([n for n, _ in reloaded.named_modules() if n.endswith("lora_A.default")]) == 14


def test_auto_precision_is_bf16_for_a_bf16_base_unless_the_cpu_emulates_it(tmp_path, monkeypatch):
    import json

    from lorabay.hub import machine
    from lorabay.train.model import compute_dtype

    (tmp_path / "config.json").write_text(json.dumps({"dtype": "bfloat16"}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(machine, "bf16_is_emulated", lambda: False)  # AVX512-BF16, AMX
    assert compute_dtype(tmp_path, "auto") == torch.bfloat16
    monkeypatch.setattr(machine, "bf16_is_emulated", lambda: True)  # an AVX2-only CPU
    assert compute_dtype(tmp_path, "auto") == torch.float32
    assert compute_dtype(tmp_path, "bf16") == torch.bfloat16  # asked for: as asked
