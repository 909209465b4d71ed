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
per LoRA layer, gathers the activations of the groups into one padded block and runs
two ``bmm`` calls for all of them, plus one plain matmul pair per group too large to
pad (a long prefill beside decodes). Tokens without an adapter get no delta. The
number of PyTorch calls per layer does not grow with the number of adapters.

Served, most steps are decodes: one or two tokens per adapter, so each ``bmm`` is a
batch of matrix-vector products whose cost is reading every slot's weights. Two
things made that slow: vLLM's slots are ``--max-lora-rank`` wide (16 by default)
whatever the adapters' rank, zero-padded; and PyTorch's bfloat16 ``bmm`` at these
shapes runs at a fraction of float32's speed. So blocks up to
:data:`COMPACT_MAX_WIDTH` cells per slot run on :class:`SliceWeights`' float32 copy
of each live slice, cut to the highest rank any slot uses (a rank-8 adapter in a
rank-16 slot reads half), rebuilt only when vLLM writes the stack; wider blocks
(prefills) run in the weights' dtype on the stacks themselves, where bfloat16 is
the faster. Results go back with one gather into batch order and a dense add:
``index_add_`` into a column slice of the output was slower than the matmuls.

Turned on by lorabay's vLLM plugin (serve/vllm_plugin.py), which names
:class:`GroupedPunicaWrapperCPU` to vLLM on the CPU platform and tested vLLM versions;
vLLM imports this module only then, in the worker. ``LORABAY_VLLM_PLUGIN=0`` turns the
plugin, and so this path, off.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any

import torch

# Groups with more tokens than this (a long prefill) get their own matmuls instead
# of being padded into the shared block, unless every group pads cheaply
# (BLOCK_SLACK): padding every slot to a 512-token prefill beside decodes would cost
# more than the matmuls it saves; 32 prefills of 64 tokens pad to nothing.
SMALL_GROUP_MAX_TOKENS = 16
# Every group goes into the block when its cells are at most 2 x rows + this.
BLOCK_SLACK = 64
# Blocks up to this many cells per slot (decode) use the float32 compact weights;
# wider ones (prefill) bfloat16 on the stacks, where its matmuls are the faster. A
# group outside the block alone: float32 up to COMPACT_MAX_GROUP rows (2x faster at
# 64 rows, 2.6x slower at 1,024 on this VM's AVX-512/AMX cores).
COMPACT_MAX_WIDTH = 16
COMPACT_MAX_GROUP = 128
# A large group whose rows are not contiguous (a prefill and decodes of one adapter)
# is added back as up to this many contiguous runs; index_add_ is the slow way.
MAX_RUNS = 8


@dataclass
class StepPlan:
    """Which rows of the batch use which adapter slot, computed once per step.

    ``rows``: ``[n_small]`` batch rows of the small groups, sorted by slot.
    ``gather``: ``[span * width]`` for each cell of the padded block (slot-major),
    the batch row it takes its activations from (row 0 for empty cells, whose
    results are dropped). ``cells``: ``[n_small]`` the cell holding each of ``rows``.
    ``row_cells``: ``[tokens]`` for every batch row, its cell, or ``span * width`` (a
    zero row after the block) when the block does not hold it: the block's results
    in batch order are one gather. ``big``: ``(slot, rows)`` per large group; ``rows``
    is a slice when contiguous. ``runs``: per large group whose rows are not, its
    contiguous runs as ``(batch rows, result rows)`` slices (None: too many).
    """

    first_slot: int = 0
    span: int = 0  # slots first_slot .. first_slot + span - 1 form the padded block
    width: int = 0  # cells per slot in the padded block (largest small group)
    rows: torch.Tensor | None = None
    gather: torch.Tensor | None = None
    cells: torch.Tensor | None = None
    big: tuple[tuple[int, torch.Tensor | slice], ...] = ()
    row_cells: torch.Tensor | None = None
    runs: tuple[tuple[tuple[slice, slice], ...] | None, ...] = ()

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

    span_all = present_list[-1] - present_list[0] + 1
    if span_all * max(counts_list) <= 2 * rows.numel() + BLOCK_SLACK:
        small = torch.ones_like(counts, dtype=torch.bool)  # every group pads cheaply
    else:
        small = counts <= SMALL_GROUP_MAX_TOKENS
    small_list = small.tolist()
    big: list[tuple[int, torch.Tensor | slice]] = []
    runs: list[tuple[tuple[slice, slice], ...] | None] = []
    start = 0
    for slot, count, in_block in zip(present_list, counts_list, small_list, strict=True):
        if not in_block:
            group = rows[start : start + count]
            first, last = int(group[0]), int(group[-1])
            contiguous = last - first + 1 == count
            big.append((slot, slice(first, last + 1) if contiguous else group))
            runs.append(None if contiguous else contiguous_runs(group.tolist()))
        start += count
    if not bool(small.any()):
        return StepPlan(big=tuple(big), runs=tuple(runs))

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
    row_cells = torch.full((indices.numel(),), span * width, dtype=torch.long)
    row_cells[rows[keep]] = cells
    return StepPlan(
        first_slot, span, width, rows[keep], gather, cells, tuple(big), row_cells, tuple(runs)
    )


