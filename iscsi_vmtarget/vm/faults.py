"""Crash points (and pause points) for the kill -9 tests of crash-atomic updates.

``crashpoint("resize.moved")`` kills the process with SIGKILL when the environment
variable ``ISCSI_VMTARGET_CRASHPOINT`` names that point (SQLite's test builds use the
same idea). The tests run a real ``iscsi-vmtarget`` subprocess with it set, then check
that ``discover`` finds every unit consistent. Unset, a crash point is one dict lookup.
"""

from __future__ import annotations

import os
import signal
import time

ENV = "ISCSI_VMTARGET_CRASHPOINT"


def crashpoint(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def armed(name: str) -> bool:
    """Whether the crash point ``name`` is set (for faults that need a set-up first)."""
    return os.environ.get(ENV) == name


#: ``POINT:DIR``: :func:`pause` at POINT creates ``DIR/POINT.reached``, then waits for
#: ``DIR/POINT.go`` - a test's rendezvous with an operation in a server process (for
#: example "the live move is copying: write now"), with no timing involved.
PAUSE_ENV = "ISCSI_VMTARGET_PAUSEPOINT"


def pause(name: str, limit: float = 300.0) -> None:
    setting = os.environ.get(PAUSE_ENV)
    if not setting or setting.partition(":")[0] != name:
        return
    directory = setting.partition(":")[2]
    go = os.path.join(directory, f"{name}.go")
    if os.path.exists(go):
        return
    with open(os.path.join(directory, f"{name}.reached"), "w"):
        pass
    deadline = time.monotonic() + limit  # never hang a forgotten test for ever
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.01)
