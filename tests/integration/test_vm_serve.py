"""VM targets served by the real server and driven by real initiators.

Three VMs, one per concealment mode, are created with the VM layer in a state
directory; ``serve`` exports each as ``<base IQN>:vm.<name>``. libiscsi's tools must see
exactly the disk (READ CAPACITY), the unit's NAA designator (VPD 0x83), pass the
*BeyondEol, ReadCapacity and Inquiry families of iscsi-test-cu, and a whole-LUN read with
qemu-img must never contain the VM's state.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from iscsi_vmtarget.server.vm_luns import DEFAULT_BASE_IQN
from iscsi_vmtarget.vm import Mode, StateDir, VmManager
from tests.conftest import INITIATOR, RunningTarget, grant_vms, need_tool, run_tool, start_target

pytestmark = pytest.mark.interop

MIB = 1 << 20
STATE_PATTERN = b"VM-STATE-PATTERN-41c7" * 4096
VMS = {  # name: (mode, primary disk, secondary disks)
    "trunc": (Mode.TRUNCATE, 64 * MIB, (32 * MIB,)),
    "offs": (Mode.OFFSET, 48 * MIB, ()),
    "algn": (Mode.ALIGNED, 80 * MIB, ()),
}
FAMILIES = ["ReadCapacity10", "ReadCapacity16", "Inquiry"] + [
    f"{family}.BeyondEol"
    for family in (
        "Read6 Read10 Read12 Read16 Write10 Write12 Write16 WriteVerify10 WriteVerify12 "
        "WriteVerify16 Verify10 Verify12 Verify16 Prefetch10 Prefetch16 WriteSame10 "
        "WriteSame16 GetLBAStatus OrWrite WriteAtomic16"
    ).split()
]
_SUMMARY = re.compile(r"^\s*tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", re.MULTILINE)


@dataclass
class VmTargets:
    target: RunningTarget
    state: Path
    naa: dict[str, list[bytes]]  # VM name -> NAA per LUN
    serial: dict[str, str]  # VM name -> LUN 0 serial

    def url(self, name: str, lun: int = 0) -> str:
        return self.target.url(f"{DEFAULT_BASE_IQN}:vm.{name}", lun)


@pytest.fixture(scope="module")
def vm_targets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VmTargets]:
    work = tmp_path_factory.mktemp("vmserve")
    state = work / "state"
    naa, serial = {}, {}
    with VmManager(StateDir.at(str(state))) as manager:
        for name, (mode, disk, secondaries) in VMS.items():
            vm = manager.create(
                name, disk=disk, memory=16 * MIB, secondaries=secondaries, mode=mode
            )
            manager.write_state(name, io.BytesIO(STATE_PATTERN), len(STATE_PATTERN))
            naa[name] = [u.header.naa for u in vm.units]
            serial[name] = vm.base.header.unit_uuid.hex
    grant_vms(state)
    target = start_target(work, "--state-dir", str(state))
    try:
        yield VmTargets(target, state, naa, serial)
    finally:
        target.stop()


def run(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_tool(*args, timeout=timeout, check=check)


def test_every_vm_is_exported_with_its_disks(vm_targets: VmTargets) -> None:
    for name, (_mode, disk, secondaries) in VMS.items():
        luns = vm_targets.target.targets[f"{DEFAULT_BASE_IQN}:vm.{name}"]
        assert luns == {n: size for n, size in enumerate((disk, *secondaries))}
    assert f"{DEFAULT_BASE_IQN}:vm.demo" in vm_targets.target.targets  # the default serve


@pytest.mark.parametrize("name", list(VMS))
def test_readcapacity16_is_the_disk(vm_targets: VmTargets, name: str) -> None:
    _mode, disk, secondaries = VMS[name]
    for lun, size in enumerate((disk, *secondaries)):
        out = run("iscsi-readcapacity16", "-i", INITIATOR, vm_targets.url(name, lun)).stdout
        assert f"Total size:{size}\n" in out, out
        assert f"RETURNED LOGICAL BLOCK ADDRESS:{size // 512 - 1}\n" in out


@pytest.mark.parametrize("name", list(VMS))
def test_inquiry_reports_the_units_naa(vm_targets: VmTargets, name: str) -> None:
    """iscsi-inq prints the binary designator with %s: compare up to its first NUL byte
    (and read it as bytes, \r included); our own initiator checks all 16 bytes."""
    from iscsi_vmtarget.client.initiator import Initiator

    need_tool("iscsi-inq")
    for lun, naa in enumerate(vm_targets.naa[name]):
        url = vm_targets.url(name, lun)
        ident = subprocess.run(
            ["iscsi-inq", "-i", INITIATOR, "-e", "1", "-c", "131", url],
            capture_output=True,
            timeout=60,
            check=True,
        ).stdout
        found = re.search(rb"Designator Type:\(3\) NAA\nDesignator:\[(.*?)\]\n", ident, re.S)
        assert found, ident
        assert found.group(1) == naa.split(b"\0")[0]
        ini = Initiator(
            port=vm_targets.target.port,
            initiator_name=INITIATOR,
            target_name=f"{DEFAULT_BASE_IQN}:vm.{name}",
        )
        ini.login()
        try:
            ini.command(bytes(6), lun=lun)  # the power-on unit attention
            page = ini.command(bytes([0x12, 1, 0x83, 2, 0, 0]), lun=lun, read_length=512)
            assert page.status == 0
            # designator descriptor: code set 1, PIV 0, LU association, type 3 (NAA), length 16
            assert bytes([0x01, 0x03, 0x00, 0x10]) + naa in page.data
        finally:
            ini.logout()
            ini.close()
    serial = run("iscsi-inq", "-i", INITIATOR, "-e", "1", "-c", "128", vm_targets.url(name)).stdout
    assert f"Unit Serial Number:[{vm_targets.serial[name]}]" in serial


@pytest.mark.parametrize("name", list(VMS))
def test_conformance_families_on_guest_views(vm_targets: VmTargets, name: str) -> None:
    spec = ",".join(f"ALL.{family}" for family in FAMILIES)
    proc = run(
        "iscsi-test-cu",
        "--dataloss",
        "-n",
        "-t",
        spec,
        vm_targets.url(name),
        check=False,
        timeout=240,
    )
    out = proc.stdout + proc.stderr
    m = _SUMMARY.search(out)
    assert m, out[-4000:]
    _total, ran, passed, failed, _inactive = map(int, m.groups())
    failures = [line for line in out.splitlines() if "FAIL" in line]
    assert ran > 0 and failed == 0 and passed == ran, "\n".join(failures[:40]) + out[-2000:]


def test_whole_lun_read_never_shows_state(vm_targets: VmTargets, tmp_path: Path) -> None:
    for name, (_mode, disk, _s) in VMS.items():
        out = tmp_path / f"{name}.raw"
        run("qemu-img", "convert", "-O", "raw", vm_targets.url(name), str(out), timeout=240)
        data = out.read_bytes()
        assert len(data) == disk
        assert b"VM-STATE-PATTERN-41c7" not in data
    for path in vm_targets.state.rglob("*"):
        if path.is_file():
            assert b"VM-STATE-PATTERN-41c7" not in path.read_bytes(), path


def ivt(state: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``iscsi-vmtarget ARGS --state-dir STATE`` in a subprocess."""
    command = [sys.executable, "-m", "iscsi_vmtarget", *args, "--state-dir", str(state)]
    return run(*command, check=check)