def contiguous_runs(rows: list[int]) -> tuple[tuple[slice, slice], ...] | None:
    """Increasing batch rows as ``(batch rows, positions in rows)`` slices per contiguous
    run; None past MAX_RUNS."""
    found, begin = [], 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i] != rows[i - 1] + 1:
            if len(found) == MAX_RUNS:
                return None
            found.append((slice(rows[begin], rows[i - 1] + 1), slice(begin, i)))
            begin = i
    return tuple(found)


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
    runs = plan.runs or (None,) * len(plan.big)
    for (_, rows), out, pieces in zip(plan.big, big, runs, strict=True):
        out = out.to(y.dtype)
        if isinstance(rows, slice):
            pieces = ((rows, slice(None)),)
        if pieces is None:
            if add_inputs:
                y.index_add_(0, rows, out)
            else:
                y.index_copy_(0, rows, out)
            continue
        for target, source in pieces:  # contiguous runs: dense adds
            if add_inputs:
                y[target] += out[source]
            else:
                y[target] = out[source]


class SlotWrites:
    """Which slots vLLM wrote in each stacked LoRA weight, so that what is worked out from
    a stack (:class:`SliceWeights`, the zero check) is redone for those slots only.

    vLLM writes the stacks when it activates an adapter into a slot: every LoRA module's
    slot is set or zeroed (``LoRAModelManager.activate_adapter``), so every stack's
    ``_version`` moves. Working everything out again for all slots cost 0.23-0.36 s per
    activation on the real base (30 layers, 32 slots; about one decode step of 32
    requests on a 2-core CPU), and with more adapters in rotation than slots most steps
    activate one. :func:`track_slot_writes` logs each activation: per stack it changed,
    the version before and after and the slot. A reader asks which slots changed since
    the version it last saw; any write the log does not explain (the versions do not
    chain, or it is older than the log) answers None, and the reader starts over.
    """

    DEPTH = 64  # activations remembered per stack

    def __init__(self) -> None:
        self._log: dict[tuple[int, int], collections.deque] = {}

    def note(self, stack: torch.Tensor, before: int, slot: int) -> None:
        key = (id(stack), stack.data_ptr())
        entries = self._log.get(key)
        if entries is None:
            entries = self._log[key] = collections.deque(maxlen=self.DEPTH)
        entries.append((before, stack._version, slot))

    def since(self, stack: torch.Tensor, version: int) -> set[int] | None:
        """The slots written since ``stack`` was at ``version``; None: unknown."""
        current = stack._version
        slots: set[int] = set()
        if current == version:
            return slots
        for before, after, slot in reversed(self._log.get((id(stack), stack.data_ptr()), ())):
            if after != current:
                return None  # a write that is not in the log
            slots.add(slot)
            if before == version:
                return slots
            current = before
        return None


SLOT_WRITES = SlotWrites()


def track_slot_writes(model_manager) -> None:
    """Log every adapter activation's writes in :data:`SLOT_WRITES` (``model_manager`` is
    ``vllm.lora.model_manager``; lorabay's vLLM plugin calls this when vLLM imports it)."""
    manager = getattr(model_manager, "LoRAModelManager", None)
    stock = getattr(manager, "activate_adapter", None)
    if stock is None or getattr(stock, "_lorabay", False):
        return

    def activate_adapter(self, lora_id: int) -> bool:
        if lora_id in self._active_adapters:  # in a slot already: vLLM writes nothing
            return stock(self, lora_id)  # (it is asked for every request of every step)
        stacks = self.__dict__.get("_lorabay_stacks")
        if stacks is None:  # the modules and their stacks are made once, with the manager
            stacks = self._lorabay_stacks = list(_module_stacks(self.modules.values()))
        before = [stack._version for stack in stacks]
        activated = stock(self, lora_id)
        if activated:
            slot = self.lora_index_to_id.index(lora_id)
            for stack, version in zip(stacks, before, strict=True):
                if stack._version != version:
                    SLOT_WRITES.note(stack, version, slot)
        return activated

    activate_adapter._lorabay = True
    manager.activate_adapter = activate_adapter


