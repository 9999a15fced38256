"""Live move in one process (what the daemon's ``vm.move`` runs), all three modes: a
thread writes through the served chains during the move; afterwards the chains, the
raw-view LUs and the chains that read the VM's units (an exported snapshot, a linked
clone) all work on the destination's units; a failure at the switch is undone."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from iscsi_vmtarget.server import snapshot_luns as exports
from iscsi_vmtarget.server.vm_luns import VmLuns
from iscsi_vmtarget.server.vm_startup import serve_vms
from iscsi_vmtarget.vm import StateDir, VmManager
from iscsi_vmtarget.vm.format.header import Mode
from iscsi_vmtarget.vm.layers.cow import GRAIN, ChainBackend
from iscsi_vmtarget.vm.layers.dirty import DirtyGrains
from iscsi_vmtarget.vm.layers.flat import FlatView
from iscsi_vmtarget.vm.operations import export_marks
from iscsi_vmtarget.vm.operations import move as moving
from iscsi_vmtarget.vm.operations import snapshot as snaps
from iscsi_vmtarget.vm.operations.clone import clone
from iscsi_vmtarget.vm.vm_errors import InUseError
from tests.vm.helpers import flattened

MIB = 1 << 20


def test_dirty_grains_marks_every_grain_touched() -> None:
    dirty = DirtyGrains()
    dirty.mark(GRAIN - 512, 1024)  # straddles grains 0 and 1
    dirty.mark(5 * GRAIN, 3 * GRAIN)
    dirty.mark(100, 0)
    assert len(dirty) == 5
    assert dirty.take() == [0, 1, 5, 6, 7]
    assert dirty.take() == [] and len(dirty) == 0


def _setup(state: Path, mode: Mode, dest: str = "directory") -> bytes:
    """vm1 (two disks, snapshot s1 exported) and kid, a linked clone of s1; pool p2 of
    kind ``dest`` (a device pool on a sparse file)."""
    with VmManager(StateDir.at(str(state))) as manager:
        if dest == "device":
            manager.catalog.create_device("p2", str(state.parent / "p2.img"), size=64 * MIB)
        else:
            manager.catalog.create_directory("p2", None)
        manager.create("vm1", disk=4 * MIB, memory=MIB, secondaries=(2 * MIB,), mode=mode)
        backend = snaps.open_live(manager, manager.find("vm1"), 0)
        backend.write(GRAIN + 7, b"s1 data " * 1000)
        backend.flush()
        backend.close()
        snaps.create_snapshot(manager, "vm1", "s1")
        export_marks.set_exported(manager, "vm1", "s1", True)
        clone(manager, "vm1", "kid", from_snapshot="s1", full=False)
        image = snaps.open_snapshot(manager, "vm1", "s1")
        try:
            return bytes(image.read(0, image.size))
        finally:
            image.close()


def _by_name(served: list[VmLuns]) -> dict[str, VmLuns]:
    return {luns.name: luns for luns in served}


def _chains(luns: VmLuns) -> dict[int, ChainBackend]:
    """The chains behind the guest LUNs of ``luns``: a VM disk served as its plain
    guest view is made one, as a live operation makes it."""
    out = {}
    for number, lu in luns.guest.items():
        disk = luns.disks.get(number)
        backend = lu.backend if disk is None else disk.chain()
        assert isinstance(backend, ChainBackend) and backend is lu.backend
        out[number] = backend
    return out


@pytest.mark.parametrize(
    ("mode", "dest"),
    [*((m, "directory") for m in Mode), (Mode.OFFSET, "device")],
    ids=lambda v: v if isinstance(v, str) else v.name.lower(),
)
def test_live_move_with_a_writer(tmp_path: Path, mode: Mode, dest: str) -> None:
    state = tmp_path / "state"
    image_s1 = _setup(state, mode, dest)
    served = serve_vms(str(state))
    model: dict[tuple[int, int], bytes] = {}
    stop = threading.Event()

    def write(chains: dict[int, ChainBackend]) -> None:
        i = 0
        while not stop.is_set() or i < 200:
            lun = i % 2
            offset = (i * 3 * 4096) % chains[lun].size
            data = f"write {i} ".encode().ljust(4096, b"=")
            chains[lun].write(offset, data)
            model[(lun, offset)] = data
            i += 1

    try:
        luns = _by_name(served)
        own = _chains(luns["vm1"])
        followers: list[ChainBackend | FlatView] = [
            c for n, v in luns.items() if n != "vm1" for c in _chains(v).values()
        ]
        assert len(followers) == 4  # the export of s1 and the linked clone kid, 2 LUNs each
        snap_raw = luns[exports.snapshot_target_suffix("vm1", "s1")].raw[0].backend
        assert isinstance(snap_raw, FlatView)
        followers.append(snap_raw)  # it reads the s1 record besides the chain
        snap_backup = bytes(snap_raw.read(0, snap_raw.size))
        writer = threading.Thread(target=write, args=(own,))
        writer.start()
        seen: list[tuple[int, int]] = []
        with VmManager(StateDir.at(str(state))) as manager:
            report = moving.move_live(
                manager,
                "vm1",
                "p2",
                own,
                raw=luns["vm1"].raw,
                followers=followers,
                progress=lambda d, t: seen.append((d, t)),
            )
        stop.set()
        writer.join()
        assert report.units == 5  # base, secondary, two deltas, the s1 record
        assert seen and seen[-1][0] == seen[-1][1] and seen == sorted(seen)
        for (lun, offset), data in model.items():
            assert own[lun].read(offset, len(data)) == data
        snap = _chains(luns[exports.snapshot_target_suffix("vm1", "s1")])[0]
        assert snap.read(0, snap.size) == image_s1  # a follower, rebound
        assert snap_raw.read(0, snap_raw.size) == snap_backup
        kid = _chains(luns["kid"])[0]
        assert kid.read(0, kid.size) == image_s1
        with VmManager(StateDir.at(str(state))) as manager:
            vm = manager.find("vm1")
            assert vm.base.pool == "p2"
            if dest == "directory":  # the snapshot's raw view reads the moved record
                record = state / "pools" / "p2" / f"{vm.records[0].header.unit_uuid}.unit"
                paths = [h.backend.path for h in snap_raw.homes]  # type: ignore[attr-defined]
                assert paths == [str(record)]
            base = manager.catalog.get("p2").open(vm.base.ref)
            try:
                unit = bytes(base.read(0, base.size))
            finally:
                base.close()
            raw = luns["vm1"].raw[0].backend  # raw view: the new unit, through the chain
            guest = bytes(own[0].read(0, own[0].size))
            assert raw.read(0, raw.size) == flattened(unit, vm.base.header, guest)
    finally:
        stop.set()
        for luns in served:
            luns.close()
    with VmManager(StateDir.at(str(state))) as manager:
        found = manager.discover()
        assert not found.damaged
        vm = manager.find("vm1", found)
        assert {u.pool for u in vm.all_units} == {"p2"}
        assert {u.pool for u in manager.find("kid", found).all_units} == {"default"}
        for (lun, offset), data in model.items():
            backend = snaps.open_live(manager, vm, lun)
            try:
                assert backend.read(offset, len(data)) == data
            finally:
                backend.close()
    if dest == "directory":
        assert not [p for p in (state / "pools" / "p2").iterdir() if p.name.startswith(".")]


def test_failed_switch_is_undone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "state"
    _setup(state, Mode.TRUNCATE)
    served = serve_vms(str(state))

    own = _chains(_by_name(served)["vm1"])
    opened = moving._open_layers
    calls: list[object] = []

    def broken(*args: Any) -> Any:  # the copies open, the switch does not
        calls.append(args)
        if len(calls) > len(own):
            raise OSError(24, "Too many open files")
        return opened(*args)

    monkeypatch.setattr(moving, "_open_layers", broken)
    try:
        with VmManager(StateDir.at(str(state))) as manager:
            with pytest.raises(OSError, match="open files"):
                moving.move_live(manager, "vm1", "p2", own, raw=_by_name(served)["vm1"].raw)
            with pytest.raises(InUseError, match="moves it live"):
                moving.move(manager, "vm1", "p2")  # a served VM is the daemon's to move
        assert all(chain.write_hook is None for chain in own.values())
        own[0].write(0, b"after" * 100)  # still serving, from the original units
        own[0].flush()
        assert own[0].read(0, 500) == b"after" * 100
    finally:
        for luns in served:
            luns.close()
    assert list((state / "pools" / "p2").iterdir()) == []
    assert not (state / "conf" / "moves" / "vm1.json").exists()
    with VmManager(StateDir.at(str(state))) as manager:
        vm = manager.find("vm1")
        assert {u.pool for u in vm.all_units} == {"default"}
        backend = snaps.open_live(manager, vm, 0)
        try:
            assert backend.read(0, 500) == b"after" * 100
        finally:
            backend.close()


def _image_s1(manager: VmManager) -> bytes:
    image = snaps.open_snapshot(manager, "vm1", "s1")
    try:
        return bytes(image.read(0, image.size))
    finally:
        image.close()


def test_offline_move_into_a_device_pool_and_back(tmp_path: Path) -> None:
    state = tmp_path / "state"
    image_s1 = _setup(state, Mode.TRUNCATE, "device")
    with VmManager(StateDir.at(str(state))) as manager:
        assert moving.move(manager, "vm1", "p2") == 5  # base, secondary, two deltas, s1
        device = manager.catalog.get("p2")
        assert len(device.candidates()) == 5
        assert {u.pool for u in manager.find("vm1").all_units} == {"p2"}
        assert _image_s1(manager) == image_s1
        assert moving.move(manager, "vm1", "default") == 5
        assert device.candidates() == []
        assert {u.pool for u in manager.find("vm1").all_units} == {"default"}
        assert _image_s1(manager) == image_s1
    assert b"s1 data" not in (tmp_path / "p2.img").read_bytes()  # deleted units: scrubbed
