"""tools/bench parses its options and plans its runs (no timings: it starts nothing);
``--rbd`` once, briefly, on the test cluster."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from iscsi_vmtarget.testing.ceph import CephCluster

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


def test_rbd_bench_runs_and_shows_the_merging(ceph_cluster: CephCluster, tmp_path: Path) -> None:
    """A short ``tools/bench --rbd`` on the test cluster: every row measured on both
    paths, and the gateway's share of commands merged into an adjacent librbd request
    (storage/rbd_aio.py) - most 64 KiB sequential ones, few 4 KiB random ones."""
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [sys.executable, str(BENCH), "--rbd", "--ceph-conf", ceph_cluster.conf, "--size", "16M",
         "--seconds", "1", "--reps", "1", "--failovers", "0", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {row["row"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"read 64K seq QD16", "write 64K seq QD16", "read 4K rand QD16"}
    for row in rows.values():
        assert row["librbd"] > 0 and row["gateway"] > 0, row
    merged = {name: row["cpu"][1]["merged"] for name, row in rows.items()}
    assert merged["read 64K seq QD16"] > 0.3 and merged["write 64K seq QD16"] > 0.3, merged
    assert merged["read 4K rand QD16"] < 0.2, merged
    assert "merged" in r.stdout
