"""tools/profile-target samples the real target under iscsi-perf with py-spy and sums
the samples by function: our data path must show up in what it prints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from iscsi_vmtarget.testing.ceph import CephCluster

TOOL = Path(__file__).resolve().parent.parent / "tools" / "profile-target"


def test_a_short_read_profile_names_the_data_path(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, str(TOOL), "--ops", "read", "--qd", "4", "--seconds", "2",
         "--mib", "8", "--flame", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("read 4 KiB QD4, 2 s:")
    assert "samples on CPU" in r.stdout
    assert "fast_io (fast_lane.py)" in r.stdout  # our READ path (the fast lane) was sampled
    assert "uv_run" not in r.stdout.split("our functions by inclusive share:")[1]
    stacks = (tmp_path / "read-qd4.txt").read_text().splitlines()
    assert stacks and all(line.rsplit(" ", 1)[1].isdigit() for line in stacks)


def test_an_rbd_gateway_profile_shows_librbd_finished_on_the_event_loop(
    ceph_cluster: CephCluster,
) -> None:
    """``--rbd``: the gateway's 64 KiB reads start through librbd's C API and finish on
    the event loop (storage/rbd_aio.py), not through python3-rbd's callbacks."""
    r = subprocess.run(
        [sys.executable, str(TOOL), "--rbd", "--ceph-conf", ceph_cluster.conf, "--kib", "64",
         "--sequential", "--ops", "read", "--qd", "8", "--seconds", "3", "--mib", "16",
         "--top", "80"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("read 64 KiB QD8, 3 s:")
    assert "ImageEvents.start_read (rbd_aio.py)" in r.stdout
    assert "ImageEvents.reap (rbd_aio.py)" in r.stdout
