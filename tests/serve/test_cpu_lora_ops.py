"""The grouped CPU LoRA ops (serve/cpu_lora.py) against a per-token reference, no engine.

Shapes follow vLLM's stacks: A ``[slots, 1, r, in]``, B ``[slots, 1, out, r]``;
slot index -1 means "no adapter" and must leave the row untouched.
"""

from __future__ import annotations

import pytest
import torch

from lorabay.serve import cpu_lora
from lorabay.serve.cpu_lora import GroupedPunicaWrapperCPU, plan_step

SLOTS, RANK, HIDDEN = 6, 8, 32
# float32 against the row-by-row reference: the grouped ops sum in another order, so the
# last bits differ (1.3e-5 seen on values of ~1); a wrong slot or scale is off by ~0.1 or more.
SUMMATION_ORDER = dict(rtol=1e-5, atol=1e-4)


@pytest.fixture(autouse=True)
def seeded():
    """The same inputs in every order the suite runs in."""
    torch.manual_seed(0)


def reference_lora(y, x, indices, a_slices, b_slices, scale=1.0):
    """y[t, slice_i] += x[t] @ A_i[slot].T @ B_i[slot].T * scale, row by row."""
    y = y.clone()
    offset = 0
    for a, b in zip(a_slices, b_slices, strict=True):
        size = b.shape[2]
        for t, slot in enumerate(indices.tolist()):
            if slot >= 0:
                y[t, offset : offset + size] += (x[t] @ a[slot, 0].T * scale) @ b[slot, 0].T
        offset += size
    return y