def test_management_refuses_while_served(vm_targets: VmTargets) -> None:
    proc = ivt(vm_targets.state, "vm", "delete", "offs", check=False)
    assert proc.returncode == 1
    assert "exported by a running iscsi-vmtarget server" in proc.stderr
    shown = ivt(vm_targets.state, "vm", "show", "offs").stdout
    assert "served by a running server: yes" in shown


def test_delete_is_refused_while_a_session_is_logged_in(vm_targets: VmTargets) -> None:
    from iscsi_vmtarget.client.initiator import Initiator

    name = f"{DEFAULT_BASE_IQN}:vm.algn"
    ini = Initiator(port=vm_targets.target.port, initiator_name=INITIATOR, target_name=name)
    ini.login()
    try:
        proc = ivt(vm_targets.state, "vm", "delete", "algn", check=False)
        assert proc.returncode == 1
        assert f"has 1 session(s) logged in ({INITIATOR})" in proc.stderr
    finally:
        ini.logout()
        ini.close()


@pytest.mark.parametrize("name", ["offs", "algn"])
def test_live_resize_through_the_daemon(vm_targets: VmTargets, name: str) -> None:
    """``vm resize`` of a served VM goes to the daemon: the logged-in initiator gets
    CAPACITY DATA HAS CHANGED (2A/09), then READ CAPACITY shows the new disk, and what
    it wrote before is still there, at the same LBAs."""
    from iscsi_vmtarget.client.initiator import Initiator

    _mode, disk, _ = VMS[name]
    grown = disk + 32 * MIB
    ini = Initiator(
        port=vm_targets.target.port,
        initiator_name=INITIATOR,
        target_name=f"{DEFAULT_BASE_IQN}:vm.{name}",
    )
    ini.login()
    try:
        ini.command(bytes(6))
        last = disk // 512 - 1
        marks = {0: b"FIRST-BLOCK-" * 42 + b"x" * 8, last: b"LAST-BLOCK--" * 42 + b"y" * 8}
        for lba, block in marks.items():
            cdb = bytes([0x2A, 0x08]) + lba.to_bytes(4, "big") + b"\x00\x00\x01\x00"
            assert ini.command(cdb, data_out=block).status == 0
        out = ivt(vm_targets.state, "vm", "resize", name, "--disk", f"{grown // MIB}M").stdout
        assert "resized VM" in out and "live" in out
        tur = ini.command(bytes(6))
        assert (tur.status, tur.sense_key, tur.asc_ascq) == (2, 6, (0x2A, 0x09))
        cap = ini.command(
            bytes([0x9E, 0x10]) + bytes(8) + (32).to_bytes(4, "big") + bytes(2), read_length=32
        )
        assert int.from_bytes(cap.data[:8], "big") == grown // 512 - 1
        for lba, block in marks.items():
            rd = bytes([0x28, 0]) + lba.to_bytes(4, "big") + b"\x00\x00\x01\x00"
            assert ini.command(rd, read_length=512).data == block
        new_last = grown // 512 - 1
        rd = bytes([0x28, 0]) + new_last.to_bytes(4, "big") + b"\x00\x00\x01\x00"
        assert ini.command(rd, read_length=512).status == 0
        beyond = bytes([0x28, 0]) + (new_last + 1).to_bytes(4, "big") + b"\x00\x00\x01\x00"
        assert ini.command(beyond, read_length=512).asc_ascq == (0x21, 0x00)
    finally:
        ini.logout()
