"""``vm resize`` of a served VM that has snapshots, through the real server: the
daemon gives the disk a larger top layer live; the logged-in initiator gets CAPACITY
DATA HAS CHANGED, then READ CAPACITY reports the new size and the new space is
writable; ``vm revert`` to the snapshot taken before brings the old size back (another
CAPACITY DATA HAS CHANGED), with VPD 0x83/0x80 unchanged throughout."""

from __future__ import annotations

import struct
from pathlib import Path

from iscsi_vmtarget.client.initiator import Initiator
from iscsi_vmtarget.vm import StateDir, VmManager
from tests.conftest import grant_vms, start_target
from tests.integration.test_snapshot_serve import IQN, VM, _identity, _login, _read, _write, ivt

MIB = 1 << 20
OLD, NEW = 16 * MIB, 24 * MIB


def _capacity(ini: Initiator) -> int:
    """READ CAPACITY (16) (SBC-3 §5.16) of LUN 0, in bytes."""
    cdb = bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 32) + bytes(2)
    result = ini.command(cdb, read_length=32)
    assert result.status == 0
    last_lba, block = struct.unpack(">QI", result.data[:12])
    return (last_lba + 1) * block


def _capacity_changed(ini: Initiator) -> None:
    result = ini.command(bytes(6))  # TEST UNIT READY
    assert result.status == 2 and result.sense_key == 6
    assert result.asc_ascq == (0x2A, 0x09)  # CAPACITY DATA HAS CHANGED


def test_served_vm_with_snapshots_grows_and_reverts_live(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with VmManager(StateDir.at(str(state))) as manager:
        manager.create(VM, disk=OLD, memory=4 * MIB, secondaries=(8 * MIB,))
    grant_vms(state)
    target = start_target(tmp_path, "--state-dir", str(state))
    try:
        ini = _login(target.port, IQN)
        try:
            before = _identity(ini)
            one = b"ONE-" * 128
            _write(ini, 5, one)
            assert "daemon" in ivt(state, "vm", "snapshot", VM, "small")
            assert "live" in ivt(state, "vm", "resize", VM, "--disk", str(NEW))
            _capacity_changed(ini)
            assert _capacity(ini) == NEW
            last = NEW // 512 - 1
            _write(ini, last, b"END-" * 128)  # the new space, at once
            assert _read(ini, last) == b"END-" * 128 and _read(ini, 5) == one
            assert "daemon" in ivt(state, "vm", "revert", VM, "small")
            _capacity_changed(ini)
            assert _capacity(ini) == OLD and _read(ini, 5) == one
            assert _identity(ini) == before
        finally:
            ini.logout()
            ini.close()
    finally:
        target.stop()
