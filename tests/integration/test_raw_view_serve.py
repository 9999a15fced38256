"""A backup through the raw view of a served VM with snapshots (issue 13's "Done
when"): a management initiator granted ``--view raw`` reads the whole raw LU while a
guest wrote after each of 3 live snapshots; the backup is the unit flattened through
the live chain - its own header's guest view equals what the guest reads, byte for
byte - and holds the state as ciphertext only. The raw view of an exported snapshot is
that snapshot's image, under a designator of its own."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

from iscsi_vmtarget.client.initiator import Initiator
from iscsi_vmtarget.server.vm_luns import DEFAULT_BASE_IQN
from iscsi_vmtarget.storage import MemoryBackend
from iscsi_vmtarget.vm import StateDir, VmManager
from iscsi_vmtarget.vm.format.header import Mode, scan_slots
from iscsi_vmtarget.vm.layers.view import GuestView
from tests.conftest import start_target
from tests.integration.test_snapshot_serve import _identity, ivt

MIB = 1 << 20
VM = "backed"
IQN = f"{DEFAULT_BASE_IQN}:vm.{VM}"
GUEST = "iqn.2026-11.org.iscsi-vmtarget.test:guest"
BACKUP = "iqn.2026-11.org.iscsi-vmtarget.test:backup"
SECRET = b"RAW-BACKUP-STATE-SECRET-17"
CHUNK = 2048  # blocks per READ(16): 1 MiB


def _login(port: int, initiator: str, target: str) -> Initiator:
    ini = Initiator(port=port, initiator_name=initiator, target_name=target)
    ini.login()
    return ini


def _read_all(ini: Initiator, lun: int = 0) -> bytes:
    blocks, size = ini.read_capacity16(lun)
    out = bytearray()
    for lba in range(0, blocks, CHUNK):
        out += ini.read16(lba, min(CHUNK, blocks - lba), size, lun)
    return bytes(out)


def _guest_disk(backup: bytes) -> bytes:
    """The guest's disk as the backed-up unit's own header places it."""
    unit = MemoryBackend(len(backup))
    unit.write(0, backup)
    header = scan_slots(unit).header
    assert header is not None, "the backup holds no valid unit header"
    view = GuestView(unit, header, read_only=True)
    return bytes(view.read(0, view.size))


def test_raw_backup_of_a_vm_with_three_snapshots(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with VmManager(StateDir.at(str(state))) as manager:
        manager.create(VM, disk=8 * MIB, memory=4 * MIB, mode=Mode.ALIGNED)
        manager.write_state(VM, io.BytesIO(SECRET * 500), len(SECRET) * 500)
    target = start_target(tmp_path / "serve", "--state-dir", str(state))
    try:
        ivt(state, "acl", "add", IQN, GUEST)
        ivt(state, "acl", "add", IQN, BACKUP, "--view", "raw")
        with contextlib.ExitStack() as stack:
            guest = stack.enter_context(contextlib.closing(_login(target.port, GUEST, IQN)))
            seen = {}
            for index in (1, 2, 3, 4):  # a write after each snapshot, and before the first
                guest.write16(0, os.urandom(4096), 512)  # the partition table: GUEST_HEAD
                guest.write16(index * 2048 + 7, os.urandom(70 * 1024), 512)
                if index < 4:
                    ivt(state, "vm", "snapshot", VM, f"s{index}")
                    seen[index] = _read_all(guest)
            now = _read_all(guest)
            backup_ini = stack.enter_context(contextlib.closing(_login(target.port, BACKUP, IQN)))
            backup = _read_all(backup_ini)
            assert _guest_disk(backup) == now
            assert SECRET not in backup
            live_raw = _identity(backup_ini)
            assert live_raw != _identity(guest)

            snap_iqn = f"{IQN}.snap.s2"
            ivt(state, "vm", "snapshot", "export", VM, "s2")
            ivt(state, "acl", "add", snap_iqn, BACKUP, "--view", "raw")
            snap_ini = stack.enter_context(
                contextlib.closing(_login(target.port, BACKUP, snap_iqn))
            )
            snap_backup = _read_all(snap_ini)
            assert _guest_disk(snap_backup) == seen[2]
            assert SECRET not in snap_backup
            assert _identity(snap_ini) not in (live_raw, _identity(guest))
    finally:
        target.stop()
