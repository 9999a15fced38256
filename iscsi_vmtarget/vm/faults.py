"""Crash points for the kill -9 tests of crash-atomic updates.

``crashpoint("resize.moved")`` kills the process with SIGKILL when the environment
variable ``ISCSI_VMTARGET_CRASHPOINT`` names that point (SQLite's test builds use the
same idea). The tests run a real ``iscsi-vmtarget`` subprocess with it set, then check
that ``discover`` finds every unit consistent. Unset, a crash point is one dict lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "ISCSI_VMTARGET_CRASHPOINT"


def crashpoint(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def armed(name: str) -> bool:
    """Whether the crash point ``name`` is set (for faults that need a set-up first)."""
    return os.environ.get(ENV) == name
