"""Helpers for the interop tests: the guest from tools/guest and tool output checks."""

from __future__ import annotations

import fcntl
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools" / "guest"))

import guest as guest_tools  # noqa: E402

from tests.conftest import RunningTarget  # noqa: E402

GUEST_INITIATOR = "iqn.2026-11.org.iscsi-vmtarget.test:guest"


def need(*tools: str) -> None:
    for name in tools:
        if shutil.which(name) is None:
            pytest.fail(f"{name} is not installed (tools/install-deps --test installs it)")


def build_guest(multipath: bool = False) -> Path:
    """The guest (kernel + initramfs), built once and cached between runs; MULTIPATH:
    the one with multipath-tools, dm-multipath and scsi_dh_alua (tools/guest)."""
    need("qemu-system-x86_64", "apt-get", "dpkg-deb", "ldd")
    guest_tools.cache_root().mkdir(parents=True, exist_ok=True)
    # one build at a time: pytest-xdist workers share the cache (and a build prunes
    # the older ones)
    with open(guest_tools.cache_root() / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return guest_tools.build(multipath=multipath)
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


def qemu_scsi_drives(
    target: RunningTarget, iqn: str, devices: dict[int, str], initiator: str
) -> list[str]:
    """qemu arguments giving the guest LUN n of IQN through QEMU's libiscsi driver as
    DEVICES[n] (``scsi-block`` or ``scsi-hd``) at scsi-id n of one virtio-scsi HBA."""
    args = ["-iscsi", f"initiator-name={initiator}", "-device", "virtio-scsi-pci,id=s0"]
    for lun, device in devices.items():
        args += [
            "-drive",
            f"file={target.url(iqn, lun)},format=raw,if=none,id=d{lun},cache=none",
            "-device",
            f"{device},drive=d{lun},bus=s0.0,channel=0,scsi-id={lun},lun=0",
        ]
    return args


def scsi_disks_script(count: int) -> str:
    """Guest shell: wait for COUNT SCSI disks, list them as "H:C:T:L sdX" lines in
    /tmp/disks (step ``disks``) and define ``disk_of T``: /dev/sdX of scsi-id T."""
    return textwrap.dedent(f"""
        n=0
        while [ $n -lt 150 ] && [ $(ls -d /sys/block/sd* 2>/dev/null | wc -l) -lt {count} ]; do
          sleep 0.2; n=$((n+1))
        done
        for b in /sys/block/sd*; do
          echo "$(basename $(readlink -f $b/device)) ${{b##*/}}"
        done > /tmp/disks
        step disks cat /tmp/disks
        disk_of() {{
          while read hctl sd; do
            [ "$(echo $hctl | cut -d: -f3)" = "$1" ] && echo /dev/$sd
          done < /tmp/disks
        }}
    """)