def _module_stacks(modules):
    """Every stacked weight tensor of vLLM's LoRA modules (a tensor or a tuple per side)."""
    for module in modules:
        for side in ("lora_a_stacked", "lora_b_stacked"):
            stacks = getattr(module, side, None)
            if isinstance(stacks, torch.Tensor):
                yield stacks
            elif isinstance(stacks, (tuple, list)):
                yield from (s for s in stacks if isinstance(s, torch.Tensor))


def _slot_nonzero(weights: torch.Tensor) -> torch.Tensor:
    """``[slots]``: whether each slot of a stack holds anything."""
    return weights.reshape(weights.shape[0], -1).ne(0).any(dim=1)


def _all_zero(weights: torch.Tensor, cache: dict) -> bool:
    """True when every slot of this stacked weight is zero (e.g. the k slice of a
    q/v adapter). Kept per tensor and per slot; the slots vLLM writes are looked at
    again (:class:`SlotWrites`)."""
    key = (weights.data_ptr(), weights._version)
    hit = cache.get(id(weights))
    if hit is not None and hit[0] == key:
        return hit[2]
    slots = None
    if hit is not None and hit[0][0] == key[0]:
        slots = SLOT_WRITES.since(weights, hit[0][1])
    if slots is None:
        nonzero = _slot_nonzero(weights)
    else:
        nonzero = hit[1]
        index = torch.tensor(sorted(slots), dtype=torch.long)
        nonzero[index] = _slot_nonzero(weights[index])
    zero = not bool(nonzero.any())
    cache[id(weights)] = (key, nonzero, zero)
    return zero


@dataclass
class SliceWeights:
    """What one stacked LoRA slice (A ``[slots, 1, R, in]``, B ``[slots, 1, out, R]``)
    holds, kept up to date slot by slot as vLLM writes it (:class:`SlotWrites`): the
    highest rank each slot uses, and (made on first use) float32 copies cut to the
    highest of those, A as ``[slots, rank, in]`` and B transposed to ``[slots, rank,
    out]``, for the decode-sized blocks."""

    key: tuple  # the stacks' storage and write counters it is up to date with
    ranks: torch.Tensor  # [slots]: ranks 0 .. ranks[s]-1 of slot s are used (0: empty)
    rank: int  # the highest of ranks; 0: the slice is all zero
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None

    @property
    def live(self) -> bool:
        return self.rank > 0

    def compact(self, a_stack: torch.Tensor, b_stack: torch.Tensor):
        if self.a is None:
            a3, b3 = _stacked(a_stack), _stacked(b_stack)
            self.a = _float_copy(a3[:, : self.rank])  # copies: never the stacks themselves
            self.b = _float_copy(b3[:, :, : self.rank].transpose(1, 2))
        return self.a, self.b

    def rewrite(self, a_stack: torch.Tensor, b_stack: torch.Tensor, slots, key: tuple) -> None:
        """vLLM wrote ``slots`` of the stacks (now at ``key``): work those out again."""
        a3, b3 = _stacked(a_stack), _stacked(b_stack)
        index = torch.tensor(sorted(slots), dtype=torch.long)
        self.ranks[index] = _slot_ranks(a3[index], b3[index])
        self.rank = int(self.ranks.max())
        if self.a is not None:
            width = self.a.shape[1]
            if self.rank > width:  # a wider adapter came in: copy everything again
                self.a = self.b = None
            else:
                self.a[index] = a3[index, :width].float()
                self.b[index] = b3[index, :, :width].transpose(1, 2).float()
        self.key = key


def _float_copy(weights: torch.Tensor) -> torch.Tensor:
    return weights.to(torch.float32, copy=True, memory_format=torch.contiguous_format)


def _slot_ranks(a3: torch.Tensor, b3: torch.Tensor) -> torch.Tensor:
    """``[slots]``: one past the highest rank each slot uses (A ``[slots, R, in]``, B
    ``[slots, out, R]``)."""
    used = a3.ne(0).any(dim=2) | b3.ne(0).any(dim=1)  # [slots, R]
    positions = torch.arange(1, used.shape[1] + 1)
    return (used * positions).amax(dim=1)


