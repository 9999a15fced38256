"""Helpers for the interop tests: the guest from tools/guest and tool output checks."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools" / "guest"))

import guest as guest_tools  # noqa: E402

GUEST_INITIATOR = "iqn.2026-11.org.iscsi-vmtarget.test:guest"


def need(*tools: str) -> None:
    for name in tools:
        if shutil.which(name) is None:
            pytest.fail(f"{name} is not installed (tools/install-deps --test installs it)")


def build_guest() -> Path:
    """The guest (kernel + initramfs), built once and cached between runs."""
    need("qemu-system-x86_64", "apt-get", "dpkg-deb", "ldd")
    try:
        return guest_tools.build()
    except (subprocess.CalledProcessError, RuntimeError) as e:
        detail = getattr(e, "stderr", "") or ""
        pytest.fail(f"building the guest failed: {e}\n{detail}")


def step_output(run: guest_tools.GuestRun, name: str, rc: int | None = 0) -> str:
    """The output of a guest step; fail with the console when it is missing or its
    exit status is not RC (None: any)."""
    s = run.steps.get(name)
    if s is None:
        pytest.fail(f"guest step {name!r} did not run\n--- guest console ---\n{run.console}")
    if rc is not None and s.rc != rc:
        pytest.fail(
            f"guest step {name!r} exited {s.rc}, expected {rc}:\n{s.output}\n"
            f"--- guest console ---\n{run.console}"
        )
    return s.output


def host_naa_matches(iscsi_inq_stdout: bytes, naa: bytes) -> bool:
    """Does iscsi-inq's VPD 0x83 output show the NAA designator NAA?

    libiscsi 1.19 prints binary designators raw with ``%s``: the bytes stop at the first
    NUL, so compare that prefix (and that the rest really starts with a NUL)."""
    marker = b"Designator Type:(3) NAA\nDesignator:["
    at = iscsi_inq_stdout.index(marker) + len(marker)
    shown = naa.split(b"\0", 1)[0]
    return iscsi_inq_stdout[at : at + len(shown) + 2] == shown + b"]\n"
