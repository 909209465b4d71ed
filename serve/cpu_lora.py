"""A faster, correct multi-LoRA path for vLLM on CPU, shipped as a vLLM plugin.

vLLM 0.32's CPU punica wrapper (``vllm/lora/punica_wrapper/punica_cpu.py``) applies
LoRA per token: for every token of the batch it gathers that token's adapter
weights (``lora_a_stacked[indices]``, a ``[tokens, rank, hidden]`` copy), converts
them to float32, and runs a batched matrix-*vector* product. On the 155M ``small``
base that costs two thirds of the throughput (bench/cpu_lora_bench.py), although
rank-8 LoRA adds under 1% of the arithmetic. It is also wrong: a token with no
adapter has index -1, and ``weights[-1]`` is the *last slot*, so once every slot
holds an adapter, base requests batched with adapter requests get the last
adapter's delta.

This path groups tokens by adapter slot once per step (:class:`StepPlan`) and then,
per LoRA layer, gathers the activations of the small groups into one padded block
and runs two ``bmm`` calls over *views* of the stacked weights (no weight copies,
no per-token gather), plus one plain matmul pair per large group (long prefills).
Tokens without an adapter are never touched. The number of PyTorch calls per layer
does not grow with the number of adapters.

Turned on by vLLM's plugin entry point (``vllm.general_plugins`` ->
:func:`register`) in every vLLM process, only on the CPU platform and only on the
vLLM versions in :data:`TESTED_VLLM_VERSIONS`. ``LORABAY_CPU_LORA=0`` turns it off.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

TESTED_VLLM_VERSIONS = ("0.32.0",)
WRAPPER_QUALNAME = "lorabay.serve.cpu_lora.GroupedPunicaWrapperCPU"
ENV_SWITCH = "LORABAY_CPU_LORA"

# Groups with more tokens than this (a long prefill) get their own matmuls instead
# of being padded into the shared block: padding every slot to a 512-token prefill
# would cost more than the matmuls it saves.
SMALL_GROUP_MAX_TOKENS = 16


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


def register() -> None:
    """vLLM general-plugin entry point: route the CPU platform to the grouped wrapper."""
    if not enabled():
        return
    import vllm
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    if vllm.__version__ not in TESTED_VLLM_VERSIONS:
        logger.warning(
            "lorabay CPU LoRA path is off: tested with vLLM %s, found %s",
            ", ".join(TESTED_VLLM_VERSIONS),
            vllm.__version__,
        )
        return
    type(current_platform).get_punica_wrapper = classmethod(lambda cls: WRAPPER_QUALNAME)


@dataclass
class StepPlan:
    """Which rows of the batch use which adapter slot, computed once per step.

    ``rows``: ``[n_small]`` batch rows of the small groups, sorted by slot.
    ``gather``: ``[span * width]`` for each cell of the padded block (slot-major),
    the batch row it takes its activations from (row 0 for empty cells, whose
    results are dropped). ``cells``: ``[n_small]`` the cell holding each of ``rows``.
    ``big``: ``(slot, rows)`` per large group; ``rows`` is a slice when contiguous.
    """

    first_slot: int = 0
    span: int = 0  # slots first_slot .. first_slot + span - 1 form the padded block
    width: int = 0  # cells per slot in the padded block (largest small group)
    rows: torch.Tensor | None = None
    gather: torch.Tensor | None = None
    cells: torch.Tensor | None = None
    big: tuple[tuple[int, torch.Tensor | slice], ...] = ()

    @property
    def empty(self) -> bool:
        return self.span == 0 and not self.big


def plan_step(indices: torch.Tensor) -> StepPlan:
    """Group batch rows by adapter slot; rows with index -1 (no adapter) are left out."""
    rows = torch.nonzero(indices >= 0).flatten()
    if rows.numel() == 0:
        return StepPlan()
    slots = indices[rows]
    order = torch.argsort(slots, stable=True)
    rows, slots = rows[order], slots[order]  # [n], sorted by slot, batch order kept within a slot
    present, counts = torch.unique_consecutive(slots, return_counts=True)
    present_list, counts_list = present.tolist(), counts.tolist()

    small = counts <= SMALL_GROUP_MAX_TOKENS
    big: list[tuple[int, torch.Tensor | slice]] = []
    start = 0
    for slot, count in zip(present_list, counts_list, strict=True):
        if count > SMALL_GROUP_MAX_TOKENS:
            group = rows[start : start + count]
            first, last = int(group[0]), int(group[-1])
            contiguous = last - first + 1 == count
            big.append((slot, slice(first, last + 1) if contiguous else group))
        start += count
    if not bool(small.any()):
        return StepPlan(big=tuple(big))

    # Position of every row inside its slot's group: 0, 1, 2, ... per group.
    group_start = torch.cumsum(counts, 0) - counts  # [groups]
    group_of_row = torch.repeat_interleave(torch.arange(len(counts_list)), counts)  # [n]
    rank = torch.arange(rows.numel()) - group_start[group_of_row]  # [n]
    keep = small[group_of_row]  # [n] rows of small groups
    small_slots = present[small]
    first_slot = int(small_slots[0])
    span = int(small_slots[-1]) - first_slot + 1
    width = int(counts[small].max())
    cells = (slots[keep] - first_slot) * width + rank[keep]  # [n_small], increasing
    gather = torch.zeros(span * width, dtype=torch.long)
    gather[cells] = rows[keep]
    return StepPlan(first_slot, span, width, rows[keep], gather, cells, tuple(big))


def _stacked(weights: torch.Tensor) -> torch.Tensor:
    """vLLM stacks adapter weights as ``[slots, 1, out, in]``; drop the 1 (a view)."""
    return weights[:, 0] if weights.dim() == 4 else weights


def grouped_lora_matmul(
    plan: StepPlan,
    x: torch.Tensor,
    weights: torch.Tensor,
    scale: float = 1.0,
) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """``x[t] @ weights[slot(t)].T * scale`` for every planned row ``t``, computed in
    the weights' dtype (activations are cast, never the stacked weights).

    x: ``[tokens, in]``; weights: ``[slots, (1,) out, in]``.
    Returns the small groups' results ``[n_small, out]`` (aligned with
    ``plan.rows``) and one ``[rows_g, out]`` result per large group.
    """
    w = _stacked(weights)
    small = None
    if plan.span:
        x_block = x.index_select(0, plan.gather).to(w.dtype)
        x_block = x_block.view(plan.span, plan.width, x.shape[-1])  # [span, width, in]
        w_block = w[plan.first_slot : plan.first_slot + plan.span]  # a view: no weight copy
        out = torch.bmm(x_block, w_block.transpose(1, 2))  # [span, width, out]
        small = out.view(-1, out.shape[-1]).index_select(0, plan.cells)  # [n_small, out]
        if scale != 1.0:
            small.mul_(scale)
    big = []
    for slot, rows in plan.big:
        x_group = x[rows] if isinstance(rows, slice) else x.index_select(0, rows)
        out = x_group.to(w.dtype) @ w[slot].T  # [rows_g, out]
        if scale != 1.0:
            out.mul_(scale)
        big.append(out)
    return small, big


def add_rows(
    plan: StepPlan,
    y: torch.Tensor,
    small: torch.Tensor | None,
    big: list[torch.Tensor],
    add_inputs: bool = True,
) -> None:
    """Write (or add) per-row results back into ``y`` (``[tokens, out]``, may be a column view)."""
    if small is not None:
        small = small.to(y.dtype)
        if add_inputs:
            y.index_add_(0, plan.rows, small)
        else:
            y.index_copy_(0, plan.rows, small)
    for (_, rows), out in zip(plan.big, big, strict=True):
        out = out.to(y.dtype)
        if isinstance(rows, slice):
            if add_inputs:
                y[rows] += out
            else:
                y[rows] = out
        elif add_inputs:
            y.index_add_(0, rows, out)
        else:
            y.index_copy_(0, rows, out)


def _all_zero(weights: torch.Tensor, cache: dict) -> bool:
    """True when every slot of this stacked weight is zero (e.g. the k slice of a
    q/v adapter). Cached per tensor until vLLM writes to it (``_version`` moves)."""
    key = (weights.data_ptr(), weights._version)
    hit = cache.get(id(weights))
    if hit is not None and hit[0] == key:
        return hit[1]
    zero = not bool(weights.any())
    cache[id(weights)] = (key, zero)
    return zero


def _import_base():
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    return PunicaWrapperCPU


class GroupedPunicaWrapperCPU(_import_base()):
    """vLLM's CPU punica wrapper with grouped LoRA ops (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._token_plan = StepPlan()
        self._sampler_plan = StepPlan()
        self._zero_cache: dict = {}

    def update_metadata(self, *args: Any, **kwargs: Any) -> None:
        super().update_metadata(*args, **kwargs)
        self._token_plan = plan_step(self.token_lora_indices)
        self._sampler_plan = plan_step(self.sampler_indices)

    def _live(self, weights: torch.Tensor) -> bool:
        return not _all_zero(weights, self._zero_cache)

    def add_shrink(self, y, x, lora_a_stacked, scale: float, **kwargs: Any) -> None:
        """``y[i][t] = x[t] @ A_i[slot(t)].T * scale`` for adapter rows; y: ``[slices, tokens, r]``."""
        plan = self._token_plan
        if plan.empty:
            return
        x = x.view(-1, x.shape[-1])
        for i, a in enumerate(lora_a_stacked):
            if self._live(a):
                small, big = grouped_lora_matmul(plan, x, a, scale)
                add_rows(plan, y[i], small, big, add_inputs=False)

    def add_expand(
        self,
        y,
        x,
        lora_b_stacked,
        output_slices,
        offset_start: int = 0,
        add_inputs=True,
        **kwargs: Any,
    ) -> None:
        """``y[t, slice_i] += x[i][t] @ B_i[slot(t)].T`` for adapter rows."""
        plan = self._token_plan
        if plan.empty:
            return
        y = y.view(-1, y.shape[-1])
        offset = offset_start
        for i, (b, size) in enumerate(zip(lora_b_stacked, output_slices, strict=True)):
            if self._live(b):
                small, big = grouped_lora_matmul(plan, x[i], b)
                add_rows(plan, y[:, offset : offset + size], small, big, add_inputs=add_inputs)
            offset += size

    def add_lora_linear(
        self,
        y,
        x,
        lora_a_stacked,
        lora_b_stacked,
        scale: float,
        output_slices,
        *,
        buffer=None,
        **kwargs: Any,
    ) -> None:
        """``y[t, slice_i] += x[t] @ A_i.T @ B_i.T * scale``, shrink and expand fused per slice."""
        plan = self._token_plan
        if plan.empty:
            return
        add_inputs = kwargs.get("add_inputs", True)
        x = x.view(-1, x.shape[-1])
        offset = 0
        for a, b, size in zip(lora_a_stacked, lora_b_stacked, output_slices, strict=True):
            if self._live(a) and self._live(b):
                small, big = self._shrink_expand(plan, x, a, b, scale)
                add_rows(plan, y[:, offset : offset + size], small, big, add_inputs=add_inputs)
            elif not add_inputs:
                y[:, offset : offset + size] = 0
            offset += size

    @staticmethod
    def _shrink_expand(plan: StepPlan, x, a, b, scale: float):
        """Both matmuls on the padded block without leaving it: [span, width, in] ->
        [span, width, r] -> [span, width, out], then pick the real cells."""
        a, b = _stacked(a), _stacked(b)
        small = None
        if plan.span:
            block = slice(plan.first_slot, plan.first_slot + plan.span)
            x_block = x.index_select(0, plan.gather).to(a.dtype)
            x_block = x_block.view(plan.span, plan.width, x.shape[-1])  # [span, width, in]
            hidden = torch.bmm(x_block, a[block].transpose(1, 2))  # [span, width, r]
            if scale != 1.0:
                hidden.mul_(scale)
            out = torch.bmm(hidden, b[block].transpose(1, 2))  # [span, width, out]
            small = out.view(-1, out.shape[-1]).index_select(0, plan.cells)  # [n_small, out]
        big = []
        for slot, rows in plan.big:
            x_group = x[rows] if isinstance(rows, slice) else x.index_select(0, rows)
            hidden = x_group.to(a.dtype) @ a[slot].T  # [rows_g, r]
            if scale != 1.0:
                hidden.mul_(scale)
            big.append(hidden @ b[slot].T)  # [rows_g, out]
        return small, big

    def add_lora_embedding(
        self, y, x, lora_b_stacked, add_inputs: bool = True, **kwargs: Any
    ) -> None:
        """``y[t] += x[t] @ B[slot(t)].T`` (the embedding LoRA's expand) for adapter rows."""
        plan = self._token_plan
        if plan.empty or not self._live(lora_b_stacked):
            return
        small, big = grouped_lora_matmul(plan, x, lora_b_stacked)
        add_rows(plan, y, small, big, add_inputs=add_inputs)

    def add_lora_logits(
        self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None, **kwargs: Any
    ) -> None:
        """LoRA on the LM head, per request (``sampler_indices``), requests without an adapter untouched."""
        plan = self._sampler_plan
        if plan.empty or not (self._live(lora_a_stacked) and self._live(lora_b_stacked)):
            return
        y2, x2 = y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1])
        small, big = self._shrink_expand(plan, x2, lora_a_stacked, lora_b_stacked, scale)
        # vLLM pads the LoRA vocabulary; write only the columns both have.
        width = min(y2.shape[-1], _stacked(lora_b_stacked).shape[1])
        small = None if small is None else small[:, :width]
        big = [out[:, :width] for out in big]
        add_rows(plan, y2[:, :width], small, big)
