"""``vm resize`` of a VM with snapshots: the live disks grow (a new top layer of the
new size), every snapshot keeps the size it had, a revert brings that size back, the
grown space reads zeros even where a later image had data, a served disk's initiators
get CAPACITY DATA HAS CHANGED, deleting the snapshots leaves a plain unit of the grown
size; shrinking is refused; kill -9 at each step leaves the old or the new disk."""

from __future__ import annotations

import io
import struct
from dataclasses import replace
from pathlib import Path

import pytest

from iscsi_vmtarget.scsi import Nexus, ScsiTarget, Status
from iscsi_vmtarget.server.vm_luns import resize_live
from iscsi_vmtarget.server.vm_startup import serve_vms
from iscsi_vmtarget.vm import Mode, SizeError, StateDir, VmManager
from iscsi_vmtarget.vm.format.header import RegionKind
from iscsi_vmtarget.vm.layers.cow import GRAIN
from iscsi_vmtarget.vm.operations import snapshot as snaps
from iscsi_vmtarget.vm.operations.resize import resize_vm
from tests.vm.helpers import make_nexus, run_killed, sense_triplet
from tests.vm.test_snapshot_crash import _live, _snap, _write

MIB = 1 << 20
OLD = (4 * MIB + 1536, 2 * MIB + 512)  # LUN 0, LUN 1: the last grain straddles the end
NEW = (6 * MIB + 512, 3 * MIB)
CAPACITY_CHANGED = (0x6, 0x2A, 0x09)


def _setup(manager: VmManager, mode: Mode = Mode.TRUNCATE) -> None:
    manager.create("vm1", disk=OLD[0], memory=MIB, secondaries=OLD[1:], mode=mode)
    _write(manager, OLD[0] - 3000, b"A" * 3000)  # up to the very end
    _write(manager, 1000, b"a" * 5000, lun=1)
    snaps.create_snapshot(manager, "vm1", "s1")


@pytest.mark.parametrize("mode", list(Mode), ids=lambda m: m.name.lower())
def test_grow_with_snapshots_keeps_each_snapshot_size(manager: VmManager, mode: Mode) -> None:
    _setup(manager, mode)
    s1 = (_live(manager), _live(manager, 1))
    vm = resize_vm(manager, "vm1", disk=NEW[0], secondaries={1: NEW[1]})
    assert [vm.disk_size(u) for u in vm.units] == list(NEW)  # what vm show/list print
    assert [lun["disk_bytes"] for lun in vm.to_json()["luns"]] == list(NEW)  # type: ignore[index]
    grown = _live(manager)
    assert len(grown) == NEW[0] and grown[: OLD[0]] == s1[0]
    assert grown[OLD[0] :] == bytes(NEW[0] - OLD[0])  # the straddled grain's tail too
    assert _live(manager, 1) == s1[1] + bytes(NEW[1] - OLD[1])
    assert manager.config("vm1")["disks"] == list(NEW)
    _write(manager, OLD[0] - 1000, b"B" * (GRAIN + 5000))  # across the old end
    snaps.create_snapshot(manager, "vm1", "s2")
    s2 = _live(manager)
    assert (_snap(manager, "s1"), _snap(manager, "s1", 1)) == s1  # its own size
    snaps.revert(manager, "vm1", "s1")
    assert (_live(manager), _live(manager, 1)) == s1  # the old size is back
    assert manager.config("vm1")["disks"] == list(OLD)
    middle = 5 * MIB
    resize_vm(manager, "vm1", disk=middle)  # where s2 had B: zeros in this image
    assert _live(manager) == s1[0] + bytes(middle - OLD[0])
    snaps.revert(manager, "vm1", "s2")
    assert _live(manager) == s2
    for snap in ("s1", "s2"):
        snaps.delete_snapshot(manager, "vm1", snap)
    found = manager.discover()  # merges: the unit grows to the disk's size
    assert not found.damaged
    vm = manager.find("vm1", found)
    assert not vm.layers and [u.header.disk_size for u in vm.units] == list(NEW)
    assert _live(manager) == s2 and _live(manager, 1) == s1[1] + bytes(NEW[1] - OLD[1])
    assert not manager.discover().repaired


def test_shrinking_is_refused_and_equal_size_changes_nothing(manager: VmManager) -> None:
    _setup(manager)
    resize_vm(manager, "vm1", disk=NEW[0])
    layers = len(manager.find("vm1").layers)
    with pytest.raises(SizeError, match="shrinking"):
        resize_vm(manager, "vm1", disk=OLD[0])
    resize_vm(manager, "vm1", disk=NEW[0], secondaries={1: OLD[1]})
    assert len(manager.find("vm1").layers) == layers  # no new top for an equal size


def test_memory_grows_with_snapshots(manager: VmManager) -> None:
    _setup(manager, Mode.OFFSET)  # the disk region moves when the state region grows
    state = b"state " * 50_000
    manager.write_state("vm1", io.BytesIO(state), len(state))
    before = (_live(manager), _snap(manager, "s1"))
    region = manager.find("vm1").base.header.require_region(RegionKind.STATE).length
    resize_vm(manager, "vm1", memory=64 * MIB)
    assert manager.find("vm1").base.header.require_region(RegionKind.STATE).length > region
    assert (_live(manager), _snap(manager, "s1")) == before
    assert b"".join(manager.read_state("vm1")) == state


