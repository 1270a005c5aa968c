"""On CPU, memory a step frees is reused by the next step instead of being faulted in again.

The reference is the kernel's count of minor page faults (getrusage) while a tensor larger than
glibc's largest mmap threshold is written the second time, after a first one of the same size
was freed: with glibc's defaults every page of it faults in afresh (the block was mmap'd and
unmapped on free); with `keep_freed_host_memory` the freed block is reused and nothing faults.
Each case runs in a fresh interpreter, so malloc starts from its defaults."""

import ctypes
import subprocess
import sys

import pytest

from conftest import REPO

MIB = 64  # above glibc's 32 MiB ceiling of the dynamic mmap threshold
PAGES = MIB * 2**20 // 4096

PROBE = f"""
import resource, sys, torch
from pmss_dist.parallel.env import keep_freed_host_memory
if sys.argv[1] == "keep":
    assert keep_freed_host_memory()
n = {MIB} * 2**20 // 4
torch.empty(n).fill_(1.0)  # allocated, written and freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.empty(n).fill_(2.0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def second_write_faults(mode: str) -> int:
    proc = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.split()[-1])


def glibc() -> bool:
    try:
        ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return True


@pytest.mark.skipif(not glibc(), reason="glibc's malloc only")
def test_freed_memory_is_reused_not_faulted_in_again():
    assert second_write_faults("default") > PAGES * 0.9  # the reference: every page again
    assert second_write_faults("keep") < PAGES * 0.05
