"""Freed CPU memory kept for reuse, so that large tensors stop page-faulting at every step.

PyTorch allocates CPU tensors with the C library's ``malloc``. glibc serves a request above its
mmap threshold (128 KiB at first, raised as blocks are freed, but never above 32 MiB) with a
fresh ``mmap`` and returns it with ``munmap`` when it is freed. A tensor above 32 MiB is thus new
memory at every step: the kernel maps each of its 4 KiB pages on first touch. On the 2-core
machine of ``docs/benchmarks.md`` that costs about as much as the arithmetic of a cheap
elementwise pass (``torch.empty(64, 8, 201, 201).fill_(0)``, 83 MB: 30-49 ms from mmap, 10 ms
from reused memory). Attention over 201 steps with 8 heads at batch 64 allocates several such
``(B, H, T, T)`` tensors per layer, forward and backward.

:func:`keep_freed_cpu_memory` sets glibc's ``M_MMAP_MAX`` to 0 (every block comes from the heap)
and ``M_TRIM_THRESHOLD`` to 2 GiB (the heap's free top is given back to the system only above that), so a
freed block is reused by the next allocation of its size. The values computed are unchanged (only
addresses change; PyTorch aligns every CPU tensor to 64 bytes either way). The cost: the process
keeps the peak of its heap until it exits, which for a training process is what its peak step
needs anyway. It is process-wide and idempotent; elsewhere than glibc (macOS, musl) it does
nothing. ``CMI_KEEP_FREED_MEMORY=0`` (or false / no / off) in the environment switches it off;
a value that is no yes/no word is an error (``codes.common.env_flags``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

from codes.common.env_flags import env_flag

__all__ = ["keep_freed_cpu_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 2**31 - 1  # the largest value mallopt takes (an int)
_state: dict[str, bool] = {}


def keep_freed_cpu_memory() -> bool:
    """Tell glibc's malloc to keep and reuse freed memory (see the module docstring).

    Returns whether the setting is in effect (False off Linux/glibc or when switched off).
    """
    if "applied" in _state:
        return _state["applied"]
    applied = False
    if sys.platform.startswith("linux") and env_flag("CMI_KEEP_FREED_MEMORY", True):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt"):
                libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                libc.mallopt.restype = ctypes.c_int
                applied = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(
                    libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
                )
        except OSError:
            applied = False
    _state["applied"] = applied
    return applied
