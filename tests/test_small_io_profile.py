"""tools/small-io-profile drives the real connection handler and checks what it sent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parent.parent / "tools" / "small-io-profile"


def test_small_runs_of_reads_and_writes_report_cpu_and_calls_per_command() -> None:
    r = subprocess.run(
        [sys.executable, str(TOOL), "--commands", "64", "--reps", "1", "--mib", "2",
         "--qd", "1,8", "--lun", "plain,chain"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [line.split()[:3] for line in lines] == [
        [lun, op, qd] for lun in ("plain", "chain") for op in ("read", "write")
        for qd in ("QD1", "QD8")
    ]  # fmt: skip
    assert all("CPU/command" in line and "Python calls/command" in line for line in lines)
