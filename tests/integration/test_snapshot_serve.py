"""Snapshots of a served VM, through the real server: ``vm snapshot``/``vm revert``
go to the daemon, which quiesces the VM's LUNs; a logged-in initiator then reads the
reverted bytes and sees the SAME VPD 0x83 designator and VPD 0x80 serial as before
(the guest never notices it runs on a snapshot, seed); an exported snapshot is a
read-only LUN with its own identity; a LUN map showing one designator twice is
refused."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from iscsi_vmtarget.client.initiator import Initiator
from iscsi_vmtarget.scsi import LogicalUnit, UnitIdentity
from iscsi_vmtarget.server.masking import Acl, AclError, MappedLun
from iscsi_vmtarget.server.registry import Registry, Target
from iscsi_vmtarget.server.vm_luns import DEFAULT_BASE_IQN
from iscsi_vmtarget.storage import MemoryBackend
from iscsi_vmtarget.vm import StateDir, VmManager
from tests.conftest import INITIATOR, grant_vms, need_tool, start_target

MIB = 1 << 20
VM = "snapvm"
IQN = f"{DEFAULT_BASE_IQN}:vm.{VM}"


def ivt(state: Path, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "iscsi_vmtarget", *args, "--state-dir", str(state)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _write(ini: Initiator, lba: int, block: bytes, lun: int = 0) -> None:
    cdb = bytes([0x2A, 0]) + lba.to_bytes(4, "big") + b"\x00\x00\x01\x00"
    assert ini.command(cdb, lun=lun, data_out=block).status == 0


def _read(ini: Initiator, lba: int, lun: int = 0) -> bytes:
    cdb = bytes([0x28, 0]) + lba.to_bytes(4, "big") + b"\x00\x00\x01\x00"
    result = ini.command(cdb, lun=lun, read_length=512)
    assert result.status == 0
    return bytes(result.data)


def _identity(ini: Initiator, lun: int = 0) -> tuple[bytes, bytes]:
    """(NAA designator from VPD 0x83, serial from VPD 0x80)."""
    page83 = ini.command(bytes([0x12, 1, 0x83, 2, 0, 0]), lun=lun, read_length=512)
    found = re.search(rb"\x01\x03\x00\x10(.{16})", bytes(page83.data), re.S)
    assert found, page83.data
    page80 = bytes(ini.command(bytes([0x12, 1, 0x80, 0, 255, 0]), lun=lun, read_length=255).data)
    return found.group(1), page80[4 : 4 + page80[3]]


def _iscsi_inq(url: str) -> tuple[bytes, bytes]:
    """(designator up to its first NUL, serial) as libiscsi's iscsi-inq prints them
    (it prints the binary designator with %s); fails the test without iscsi-inq."""
    need_tool("iscsi-inq")
    page83 = subprocess.run(
        ["iscsi-inq", "-i", INITIATOR, "-e", "1", "-c", "131", url],
        capture_output=True,
        timeout=60,
        check=True,
    ).stdout
    found = re.search(rb"Designator Type:\(3\) NAA\nDesignator:\[(.*?)\]\n", page83, re.S)
    assert found, page83
    page80 = subprocess.run(
        ["iscsi-inq", "-i", INITIATOR, "-e", "1", "-c", "128", url],
        capture_output=True,
        timeout=60,
        check=True,
    ).stdout
    serial = re.search(rb"Unit Serial Number:\[(.*?)\]", page80)
    assert serial, page80
    return found.group(1), serial.group(1)


def _login(port: int, target: str) -> Initiator:
    ini = Initiator(port=port, initiator_name=INITIATOR, target_name=target)
    ini.login()
    for lun in (0, 1):
        ini.command(bytes(6), lun=lun)  # the power-on unit attention
    return ini


def test_snapshot_and_revert_of_a_served_vm(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with VmManager(StateDir.at(str(state))) as manager:
        manager.create(VM, disk=16 * MIB, memory=4 * MIB, secondaries=(8 * MIB,))
    grant_vms(state)
    target = start_target(tmp_path, "--state-dir", str(state))
    try:
        urls = [f"iscsi://127.0.0.1:{target.port}/{IQN}/{lun}" for lun in (0, 1)]
        inq_before = [_iscsi_inq(url) for url in urls]
        ini = _login(target.port, IQN)
        try:
            before = [_identity(ini, 0), _identity(ini, 1)]
            one, two = b"ONE-" * 128, b"TWO-" * 128
            _write(ini, 5, one)
            _write(ini, 3, one, lun=1)
            assert "daemon" in ivt(state, "vm", "snapshot", VM, "s1")
            _write(ini, 5, two)  # through the new top layer, while served
            _write(ini, 3, two, lun=1)
            assert _read(ini, 5) == two
            assert "daemon" in ivt(state, "vm", "snapshot", VM, "s2")
            assert "daemon" in ivt(state, "vm", "revert", VM, "s1")
            assert _read(ini, 5) == one and _read(ini, 3, lun=1) == one  # both disks bound
            assert [_identity(ini, 0), _identity(ini, 1)] == before  # VPD 0x83 and 0x80
            assert [_iscsi_inq(url) for url in urls] == inq_before  # and as iscsi-inq sees
            listing = ivt(state, "vm", "snapshot", "list", VM)
            assert "s1" in listing and "s2" in listing
            assert "daemon" in ivt(state, "vm", "snapshot", "delete", VM, "s2")
            assert _read(ini, 5) == one
        finally:
            ini.logout()
            ini.close()
        ivt(state, "vm", "snapshot", "export", VM, "s1")
    finally:
        target.stop()
    grant_vms(state)
    target = start_target(tmp_path / "again", "--state-dir", str(state))
    try:
        snap_iqn = f"{IQN}.snap.s1"
        assert snap_iqn in target.targets
        ini = _login(target.port, snap_iqn)
        try:
            assert _read(ini, 5) == one
            own = _identity(ini)
            assert own[0] != before[0][0] and own[1] != before[0][1]  # its own identity
            cdb = bytes([0x2A, 0]) + (5).to_bytes(4, "big") + b"\x00\x00\x01\x00"
            assert ini.command(cdb, data_out=two).sense_key == 7  # DATA PROTECT
        finally:
            ini.logout()
            ini.close()
        live = _login(target.port, IQN)
        try:
            assert _read(live, 5) == one  # the merge of s2 ran offline at restart
            assert [_identity(live, 0), _identity(live, 1)] == before
        finally:
            live.logout()
            live.close()
    finally:
        target.stop()


def test_duplicate_designators_are_refused() -> None:
    from iscsi_vmtarget.iscsi.directory import TargetEntry
    from iscsi_vmtarget.scsi import ScsiTarget

    ident = UnitIdentity.from_uuid(__import__("uuid").uuid4())
    a = LogicalUnit(MemoryBackend(MIB), ident)
    b = LogicalUnit(MemoryBackend(MIB), ident)  # e.g. a snapshot shown with the original's
    registry = Registry()
    with pytest.raises(AclError, match="same designator"):
        registry.add_target(Target(TargetEntry(name="iqn.2026-11.t:dup"), ScsiTarget({0: a, 1: b})))
    target = Target(TargetEntry(name="iqn.2026-11.t:one"), ScsiTarget({0: a}))
    registry.add_target(target)
    twice = Acl(INITIATOR, luns=(MappedLun(0, 0), MappedLun(1, 0)))
    with pytest.raises(AclError, match="LUN 0 and LUN 1 with the same designator"):
        target.set_acls({twice.key: twice}, False)
    assert not target.acls  # nothing changed
