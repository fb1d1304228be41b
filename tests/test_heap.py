"""Host heap settings (fusedrl.runtime.heap): in workers freed tensor memory is reused,
not returned to the kernel and faulted in again; between the single-device runtime's
phases it is given back."""

import subprocess
import sys

import pytest

from fusedrl.runtime.heap import MMAP_THRESHOLD_MAX, keep_freed_memory

# 40 steps of a few MiB-sized tensors allocated, written and freed; prints minor faults
CHURN = """
import resource, sys, torch
from fusedrl.runtime.heap import keep_freed_memory
torch.set_num_threads(1)  # as a worker: one thread, one malloc arena
if sys.argv[1] == "keep":
    assert keep_freed_memory()
else:  # glibc's start thresholds, pinned: its own raising of them depends on history
    import ctypes
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    assert mallopt(-3, 128 << 10) and mallopt(-1, 128 << 10)
def step():
    a = [torch.ones(1 << 20) for _ in range(4)]   # 4 MiB each, above glibc's start threshold
    del a
step()
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_freed_tensors_do_not_fault_again():
    # 40 steps x 16 MiB = 164k pages if every tensor took fresh pages: so at glibc's
    # start thresholds; in a worker glibc's own raising of them left 17-19k faults per
    # fused training call (bench/fused_train.py), kept memory ~200
    start, kept = faults("start"), faults("keep")
    assert start > 100_000, start
    assert kept < start / 10, (start, kept)


def test_bad_thresholds_name_the_field():
    with pytest.raises(ValueError, match="mmap_threshold"):
        keep_freed_memory(mmap_threshold=MMAP_THRESHOLD_MAX + 1)
    with pytest.raises(ValueError, match="trim_threshold"):
        keep_freed_memory(trim_threshold=0)


# 200 blocks of 1 MiB from the heap (below the raised mmap threshold), every other one
# freed: the holes cannot shrink the heap's top, only malloc_trim gives them back
TRIM = """
import os, torch
from fusedrl.runtime.heap import keep_freed_memory, release_host_memory
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
assert keep_freed_memory()
blocks = [torch.ones(1 << 18) for _ in range(200)]
del blocks[::2]
before = rss()
assert release_host_memory()
print(before - rss())
"""


def test_release_host_memory_gives_freed_heap_pages_back():
    if not _is_glibc():
        pytest.skip("not glibc")
    out = subprocess.run([sys.executable, "-c", TRIM], capture_output=True, text=True,
                         check=True).stdout
    assert int(out) > 50 << 20, out  # ~100 MiB of holes returned


def _is_glibc() -> bool:
    from fusedrl.runtime.heap import _glibc

    return _glibc() is not None
