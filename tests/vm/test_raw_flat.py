"""The raw view of a VM with snapshots is the unit flattened through the live chain
(:mod:`iscsi_vmtarget.vm.layers.flat`): a backup read through it holds the guest's data as the
guest sees it now, every other byte as the unit holds it (ciphertext), and it follows
live snapshot, revert, delete and resize. A snapshot's raw view is the unit flattened
at that snapshot."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from iscsi_vmtarget.server.snapshot_luns import snapshot_luns
from iscsi_vmtarget.server.vm_luns import VmLuns, export_vm, resize_live
from iscsi_vmtarget.storage.backend import BlockBackend
from iscsi_vmtarget.vm import StateDir, VmManager
from iscsi_vmtarget.vm.format.crypto import RegionCipher
from iscsi_vmtarget.vm.format.header import Mode, RegionKind, UnitHeader, scan_slots
from iscsi_vmtarget.vm.format.sealed import read_chunks
from iscsi_vmtarget.vm.layers.view import GuestView
from iscsi_vmtarget.vm.operations import snapshot as snaps
from tests.vm.helpers import flattened

MIB = 1 << 20
SECRET = b"RAW-FLAT-STATE-SECRET-61"
STATE = SECRET * 1000


def _guest(lun: BlockBackend) -> bytes:
    return bytes(lun.read(0, lun.size))


def _write(luns: VmLuns, number: int, offset: int, length: int) -> None:
    luns.guest[number].backend.write(offset, os.urandom(length))


def _state(manager: VmManager, raw: BlockBackend, header: UnitHeader) -> bytes:
    """The state region's plaintext, read from ``raw`` with ``header``'s keys."""
    key = manager.keyring().unwrap(header.key_id, header.wrapped_key, "test")
    region = header.require_region(RegionKind.STATE)
    cipher = RegionCipher(key, header.unit_uuid, RegionKind.STATE)
    return b"".join(read_chunks(raw, region, cipher, "state"))


def _unit_bytes(manager: VmManager, name: str, number: int) -> tuple[UnitHeader, bytes]:
    found = manager.find(name).lun_map()[number]
    handle = manager.catalog.get(found.pool).open(found.ref)
    try:
        return found.header, bytes(handle.read(0, handle.size))
    finally:
        handle.close()


def check_flat(
    manager: VmManager, luns: VmLuns, *, grown: bool = False, state: bytes = STATE
) -> None:
    """Every LUN's raw view is a unit whose own header's guest view reads what the
    guest sees; outside the disk it holds what the unit holds (the base unit's state
    as ciphertext only); a grown disk is served in the grown unit's layout."""
    for number, raw_lu in luns.raw.items():
        raw = raw_lu.backend
        guest = _guest(luns.guest[number].backend)
        header = scan_slots(raw).header  # the flattened unit describes itself
        assert header is not None and header.disk_size == len(guest)
        assert bytes(GuestView(raw, header, read_only=True).read(0, len(guest))) == guest
        image = bytes(raw.read(0, raw.size))
        unit_header, unit = _unit_bytes(manager, "vm", number)
        if not grown:  # the unit's layout: outside the disk, byte for byte the unit
            assert raw.size == len(unit) and header == unit_header
            assert image == flattened(unit, header, guest)
        if number == 0:
            assert SECRET not in image and SECRET[::-1] not in image
            assert _state(manager, raw, header) == state


@pytest.mark.parametrize("mode", list(Mode), ids=lambda m: m.name.lower())
def test_raw_view_follows_the_live_chain(tmp_path: Path, mode: Mode) -> None:
    with VmManager(StateDir.at(str(tmp_path))) as manager:
        manager.create("vm", disk=4 * MIB, memory=4 * MIB, secondaries=(2 * MIB,), mode=mode)
        manager.write_state("vm", io.BytesIO(STATE), len(STATE))
        luns = export_vm(manager.find("vm"), manager.catalog, manager.state.root)
        live = luns.disks  # plain guest views until the first snapshot
        try:
            _write(luns, 0, 0, 8192)  # the guest's partition table (aligned: GUEST_HEAD)
            _write(luns, 1, 4096, 4096)
            images = {}
            for index in (1, 2, 3):
                snaps.create_snapshot(manager, "vm", f"s{index}", live=live)
                images[index] = _guest(luns.guest[0].backend)
                _write(luns, 0, index * 300 * 1024, 70 * 1024)  # across grains
                _write(luns, 0, 0, 512)
                _write(luns, 1, index * 64 * 1024, 512)
            check_flat(manager, luns)
            snaps.revert(manager, "vm", "s2", live=live)
            assert _guest(luns.guest[0].backend) == images[2]
            _write(luns, 0, 3 * MIB, 4096)
            check_flat(manager, luns)
            snaps.delete_snapshot(manager, "vm", "s1", live=live)  # a merge under it
            check_flat(manager, luns)
            resize_live(str(tmp_path), "vm", luns.disks, luns.raw, disk=6 * MIB)
            _write(luns, 0, 5 * MIB, 8192)  # in the grown part
            assert luns.raw[0].backend.size > manager.find("vm").base.header.unit_size
            check_flat(manager, luns, grown=True)
            manager.write_state("vm", io.BytesIO(STATE[::-1]), len(STATE))  # served
            check_flat(manager, luns, grown=True, state=STATE[::-1])
            resize_live(str(tmp_path), "vm", luns.disks, luns.raw, memory=24 * MIB)  # unit grows
            check_flat(manager, luns, grown=True, state=STATE[::-1])
            snaps.revert(manager, "vm", "s3", live=live)  # back to the unit's disk size
            assert luns.raw[0].backend.size == manager.find("vm").base.header.unit_size
            check_flat(manager, luns)
            # a snapshot export's raw view: the unit flattened at that snapshot
            snap = snapshot_luns(manager, manager.find("vm"), "s3")
            try:
                for number, lu in snap.raw.items():
                    header = scan_slots(lu.backend).header
                    assert header is not None
                    view = GuestView(lu.backend, header, read_only=True)
                    assert bytes(view.read(0, view.size)) == _guest(snap.guest[number].backend)
                raw = snap.raw[0].backend
                header = scan_slots(raw).header
                assert header is not None
                assert bytes(GuestView(raw, header, read_only=True).read(0, 4 * MIB)) == images[3]
                records = manager.find("vm").records  # sealed with the record's identity
                assert header.unit_uuid in {r.header.unit_uuid for r in records}
                assert _state(manager, raw, header) == STATE
                assert SECRET not in bytes(raw.read(0, raw.size))
                idents = {
                    (lu.identity.naa, lu.identity.serial)
                    for lu in (*snap.raw.values(), *snap.guest.values(), *luns.raw.values())
                }
                assert len(idents) == 6  # nobody shares a designator
            finally:
                snap.close()
        finally:
            luns.close()
