"""kill -9 during snapshot, revert, delete (merge) and clone, then ``discover``: every
snapshot reads what it read before, the live disks read either the old or the new
image, nothing is damaged and the repair is idempotent (crash points:
:mod:`iscsi_vmtarget.vm.faults`)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from iscsi_vmtarget.vm import StateDir, VmManager
from iscsi_vmtarget.vm.layers.cow import GRAIN
from iscsi_vmtarget.vm.operations import snapshot as snaps
from tests.vm.helpers import run_killed

MIB = 1 << 20
DISK = 4 * MIB


def _write(manager: VmManager, offset: int, data: bytes, lun: int = 0) -> None:
    backend = snaps.open_live(manager, manager.find("vm1"), lun)
    try:
        backend.write(offset, data)
        backend.flush()
    finally:
        backend.close()


def _live(manager: VmManager, lun: int = 0) -> bytes:
    backend = snaps.open_live(manager, manager.find("vm1"), lun)
    try:
        return bytes(backend.read(0, backend.size))
    finally:
        backend.close()


def _snap(manager: VmManager, name: str, lun: int = 0) -> bytes:
    backend = snaps.open_snapshot(manager, "vm1", name, lun)
    try:
        return bytes(backend.read(0, backend.size))
    finally:
        backend.close()


Images = dict[str, tuple[bytes, bytes, bytes]]


def _setup(state: Path, names: tuple[str, ...]) -> Images:
    """vm1 with one snapshot per name, distinct writes and state before each and after
    the last; returns every snapshot's (LUN 0, LUN 1, state) and, under "", the live
    ones."""
    images = {}
    with VmManager(StateDir.at(str(state))) as manager:
        manager.create("vm1", disk=DISK, memory=MIB, secondaries=(2 * MIB,))
        for index, name in enumerate((*names, "")):
            fill = bytes([0x41 + index])
            _write(manager, index * GRAIN + 100, fill * (GRAIN + 300))  # partial grains
            _write(manager, 7 * index, fill * 50, lun=1)
            memory = fill * (100_000 + index)  # several sealed chunks
            manager.write_state("vm1", io.BytesIO(memory), len(memory))
            if name:
                snaps.create_snapshot(manager, "vm1", name)
            images[name] = (_live(manager), _live(manager, 1), memory)
    return images


def _check(state: Path, images: Images, live_ok: list[str]) -> None:
    with VmManager(StateDir.at(str(state))) as manager:
        found = manager.discover()
        assert not found.damaged and not found.orphans, found.to_json()
        present = {i.name for i in snaps.list_snapshots(manager, "vm1")}
        for name in present:
            assert (_snap(manager, name), _snap(manager, name, 1)) == images[name][:2], name
        state_image = b"".join(manager.read_state("vm1"))
        live = (_live(manager), _live(manager, 1), state_image)
        assert any(live == images[name] for name in live_ok), "live disks torn"
        again = manager.discover()
        assert not again.repaired and not again.damaged


@pytest.mark.parametrize("point", ["snapshot.deltas", "snapshot.record", "snapshot.committed"])
def test_kill_during_snapshot(tmp_path: Path, point: str) -> None:
    state = tmp_path / "state"
    images = _setup(state, ("s1",))
    run_killed(state, point, "vm", "snapshot", "vm1", "s2")
    images["s2"] = images[""]
    _check(state, images, [""])


@pytest.mark.parametrize(
    "point", ["revert.deltas", "revert.committed", "region.written", "revert.restored"]
)
def test_kill_during_revert(tmp_path: Path, point: str) -> None:
    state = tmp_path / "state"
    images = _setup(state, ("s1", "s2"))
    run_killed(state, point, "vm", "revert", "vm1", "s1")
    _check(state, images, ["", "s1"])


@pytest.mark.parametrize(
    ("names", "victim"), [(("s1", "s2"), "s2"), (("s1",), "s1")], ids=["middle", "root"]
)
@pytest.mark.parametrize("point", ["snapshot.deleted", "merge.copying", "merge.copied"])
def test_kill_during_delete_merge(
    tmp_path: Path, point: str, names: tuple[str, ...], victim: str
) -> None:
    state = tmp_path / "state"
    images = _setup(state, names)
    run_killed(state, point, "vm", "snapshot", "delete", "vm1", victim)
    _check(state, images, [""])
    with VmManager(StateDir.at(str(state))) as manager:
        assert victim not in {i.name for i in snaps.list_snapshots(manager, "vm1")}


@pytest.mark.parametrize(
    ("point", "how"),
    [
        ("clone.copying", "--full"),
        ("clone.copied", "--full"),
        ("clone.linking", "--from-snapshot=s1"),
        ("clone.copied", "--from-snapshot=s1"),
    ],
)
def test_kill_during_clone(tmp_path: Path, point: str, how: str) -> None:
    state = tmp_path / "state"
    images = _setup(state, ("s1",))
    run_killed(state, point, "vm", "clone", "vm1", "copy", "--from-snapshot", "s1", how)
    _check(state, images, [""])
    with VmManager(StateDir.at(str(state))) as manager:
        names = {v.name for v in manager.discover().vms}
        assert "copy" not in names  # never half-visible under its name


@pytest.mark.parametrize("point", ["unlink.copying", "unlink.committed"])
def test_kill_during_unlink(tmp_path: Path, point: str) -> None:
    from iscsi_vmtarget.vm.operations.clone import clone, unlink

    state = tmp_path / "state"
    images = _setup(state, ("s1",))
    with VmManager(StateDir.at(str(state))) as manager:
        clone(manager, "vm1", "copy", from_snapshot="s1", full=False)
    run_killed(state, point, "vm", "unlink", "copy")
    _check(state, images, [""])
    with VmManager(StateDir.at(str(state))) as manager:
        unlink(manager, "copy")  # finishes (or confirms) it
        backend = snaps.open_live(manager, manager.find("copy"))
        try:
            assert bytes(backend.read(0, backend.size)) == images["s1"][0]
        finally:
            backend.close()
        manager.delete("vm1")  # the source may go now
        backend = snaps.open_live(manager, manager.find("copy"))
        try:
            assert bytes(backend.read(0, backend.size)) == images["s1"][0]
        finally:
            backend.close()
