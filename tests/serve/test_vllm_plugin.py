"""lorabay's vLLM plugin: tokens without an adapter (slot index -1) get no LoRA delta.

vLLM's own CPU ops are checked too, to show the bug the plugin exists for; when a
vLLM release fixes it, the second test says so and the plugin can go.
"""

from __future__ import annotations

import pytest
import torch

from lorabay.serve import vllm_plugin


def shrink_then_expand(ops, a, b, x, indices):
    r = a.shape[-2]
    buffer = torch.zeros((x.shape[0], r), dtype=torch.float32)
    ops.bgmv_shrink(x, a, buffer, indices, 1.0)
    y = torch.zeros((x.shape[0], b.shape[-2]), dtype=torch.float32)
    ops.bgmv_expand(buffer, b, y, indices, True)
    return y


def weights(slots=3, r=4, hidden=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn((slots, 1, r, hidden), generator=generator)  # [slots, 1, r, in]
    b = torch.randn((slots, 1, hidden, r), generator=generator)  # [slots, 1, out, r]
    x = torch.randn((4, hidden), generator=generator)
    return a, b, x


def test_tokens_without_an_adapter_get_no_delta():
    a, b, x = weights()
    indices = torch.tensor([0, -1, 2, -1])
    y = shrink_then_expand(vllm_plugin, a, b, x, indices)
    assert torch.all(y[1] == 0) and torch.all(y[3] == 0)
    for row, slot in ((0, 0), (2, 2)):
        expected = (x[row] @ a[slot, 0].T) @ b[slot, 0].T
        torch.testing.assert_close(y[row], expected)


def test_expand_slice_and_assign_leave_base_rows_alone():
    a, b, x = weights()
    indices = torch.tensor([1, -1, -1, 0])
    buffer = torch.randn((4, 4))
    y = torch.full((4, 20), 7.0)
    vllm_plugin.bgmv_expand_slice(buffer, b, y, indices, 4, 8, True)
    assert torch.all(y[1] == 7.0) and torch.all(y[2] == 7.0)
    assert not torch.all(y[0, 4:12] == 7.0)
    y = torch.full((4, 8), 7.0)
    vllm_plugin.bgmv_expand(buffer, b, y, indices, False)
    assert torch.all(y[1] == 7.0) and torch.all(y[2] == 7.0)


def test_vllms_own_cpu_ops_give_base_tokens_the_last_slot():
    from vllm.lora.ops.torch_ops import lora_ops

    if getattr(lora_ops, "_lorabay_patched", False):
        pytest.skip("vLLM's ops are patched in this process: the stock ones cannot be run")
    a, b, x = weights()
    indices = torch.tensor([-1, -1, -1, -1])
    y = shrink_then_expand(lora_ops, a, b, x, indices)
    last = (x @ a[-1, 0].T) @ b[-1, 0].T
    # The bug: -1 indexes the last slot. If this fails, vLLM fixed it: drop the patch.
    torch.testing.assert_close(y, last)


@pytest.fixture
def stock_vllm(monkeypatch):
    """vLLM's CPU platform and LoRA ops as they ship, put back after the test."""
    from vllm.lora.ops import torch_ops
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu
    from vllm.platforms import current_platform

    platform = type(current_platform)
    monkeypatch.setattr(platform, "get_punica_wrapper", platform.get_punica_wrapper)
    for module in (lora_ops, torch_ops, punica_cpu):
        for name in vllm_plugin.FIXED:
            if hasattr(module, name):
                monkeypatch.setattr(module, name, getattr(module, name))
    monkeypatch.setattr(lora_ops, "_lorabay_patched", False, raising=False)
    return current_platform, lora_ops, punica_cpu


def test_register_routes_the_cpu_to_the_grouped_path_and_one_switch_turns_it_off(
    stock_vllm, monkeypatch
):
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
    from vllm.utils.import_utils import resolve_obj_by_qualname

    platform, lora_ops, punica_cpu = stock_vllm
    stock_wrapper, stock_shrink = platform.get_punica_wrapper(), punica_cpu.bgmv_shrink
    monkeypatch.setenv("LORABAY_VLLM_PLUGIN", "0")
    vllm_plugin.register()
    assert platform.get_punica_wrapper() == stock_wrapper
    monkeypatch.setenv("LORABAY_VLLM_PLUGIN", "1")
    vllm_plugin.register()
    assert platform.get_punica_wrapper() == vllm_plugin.WRAPPER_QUALNAME != stock_wrapper
    wrapper = resolve_obj_by_qualname(platform.get_punica_wrapper())
    assert issubclass(wrapper, PunicaWrapperCPU) and wrapper is not PunicaWrapperCPU
    # The grouped path replaces the ops it would have patched: they stay as they ship.
    assert punica_cpu.bgmv_shrink is stock_shrink


def test_on_an_untested_vllm_register_patches_every_binding_of_the_stock_ops(
    stock_vllm, monkeypatch
):
    from vllm.lora.ops import torch_ops

    platform, lora_ops, punica_cpu = stock_vllm
    stock_wrapper = platform.get_punica_wrapper()
    monkeypatch.setattr(vllm_plugin, "TESTED_VLLM_VERSIONS", ("0.0.0",))
    monkeypatch.setenv("LORABAY_VLLM_PLUGIN", "1")
    vllm_plugin.register()
    assert platform.get_punica_wrapper() == stock_wrapper
    for module in (lora_ops, torch_ops, punica_cpu):
        for name, function in vllm_plugin.FIXED.items():
            if hasattr(module, name):
                assert getattr(module, name) is function, (module.__name__, name)


def test_the_plugin_asks_for_amx_where_the_cpu_has_it():
    # Without the permission, vLLM's bfloat16 CPU attention (its AMX kernel) dies of
    # SIGILL; the real engine case is test_lifecycle's default-dtype test.
    assert vllm_plugin.allow_amx() == bool(torch.cpu._is_amx_tile_supported())


def test_idle_readers_nap_inside_vllms_busy_window_and_leave_the_rest_to_it(monkeypatch):
    import time
    from types import SimpleNamespace

    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

    calls = []
    monkeypatch.setattr(SpinCondition, "wait", lambda self, timeout_ms=None: calls.append(self))
    monkeypatch.setenv("LORABAY_VLLM_NAP_US", "2000")
    assert vllm_plugin.patch_spin_wait() == 0.002
    now = time.monotonic()
    just_read = SimpleNamespace(last_read=now, busy_loop_s=1.0)
    waiting = SimpleNamespace(last_read=now - 0.01, busy_loop_s=1.0)
    idle = SimpleNamespace(last_read=now - 5.0, busy_loop_s=1.0)
    SpinCondition.wait(just_read)  # right after a read: vLLM's spin
    started = time.monotonic()
    SpinCondition.wait(waiting)  # waiting a while: a nap, and back to look at the ring
    napped = time.monotonic() - started
    SpinCondition.wait(idle)  # past the busy window: vLLM's own ZMQ wait
    assert calls == [just_read, idle]
    assert napped >= 0.002
    monkeypatch.setenv("LORABAY_VLLM_NAP_US", "0")
    assert vllm_plugin.patch_spin_wait() == 0.0


SEEDED_SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams

if __name__ == "__main__":  # vLLM spawns its engine: the guard is required
    llm = LLM(sys.argv[1], dtype="float32", max_model_len=256, enable_chunked_prefill=True,
              max_num_batched_tokens=32)
    prompts = [{"prompt_token_ids": [(7 * i + 13 * j) % 1900 + 3 for j in range(70)]}
               for i in range(4)]
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=4)
    runs = [[list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
            for _ in range(2)]
    print("RESULT " + json.dumps(runs))
"""


@pytest.mark.vllm
def test_a_seeded_request_prefilled_in_chunks_neither_kills_the_engine_nor_loses_its_seed(
    tiny_base, tmp_path
):
    # 70-token prompts under a 32-token step budget: every prompt is prefilled in chunks,
    # and vLLM rewinds each seeded request's generator after a partial prefill, which a CPU
    # generator cannot do (without the plugin: "CPU Generator does not use offset", the
    # engine dead).
    import json
    import subprocess
    import sys

    script = tmp_path / "seeded.py"
    script.write_text(SEEDED_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(tiny_base)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    first, second = json.loads(line.removeprefix("RESULT "))
    assert first == second  # the same seed, the same schedule: the same tokens
    assert all(len(tokens) == 4 for tokens in first)