def slice_weights(a: torch.Tensor, b: torch.Tensor, cache: dict) -> SliceWeights:
    """The :class:`SliceWeights` of stacks ``a``/``b``, kept in ``cache``: as they were,
    the slots vLLM wrote since worked out again, or (a write the log cannot explain) all
    of them."""
    key = (a.data_ptr(), a._version, b.data_ptr(), b._version)
    hit = cache.get(id(a))
    if hit is not None and hit.key == key:
        return hit
    if hit is not None and (hit.key[0], hit.key[2]) == (key[0], key[2]):
        slots_a = SLOT_WRITES.since(a, hit.key[1])
        slots_b = SLOT_WRITES.since(b, hit.key[3])
        if slots_a is not None and slots_b is not None:
            hit.rewrite(a, b, slots_a | slots_b, key)
            return hit
    ranks = _slot_ranks(_stacked(a), _stacked(b))
    hit = SliceWeights(key, ranks, int(ranks.max()) if ranks.numel() else 0)
    cache[id(a)] = hit
    return hit


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
        self._slice_cache: dict = {}

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
        blocks: dict = {}  # the gathered activations, made once for every slice
        offset = 0
        for a, b, size in zip(lora_a_stacked, lora_b_stacked, output_slices, strict=True):
            weights = slice_weights(a, b, self._slice_cache)
            target = y[:, offset : offset + size]
            offset += size
            if not weights.live:
                if not add_inputs:
                    target.zero_()
                continue
            block = self._block(plan, x, a, b, weights, scale, blocks) if plan.span else None
            big = self._big_groups(plan, x, a, b, weights, scale)
            if add_inputs:
                if block is not None:  # every row's result in batch order: one dense add
                    target.add_(block.index_select(0, plan.row_cells))  # cast as it adds
                add_rows(plan, target, None, big)
            else:
                small = None if block is None else block.index_select(0, plan.cells)
                add_rows(plan, target, small, big, add_inputs=False)

    @staticmethod
    def _block(plan: StepPlan, x, a, b, weights: SliceWeights, scale: float, blocks: dict):
        """The padded block's results, ``[span * width + 1, out]``: one row per cell, then
        a zero row (what ``row_cells`` gives rows outside the block)."""
        first, last = plan.first_slot, plan.first_slot + plan.span
        if plan.width <= COMPACT_MAX_WIDTH:
            a_compact, b_compact = weights.compact(a, b)
            a_block = a_compact[first:last].transpose(1, 2)  # [span, in, rank]
            b_block = b_compact[first:last]  # [span, rank, out]
        else:  # prefill-sized: the stacks themselves, in their dtype
            a_block = _stacked(a)[first:last].transpose(1, 2)  # [span, in, R]
            b_block = _stacked(b)[first:last].transpose(1, 2)  # [span, R, out]
        dtype = a_block.dtype
        x_block = blocks.get(dtype)
        if x_block is None:
            x_block = x.index_select(0, plan.gather).to(dtype)
            x_block = blocks[dtype] = x_block.view(plan.span, plan.width, x.shape[-1])
        hidden = torch.bmm(x_block, a_block)  # [span, width, rank]
        if scale != 1.0:
            hidden.mul_(scale)
        cells = plan.span * plan.width
        out = torch.empty((cells + 1, b_block.shape[-1]), dtype=dtype)
        torch.bmm(hidden, b_block, out=out[:cells].view(plan.span, plan.width, -1))
        out[cells].zero_()
        return out

    @staticmethod
    def _big_groups(plan: StepPlan, x, a, b, weights: SliceWeights, scale: float):
        """One matmul pair per group outside the block: ``[rows_g, out]`` each."""
        big = []
        for slot, rows in plan.big:
            x_group = x[rows] if isinstance(rows, slice) else x.index_select(0, rows)
            if x_group.shape[0] <= COMPACT_MAX_GROUP:
                a_compact, b_compact = weights.compact(a, b)
                a_slot, b_slot = a_compact[slot].T, b_compact[slot]  # [in, rank], [rank, out]
            else:
                a_slot, b_slot = _stacked(a)[slot].T, _stacked(b)[slot].T  # [in, R], [R, out]
            hidden = x_group.to(a_slot.dtype) @ a_slot
            if scale != 1.0:
                hidden.mul_(scale)
            big.append(hidden @ b_slot)
        return big

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
