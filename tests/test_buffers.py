"""iscsi_vmtarget/buffers.py: unzeroed buffers, and freed buffers kept for reuse."""

from __future__ import annotations

import subprocess
import sys

import pytest

from iscsi_vmtarget.buffers import uninitialized

FAULTS = """
import resource, sys
from iscsi_vmtarget.buffers import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()

def rounds(n):  # 32 commands' 64 KiB buffers in flight, then all freed
    for _ in range(n):
        held = [bytearray(64 << 10) for _ in range(32)]
        del held

rounds(5)  # settle
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds(200)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True,
                         text=True, timeout=60, check=True)  # fmt: skip
    return int(out.stdout)


def test_freed_command_buffers_are_reused_not_faulted_in_again() -> None:
    """By default glibc gives the heap's top back to the kernel once a burst of
    buffers is freed, and the next burst faults every page in again (15 per 64 KiB
    buffer, measured). Kept, the buffers' memory is reused."""
    assert faults("default") > 20_000  # what the setting is for (glibc's behaviour)
    assert faults("keep") < 1_000


def test_uninitialized_has_the_length_asked_for() -> None:
    assert len(uninitialized(65536)) == 65536 and len(uninitialized(0)) == 0
    with pytest.raises(ValueError, match="negative"):
        uninitialized(-1)
