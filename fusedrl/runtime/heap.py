"""Host heap settings: keep freed tensor memory for the next tensor (Ray workers), or
give it back between phases (the single-device runtime).

PyTorch's CPU allocator takes every tensor from the C library's ``malloc``. glibc gives
blocks above its mmap threshold (128 KiB at start, raised as large blocks are freed)
their own ``mmap`` and returns them to the kernel on ``free``, and gives the top of the
heap back once more than its trim threshold is free there. Either way the next tensor
of that size is built from fresh pages, each zeroed by the kernel on its first touch (a
minor page fault): memory traffic and kernel time inside every task. A training step's
activations come and go in blocks of a few MiB, and the fused actor/critic schedule
(RLHFuse §5), which holds both models' activations and frees them in an interleaved
order, trims and regrows the heap over and over: bench/fused_train.py (``--micro 16``,
quiet machine) measured 17.8-18.9k minor faults per worker and fused training call of
the ``small`` preset (~70 MiB of zeroed pages, 0.08 s of system time) against 0.6-1k
for sequential 1F1B; with this, 150-430 faults and 0.015-0.02 s.

:func:`keep_freed_memory` raises both thresholds (``mallopt``), so blocks up to
``mmap_threshold`` come from the heap and up to ``trim_threshold`` bytes stay there
once freed: after the first step the same pages serve every step. The process's peak
resident memory is unchanged (the pages were in use at the peak); what changes is that
up to ``trim_threshold`` of freed memory is kept instead of returned. A no-op
(``False``) where the C library is not glibc.

:func:`release_host_memory` is the opposite trade, for a process whose peak memory is
the goal (the single-device runtime, :mod:`fusedrl.local`): between phases it gives
every free page of the heap back (``malloc_trim``), so one phase's freed buffers do not
stay resident under the next one's (0.54 GB after building SmolLM2's models).

Lifecycle: :func:`keep_freed_memory` once per process, before the first tensors
(:class:`fusedrl.runtime.worker.Worker`); :func:`release_host_memory` between phases.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
"""glibc ``mallopt`` parameters (malloc.h)."""

MMAP_THRESHOLD_MAX = 32 << 20
"""glibc's largest accepted mmap threshold on 64-bit hosts (``HEAP_MAX_SIZE / 2``)."""


def keep_freed_memory(mmap_threshold: int = MMAP_THRESHOLD_MAX,
                      trim_threshold: int = 1 << 30) -> bool:
    """Serve blocks up to ``mmap_threshold`` bytes from the heap and keep up to
    ``trim_threshold`` freed bytes there (module docstring); True where set."""
    if not 0 < mmap_threshold <= MMAP_THRESHOLD_MAX:
        raise ValueError(f"mmap_threshold must be in (0, {MMAP_THRESHOLD_MAX}], got {mmap_threshold}")
    if trim_threshold <= 0:
        raise ValueError(f"trim_threshold must be > 0, got {trim_threshold}")
    libc = _glibc()
    if libc is None:  # not glibc (macOS, musl): its own policy stays
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; the trim threshold is an int, so cap it there
    trim = min(trim_threshold, 2 ** 31 - 1)
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim))


def release_host_memory() -> bool:
    """Give the heap's free pages back to the kernel (glibc ``malloc_trim(0)``); True
    where the C library is glibc (module docstring)."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)  # returns whether memory was released: either is success
    return True


@functools.cache
def _glibc():
    """The C library when it is glibc, else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version, libc.mallopt, libc.malloc_trim  # noqa: B018 - glibc only
    except (OSError, AttributeError):
        return None
    return libc
