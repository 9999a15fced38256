"""tools/loop-bench runs end to end against real clients (no timings are checked)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parent.parent / "tools" / "loop-bench"


def test_reads_and_writes_are_served_and_the_loop_cost_is_reported() -> None:
    r = subprocess.run(
        [sys.executable, str(TOOL), "--seconds", "1", "--kib", "64"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    rows = re.findall(r"^(read|write)\s+64 KiB QD16:\s+(\d+) commands/s, loop CPU\s+([\d.]+) us",
                      r.stdout, re.M)  # fmt: skip
    assert [op for op, _, _ in rows] == ["read", "write"], r.stdout
    assert all(int(rate) > 0 and float(us) > 0 for _, rate, us in rows), r.stdout
