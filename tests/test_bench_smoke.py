"""tools/bench parses its options and plans its runs (no timings: it starts nothing)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "tools" / "bench"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=30
    )


def test_help() -> None:
    r = run("--help")
    assert r.returncode == 0, r.stderr
    for option in ("--quick", "--reps", "--json", "--memory", "--dry-run"):
        assert option in r.stdout


def test_quick_dry_run_plans_every_test_against_both_targets() -> None:
    r = run("--quick", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "reps 1" in r.stdout
    plan = [line for line in r.stdout.splitlines() if line.startswith("rep ")]
    assert len(plan) == 10
    assert all("tgtd -> ours -> ours+hd" in line for line in plan)
    assert sum("iscsi-perf" in line for line in plan) == 4
    assert sum("qemu-img bench -w" in line for line in plan) == 4
    reads = [line for line in plan if "qemu-img bench -t" in line]  # QEMU's 4 KiB reads
    assert len(reads) == 2 and all("-s 4096" in line for line in reads)


def test_reps_alternate_the_order() -> None:
    r = run("--reps", "2", "--tests", "read-4k-rand-qd32", "--no-digests", "--dry-run")
    assert r.returncode == 0, r.stderr
    plan = [line for line in r.stdout.splitlines() if line.startswith("rep ")]
    assert "tgtd -> ours" in plan[0] and "ours -> tgtd" in plan[1]


def test_unknown_test_is_a_usage_error() -> None:
    r = run("--tests", "nope", "--dry-run")
    assert r.returncode == 2
    assert "unknown tests" in r.stderr


def test_chain_column_is_planned_unless_no_chain() -> None:
    r = run("--quick", "--tests", "read-4k-rand-qd1", "--dry-run")
    assert r.returncode == 0, r.stderr
    plan = [line for line in r.stdout.splitlines() if line.startswith("rep ")]
    assert "ours+vm -> ours+chain" in plan[0]
    assert "vm revert bench s9" in r.stdout
    r = run("--quick", "--tests", "read-4k-rand-qd1", "--no-chain", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "ours+chain" not in r.stdout


def test_rbd_help() -> None:
    """``--rbd`` hands over to tools/bench_rbd.py (one gateway on Ceph vs librbd)."""
    r = run("--rbd", "--help")
    assert r.returncode == 0, r.stderr
    for option in ("--ceph-conf", "--size", "--failovers", "--json"):
        assert option in r.stdout
