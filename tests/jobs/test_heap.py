"""lnfm.jobs.heap: freed volume-sized arrays stay in the process (read back from the kernel's RSS)."""

import subprocess
import sys

import pytest

PROBE = """
import sys
import numpy as np
from lnfm.jobs.heap import keep_freed_memory

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

took = keep_freed_memory() if sys.argv[1] == "keep" else None
a = np.ones(200 * 2**20, np.uint8)  # 200 MiB, every page written
held = rss_mb()
del a
freed = rss_mb()
b = np.ones(200 * 2**20, np.uint8)
again = rss_mb()
print(took, held - freed, again - freed)
"""


def _run(mode: str) -> tuple[str, float, float]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    took, released, regrown = out.split()
    return took, float(released), float(regrown)


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="/proc and glibc's mallopt are Linux-only")
def test_freed_arrays_stay_in_the_heap_and_are_reused():
    took, released, regrown = _run("default")
    if took != "None":
        pytest.fail(f"default run changed the allocator: {took}")
    assert released > 150  # glibc's default: a 200 MiB array is unmapped when freed ...
    assert regrown > 150  # ... and the next one faults in fresh pages
    took, released, regrown = _run("keep")
    if took == "False":
        pytest.skip("not glibc")
    assert took == "True"
    assert released < 20  # kept in the heap
    assert regrown < 20  # and the next array reuses those pages
