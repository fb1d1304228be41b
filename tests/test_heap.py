"""Worker heap settings (fusedrl.runtime.heap): freed tensor memory is reused, not
returned to the kernel and faulted in again."""

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
    # 40 steps x 16 MiB = 164k pages if every tensor took fresh pages; glibc's own
    # policy faulted 83k of them in again, kept memory 4k
    default, kept = faults("default"), faults("keep")
    assert default > 40_000, default
    assert kept < default / 10, (default, kept)


def test_bad_thresholds_name_the_field():
    with pytest.raises(ValueError, match="mmap_threshold"):
        keep_freed_memory(mmap_threshold=MMAP_THRESHOLD_MAX + 1)
    with pytest.raises(ValueError, match="trim_threshold"):
        keep_freed_memory(trim_threshold=0)
