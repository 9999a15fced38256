"""64 concurrent sessions for a bounded time (ISCSI_LOAD_SECONDS, 15 in CI; tools/load-test
runs 60): zero errors, every session makes progress, the target's RSS stays bounded."""

from __future__ import annotations

import os

from iscsi_vmtarget.testing.load import run_load
from iscsi_vmtarget.testing.process import alive
from tests.conftest import INITIATOR, RunningTarget

DEMO = "iqn.2026-11.org.iscsi-vmtarget:demo"


def test_64_sessions_all_progress_without_errors(demo_target: RunningTarget) -> None:
    seconds = float(os.environ.get("ISCSI_LOAD_SECONDS", "15"))
    result = run_load(
        demo_target.port, DEMO, INITIATOR, sessions=64, seconds=seconds, pid=demo_target.proc.pid
    )
    assert result.errors == []
    assert min(result.ops) >= 5, result.ops  # every session made progress
    assert result.peak_rss < 300 << 20, result.peak_rss
    assert alive(demo_target.proc.pid)
    assert "Traceback" not in demo_target.log()
