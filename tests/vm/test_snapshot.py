"""Snapshots (seed: snapshot, revert, delete-merge): copy-on-write chains checked
against an in-memory model, identities, and discovery from the units alone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from iscsi_vmtarget.server.snapshot_luns import snapshot_identity
from iscsi_vmtarget.server.vm_luns import export_vm
from iscsi_vmtarget.vm import Mode, VmError, VmManager
from iscsi_vmtarget.vm.layers.cow import GRAIN, is_zero
from iscsi_vmtarget.vm.operations import snapshot as snaps

MIB = 1 << 20
DISK = 4 * MIB
MEMORY = 1 * MIB


def _write(manager: VmManager, name: str, offset: int, data: bytes, lun: int = 0) -> None:
    vm = manager.find(name)
    backend = snaps.open_live(manager, vm, lun)
    try:
        backend.write(offset, data)
        backend.flush()
    finally:
        backend.close()


def _read_live(manager: VmManager, name: str, lun: int = 0) -> bytes:
    vm = manager.find(name)
    backend = snaps.open_live(manager, vm, lun)
    try:
        return bytes(backend.read(0, backend.size))
    finally:
        backend.close()


def _read_snap(manager: VmManager, name: str, snap: str, lun: int = 0) -> bytes:
    backend = snaps.open_snapshot(manager, name, snap, lun)
    try:
        return bytes(backend.read(0, backend.size))
    finally:
        backend.close()


def _state(manager: VmManager, name: str) -> bytes:
    return b"".join(manager.read_state(name))


def _set_state(manager: VmManager, name: str, data: bytes) -> None:
    import io

    manager.write_state(name, io.BytesIO(data), len(data))


@pytest.mark.parametrize("mode", list(Mode), ids=lambda m: m.name.lower())
def test_snapshot_revert_delete_flow(manager: VmManager, mode: Mode, pool: str) -> None:
    manager.create("vm1", disk=DISK, memory=MEMORY, secondaries=(2 * MIB,), mode=mode, pool=pool)
    _write(manager, "vm1", 0, b"A" * 1000)
    _write(manager, "vm1", 5, b"s" * 10, lun=1)
    _set_state(manager, "vm1", b"state-one")
    first_live = _read_live(manager, "vm1")
    snaps.create_snapshot(manager, "vm1", "one")
    _write(manager, "vm1", 100, b"B" * (GRAIN + 7))  # partial grains: copy-on-write
    _write(manager, "vm1", 5, b"t" * 10, lun=1)
    _set_state(manager, "vm1", b"state-two")
    assert _read_snap(manager, "vm1", "one") == first_live
    second_live = _read_live(manager, "vm1")
    assert second_live[100 : 100 + GRAIN + 7] == b"B" * (GRAIN + 7)
    assert second_live[:100] == b"A" * 100
    snaps.create_snapshot(manager, "vm1", "two")
    # discovery finds both again from the units alone, in a fresh manager
    with VmManager(manager.state) as again:
        infos = snaps.list_snapshots(again, "vm1")
        assert [(i.name, i.parent) for i in infos] == [("one", None), ("two", "one")]
    snaps.revert(manager, "vm1", "one")
    assert _read_live(manager, "vm1") == first_live
    assert _read_live(manager, "vm1", 1)[5:15] == b"s" * 10  # secondary bound too
    assert _state(manager, "vm1") == b"state-one"
    assert _read_snap(manager, "vm1", "two") == second_live
    snaps.delete_snapshot(manager, "vm1", "one")  # intermediate: merged
    assert _read_snap(manager, "vm1", "two") == second_live
    assert _read_live(manager, "vm1") == first_live
    snaps.delete_snapshot(manager, "vm1", "two")
    assert _read_live(manager, "vm1") == first_live
    vm = manager.find("vm1")
    assert not vm.records
    assert not vm.layers  # everything merged back into the units
    with pytest.raises(VmError, match="no snapshot named"):
        snaps.delete_snapshot(manager, "vm1", "two")


def test_snapshot_costs_metadata_only(manager: VmManager, state_dir: Path) -> None:
    manager.create("big", disk=256 * MIB, memory=MEMORY)
    _write(manager, "big", 0, os.urandom(4 * MIB))
    snaps.create_snapshot(manager, "big", "s")
    vm = manager.find("big")
    for layer in vm.layers:
        path = state_dir / "pools" / "default" / layer.ref.key
        assert os.stat(path).st_blocks * 512 < MIB  # sparse: no data copied


def test_live_lun_keeps_identity_and_snapshot_has_its_own(manager: VmManager) -> None:
    manager.create("idv", disk=DISK, memory=MEMORY)
    vm = manager.find("idv")
    luns = export_vm(vm, manager.catalog, manager.state.root)
    before = luns.guest[0].identity
    luns.close()
    snaps.create_snapshot(manager, "idv", "s1")
    snaps.revert(manager, "idv", "s1")
    vm = manager.find("idv")
    luns = export_vm(vm, manager.catalog, manager.state.root)
    try:
        after = luns.guest[0].identity
        assert (after.naa, after.serial) == (before.naa, before.serial)
        luns.guest[0].backend.write(0, b"x" * 512)  # writes land in the top layer
    finally:
        luns.close()
    record = manager.find("idv").records[0]
    own = snapshot_identity(record.header, vm.base.header.naa)
    assert own.naa != before.naa and own.serial != before.serial
    assert record.header.naa != before.naa


def test_an_exported_snapshot_is_not_deleted(manager: VmManager) -> None:
    """Deleting a snapshot that is exported as a LUN is refused with the command that
    stops the export; once stopped, the delete goes through."""
    from iscsi_vmtarget.vm.operations import export_marks as exports

    manager.create("vm1", disk=DISK, memory=MEMORY)
    _write(manager, "vm1", 0, b"A" * 1000)
    snaps.create_snapshot(manager, "vm1", "one")
    image = _read_snap(manager, "vm1", "one")
    exports.set_exported(manager, "vm1", "one", True)
    with pytest.raises(VmError, match="vm snapshot export vm1 one --stop"):
        snaps.delete_snapshot(manager, "vm1", "one")
    assert _read_snap(manager, "vm1", "one") == image
    exports.set_exported(manager, "vm1", "one", False)
    snaps.delete_snapshot(manager, "vm1", "one")
    with pytest.raises(VmError):
        _read_snap(manager, "vm1", "one")


@pytest.mark.parametrize("where", [None, 0, GRAIN - 1, GRAIN, 2 * GRAIN + 17])
def test_is_zero_sees_one_byte_in_any_grain(where: int | None) -> None:
    """What decides hole or write when grains are copied (fill, clone, move, replicate):
    one non-zero byte anywhere, also past the first grain or in a view, is data."""
    data = bytearray(2 * GRAIN + 100)
    if where is not None:
        data[where] = 1
    assert is_zero(data) is (where is None)
    assert is_zero(memoryview(data)[1:]) is (where in (None, 0))


@pytest.mark.parametrize("mode", [Mode.OFFSET, Mode.ALIGNED], ids=lambda m: m.name.lower())
def test_a_served_chain_refuses_past_the_disk_with_and_without_layers(
    manager: VmManager, mode: Mode
) -> None:
    """The bound of a live VM LUN: with no layers it is served by its guest view, which
    refuses; once a live snapshot pushed a layer onto a chain over it, the chain does;
    either way nothing past the guest's disk is read or written, and the hidden state
    is intact."""
    manager.create("rng", disk=DISK, memory=MEMORY, mode=mode)
    _set_state(manager, "rng", b"S" * 4096)
    luns = export_vm(manager.find("rng"), manager.catalog, manager.state.root)
    try:
        for layered in (False, True):
            if layered:
                snaps.create_snapshot(manager, "rng", "s1", live=luns.disks)
            disk = luns.guest[0].backend  # the plain guest view, then a chain over it
            assert len(getattr(disk, "layers", ())) == int(layered)
            for call in (
                lambda b=disk: b.read(DISK - 512, 1024),  # type: ignore[misc]
                lambda b=disk: b.write(DISK, b"x" * 512),  # type: ignore[misc]
                lambda b=disk: b.unmap(-512, 1024),  # type: ignore[misc]
            ):
                with pytest.raises(ValueError, match="outside backend"):
                    call()
    finally:
        luns.close()
    assert _state(manager, "rng") == b"S" * 4096