def test_layers_written_before_sizes_were_recorded(manager: VmManager) -> None:
    """Deltas of an older version record no size: they have their unit's, which
    never grows while they rest on it."""
    _setup(manager)
    _write(manager, 77, b"between" * 99)
    snaps.create_snapshot(manager, "vm1", "s2")
    with manager.locked(manager.catalog.all()):
        for found in manager.find("vm1").layers:  # as the older version wrote them
            unit = manager.open_unit(found)
            disk = unit.header.require_region(RegionKind.DISK)
            unit.commit(unit.header.with_region(replace(disk, used=0)))
            unit.close()
    s1, s2 = _snap(manager, "s1"), _snap(manager, "s2")
    resize_vm(manager, "vm1", disk=NEW[0])
    _write(manager, NEW[0] - 100, b"N" * 100)
    grown = _live(manager)
    assert grown[: OLD[0]] == s2 and grown[-100:] == b"N" * 100
    snaps.delete_snapshot(manager, "vm1", "s1")
    assert (_snap(manager, "s2"), _live(manager)) == (s2, grown)
    snaps.revert(manager, "vm1", "s2")
    assert _live(manager) == s2
    snaps.delete_snapshot(manager, "vm1", "s2")
    assert _live(manager) == s2 != s1
    assert not manager.find("vm1", manager.discover()).layers  # merged into its unit


def _read_capacity(target: ScsiTarget, nexus: Nexus) -> int:
    """READ CAPACITY (16) (SBC-3 §5.16): bytes of LUN 0."""
    cdb = bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 32) + bytes(2)
    response = target.execute(nexus, 0, cdb, None)
    assert response.status == Status.GOOD
    last_lba, block = struct.unpack(">QI", bytes(response.data_in)[:12])
    return (last_lba + 1) * block


def test_served_disk_grows_and_reverts_live(state_dir: Path) -> None:
    with VmManager(StateDir.at(str(state_dir))) as manager:
        _setup(manager)
    served = serve_vms(str(state_dir))
    try:
        luns = next(v for v in served if v.name == "vm1")
        target = ScsiTarget(dict(luns.guest))
        nexus = make_nexus()
        target.nexus_added(nexus)
        for lun in (0, 1):
            target.execute(nexus, lun, bytes(6), None)  # the power-on unit attention
        resize_live(str(state_dir), "vm1", luns.disks, luns.raw, disk=NEW[0])
        response = target.execute(nexus, 0, bytes(6), None)  # TEST UNIT READY
        assert response.status == Status.CHECK_CONDITION
        assert sense_triplet(response) == CAPACITY_CHANGED
        assert _read_capacity(target, nexus) == NEW[0]
        chain = luns.guest[0].backend
        chain.write(NEW[0] - 512, b"Z" * 512)  # the new space is writable at once
        assert chain.read(NEW[0] - 512, 512) == b"Z" * 512
        with VmManager(StateDir.at(str(state_dir))) as manager:
            snaps.revert(manager, "vm1", "s1", live=luns.disks)
        response = target.execute(nexus, 0, bytes(6), None)
        assert sense_triplet(response) == CAPACITY_CHANGED
        assert _read_capacity(target, nexus) == OLD[0]
    finally:
        for v in served:
            v.close()


@pytest.mark.parametrize("point", ["resize.deltas", "resize.committed"])
def test_kill_during_resize_with_snapshots(state_dir: Path, point: str) -> None:
    with VmManager(StateDir.at(str(state_dir))) as manager:
        _setup(manager)
        s1, live = _snap(manager, "s1"), _live(manager)
    run_killed(state_dir, point, "vm", "resize", "vm1", "--disk", str(NEW[0]))
    with VmManager(StateDir.at(str(state_dir))) as manager:
        found = manager.discover()
        assert not found.damaged and not found.orphans
        assert _snap(manager, "s1") == s1
        expected = live if point == "resize.deltas" else live + bytes(NEW[0] - OLD[0])
        assert _live(manager) == expected
        assert not manager.discover().repaired
        if point == "resize.deltas":  # not committed: it can simply run again
            resize_vm(manager, "vm1", disk=NEW[0])
            assert _live(manager) == live + bytes(NEW[0] - OLD[0])


def test_kill_while_the_unit_grows_under_its_last_layer(state_dir: Path) -> None:
    with VmManager(StateDir.at(str(state_dir))) as manager:
        _setup(manager)
        resize_vm(manager, "vm1", disk=NEW[0])
        live = _live(manager)
    run_killed(state_dir, "merge.grown", "vm", "snapshot", "delete", "vm1", "s1")
    with VmManager(StateDir.at(str(state_dir))) as manager:
        assert _live(manager) == live  # a grown unit under the top changes nothing
        found = manager.discover()  # finishes the merge
        assert not found.damaged
        vm = manager.find("vm1", found)
        assert not vm.layers and vm.base.header.disk_size == NEW[0]
        assert _live(manager) == live