def stacks(out_sizes, dtype=torch.float32, zero_slices=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    a = tuple(torch.randn(SLOTS, 1, RANK, HIDDEN, generator=g, dtype=dtype) for _ in out_sizes)
    b = tuple(torch.randn(SLOTS, 1, n, RANK, generator=g, dtype=dtype) for n in out_sizes)
    for i in zero_slices:
        a[i].zero_()
        b[i].zero_()
    return a, b


def make_wrapper(indices: torch.Tensor) -> GroupedPunicaWrapperCPU:
    wrapper = GroupedPunicaWrapperCPU(max_num_batched_tokens=256, max_batches=64, device="cpu")
    # What update_metadata computes from vLLM's mapping, without building a mapping.
    wrapper._token_plan = plan_step(indices)
    wrapper._sampler_plan = plan_step(indices)
    return wrapper


CASES = {
    "decode, every slot, some base rows": torch.tensor([0, 1, -1, 2, 3, 4, 5, -1, 0, 5]),
    "only base rows": torch.tensor([-1, -1, -1]),
    "one long prefill plus decodes": torch.tensor([2] * 40 + [0, -1, 5, 1]),
    "interleaved long group": torch.tensor([3, 1] * 30 + [-1]),
    "gap in the slots": torch.tensor([0, 5, 5, -1, 0]),
    "a prefill and decodes of one adapter": torch.tensor([2] * 40 + [0, 2, 5, -1, 2]),
    "prefills of one length": torch.tensor([1] * 40 + [4] * 40 + [2] * 40 + [-1] * 3),
}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("small_max", [16, 1_000])
@pytest.mark.parametrize("compact_max", [16, 0, 1_000])  # decode-sized, always stacks, always
def test_add_lora_linear_matches_reference(name, small_max, compact_max, monkeypatch):
    monkeypatch.setattr(cpu_lora, "SMALL_GROUP_MAX_TOKENS", small_max)
    monkeypatch.setattr(cpu_lora, "COMPACT_MAX_WIDTH", compact_max)
    indices = CASES[name]
    a, b = stacks([48, 16, 16], zero_slices=(1,))  # q, k (no adapter touches it), v
    x = torch.randn(len(indices), HIDDEN)
    y = torch.randn(len(indices), 80)
    want = reference_lora(y, x, indices, a, b, scale=0.5)
    make_wrapper(indices).add_lora_linear(y, x, a, b, 0.5, (48, 16, 16))
    torch.testing.assert_close(y, want, **SUMMATION_ORDER)
    base_rows = indices < 0
    assert torch.equal(y[base_rows], want[base_rows])  # untouched, bit for bit


@pytest.mark.parametrize("name", CASES)
def test_shrink_then_expand_matches_reference(name):
    indices = CASES[name]
    a, b = stacks([24, 24])
    x = torch.randn(len(indices), HIDDEN)
    y = torch.randn(len(indices), 48)
    want = reference_lora(y, x, indices, a, b)
    wrapper = make_wrapper(indices)
    buffer = torch.zeros(2, len(indices), RANK)  # vLLM's float32 [slices, tokens, r]
    wrapper.add_shrink(buffer, x, a, 1.0)
    wrapper.add_expand(y, buffer, b, (24, 24), offset_start=0)
    torch.testing.assert_close(y, want, **SUMMATION_ORDER)


def test_bfloat16_stays_close_to_float32():
    indices = CASES["decode, every slot, some base rows"]
    a, b = stacks([32])
    x = torch.randn(len(indices), HIDDEN)
    y = torch.zeros(len(indices), 32, dtype=torch.bfloat16)
    want = reference_lora(torch.zeros(len(indices), 32), x, indices, a, b)
    a16 = tuple(t.bfloat16() for t in a)
    b16 = tuple(t.bfloat16() for t in b)
    make_wrapper(indices).add_lora_linear(y, x.bfloat16(), a16, b16, 1.0, (32,))
    torch.testing.assert_close(y.float(), want, atol=0.5, rtol=0.05)


def test_slots_wider_than_the_adapters_are_cut_to_the_rank_in_use():
    """vLLM's slots are --max-lora-rank wide; adapters of a lower rank leave the rest
    zero. The decode path reads only the ranks some slot uses, and follows a write that
    uses more."""
    indices = torch.tensor([0, 3, -1, 5, 3])
    a, b = stacks([24])
    a[0][:, :, 3:].zero_()
    b[0][:, :, :, 3:].zero_()  # every slot holds a rank-3 adapter
    x, y = torch.randn(len(indices), HIDDEN), torch.zeros(len(indices), 24)
    wrapper = make_wrapper(indices)
    wrapper.add_lora_linear(y, x, a, b, 1.0, (24,))
    torch.testing.assert_close(y, reference_lora(torch.zeros_like(y), x, indices, a, b))
    (weights,) = wrapper._slice_cache.values()
    assert weights.rank == 3 and weights.a.shape == (SLOTS, 3, HIDDEN)
    a[0][5, 0, 6].normal_()
    b[0][5, 0, :, 6].normal_()  # a rank-7 adapter lands in slot 5
    y = torch.zeros_like(y)
    wrapper.add_lora_linear(y, x, a, b, 1.0, (24,))
    torch.testing.assert_close(y, reference_lora(torch.zeros_like(y), x, indices, a, b))
    assert next(iter(wrapper._slice_cache.values())).rank == 7


def test_equal_prefills_share_one_block_and_mixed_ones_do_not():
    prefills = plan_step(torch.tensor([1] * 64 + [4] * 64 + [2] * 64))
    assert not prefills.big and prefills.width == 64 and prefills.span == 4
    mixed = plan_step(torch.tensor([1] * 64 + [0, 2, 3, 4, 5, 0]))
    assert [slot for slot, _ in mixed.big] == [1] and mixed.width == 2


def test_zero_check_follows_writes():
    """A slice that was all zero is used as soon as vLLM loads an adapter into it."""
    indices = torch.tensor([0, 1])
    a, b = stacks([16], zero_slices=(0,))
    wrapper = make_wrapper(indices)
    x, y = torch.randn(2, HIDDEN), torch.zeros(2, 16)
    wrapper.add_lora_linear(y, x, a, b, 1.0, (16,))
    assert not y.any()
    a[0][1, 0].normal_()
    b[0][1, 0].normal_()  # an adapter lands in slot 1
    wrapper.add_lora_linear(y, x, a, b, 1.0, (16,))
    torch.testing.assert_close(y, reference_lora(torch.zeros(2, 16), x, indices, a, b))


def test_plan_groups_rows_by_slot():
    plan = plan_step(torch.tensor([3, -1, 1, 3, 1]))
    assert plan.rows.tolist() == [2, 4, 0, 3]
    assert (plan.first_slot, plan.span, plan.width) == (1, 3, 2)
    assert plan.cells.tolist() == [0, 1, 4, 5]
    assert plan_step(torch.tensor([-1, -1])).empty


def logged_activation(a: torch.Tensor, b: torch.Tensor, slot: int, rank: int) -> None:
    """What vLLM's activate_adapter does to one slice, logged as lorabay's hook logs it:
    the slot zeroed, then an adapter of ``rank`` written (rank 0: none)."""
    before = (a._version, b._version)
    a[slot] = 0
    b[slot] = 0
    a[slot, 0, :rank].normal_()
    b[slot, 0, :, :rank].normal_()
    cpu_lora.SLOT_WRITES.note(a, before[0], slot)
    cpu_lora.SLOT_WRITES.note(b, before[1], slot)


def test_logged_activations_are_worked_out_for_their_slots_only():
    """After activations the hook logged, the kept SliceWeights is the same object, brought
    up to date slot by slot, and equals what a fresh look at the stacks finds; a write the
    log does not explain makes it look at everything again."""
    (a,), (b,) = stacks([24])
    a[:, :, 5:].zero_()
    b[:, :, :, 5:].zero_()  # every slot: rank 5
    cache: dict = {}
    kept = cpu_lora.slice_weights(a, b, cache)
    kept.compact(a, b)
    for slot, rank in ((1, 3), (4, 5), (2, 0), (1, 2)):
        logged_activation(a, b, slot, rank)
    assert cpu_lora.slice_weights(a, b, cache) is kept
    fresh = cpu_lora.slice_weights(a, b, {})
    fresh.compact(a, b)
    assert kept.ranks.tolist() == fresh.ranks.tolist() == [5, 2, 0, 5, 5, 5]
    assert kept.rank == fresh.rank == 5
    torch.testing.assert_close(kept.a, fresh.a, rtol=0, atol=0)
    torch.testing.assert_close(kept.b, fresh.b, rtol=0, atol=0)

    logged_activation(a, b, 3, 8)  # wider than the copies: they are made again
    assert cpu_lora.slice_weights(a, b, cache) is kept and kept.a is None and kept.rank == 8
    a[0, 0, 0, 0] += 1.0  # a write no activation logged
    assert cpu_lora.slice_weights(a, b, cache) is not kept
    kept = cpu_lora.slice_weights(a, b, cache)
    a[5, 0, 0, 0] += 1.0  # unlogged again, then a logged activation of another slot
    logged_activation(a, b, 2, 1)
    assert cpu_lora.slice_weights(a, b, cache) is not kept


def test_the_zero_check_follows_logged_activations():
    (a,), (b,) = stacks([16], zero_slices=(0,))
    cache: dict = {}
    assert cpu_lora._all_zero(a, cache)
    logged_activation(a, b, 2, 4)
    assert not cpu_lora._all_zero(a, cache)
    logged_activation(a, b, 2, 0)  # the only adapter is replaced by one without this slice
    assert cpu_lora._all_zero(a, cache)


def test_the_hook_logs_the_slot_each_activation_writes():
    (a,), (b,) = stacks([16])

    class Module:
        lora_a_stacked, lora_b_stacked = (a,), (b,)

    class Manager:  # vLLM's LoRAModelManager, reduced to what the hook reads
        def __init__(self):
            self.modules = {"layer": Module()}
            self.lora_index_to_id = [None] * SLOTS
            self._active_adapters = {}

        def activate_adapter(self, lora_id: int) -> bool:
            if lora_id in self._active_adapters:
                return False
            self._active_adapters[lora_id] = None
            slot = self.lora_index_to_id.index(None)
            self.lora_index_to_id[slot] = lora_id
            a[slot] = 1.0
            b[slot] = 1.0
            return True

    import types

    cpu_lora.track_slot_writes(types.SimpleNamespace(LoRAModelManager=Manager))
    manager = Manager()
    versions = (a._version, b._version)
    assert manager.activate_adapter(7) and manager.activate_adapter(9)
    assert not manager.activate_adapter(9)  # already active: nothing written
    assert cpu_lora.SLOT_WRITES.since(a, versions[0]) == {0, 1}
    assert cpu_lora.SLOT_WRITES.since(b, versions[1]) == {0, 1}
