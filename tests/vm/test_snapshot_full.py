"""Full snapshots (seed: a snapshot "may include all data at the particular moment of
the snapshot or only the difference"): ``vm snapshot --full`` and ``vm snapshot fill``
copy into a snapshot's layers every grain they lack, so the snapshot's layers alone
hold its image; it reads what it read before, deleting its predecessors leaves every
snapshot reading the same, and a kill -9 mid-fill leaves a valid snapshot that is
only not full yet."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from iscsi_vmtarget.vm import StateDir, VmManager
from iscsi_vmtarget.vm.layers.cow import GRAIN, DeltaLayer, grains_of
from iscsi_vmtarget.vm.operations import snapshot as snaps
from iscsi_vmtarget.vm.operations.snapshot_fill import FLUSH_EVERY, fill_snapshot
from tests.vm.helpers import run_cli
from tests.vm.test_snapshot_crash import _write

MIB = 1 << 20
SIZES = (8 * MIB, 2 * MIB)  # LUN 0 (more grains than FLUSH_EVERY) and a secondary


def _image(manager: VmManager, snap: str, lun: int) -> bytes:
    backend = snaps.open_snapshot(manager, "vm1", snap, lun)
    try:
        return bytes(backend.read(0, backend.size))
    finally:
        backend.close()


def _images(manager: VmManager, snap: str) -> list[bytes]:
    return [_image(manager, snap, lun) for lun in range(len(SIZES))]


def _info(manager: VmManager, snap: str) -> dict[str, object]:
    return snaps.snapshot_info(manager, "vm1", snap).to_json()


def layers_alone(manager: VmManager, name: str, snap: str) -> list[bytes]:
    """The snapshot's image of each LUN as its own layer holds it, nothing below read:
    a grain the layer lacks reads as b"?" bytes, so it shows."""
    vm = manager.find(name)
    record = snaps.find_snapshot(manager, vm, manager.keyring(), snap)
    out = []
    for volume in vm.lun_map().values():
        found = vm.index[dict(record.header.tops)[volume.header.naa]]
        pool = manager.catalog.get(found.pool)
        layer = DeltaLayer(pool.open(found.ref), found.header, volume.header.disk_size)
        try:
            image = bytearray(b"?" * layer.size)
            for grain in range(grains_of(layer.size)):
                if layer.has(grain):
                    start = grain * GRAIN
                    piece = memoryview(image)[start : min(start + GRAIN, layer.size)]
                    layer.read_into(start, piece)
            out.append(bytes(image))
        finally:
            layer.close()
    return out


def _setup(manager: VmManager) -> None:
    """vm1 with s1 (its first snapshot: it froze the units themselves) and data
    written before and after it, partial grains and grains past 64 included."""
    manager.create("vm1", disk=SIZES[0], memory=MIB, secondaries=SIZES[1:])
    _write(manager, 100, b"A" * (3 * GRAIN))
    _write(manager, 5 * MIB + 7, b"a" * 1000)
    _write(manager, 300, b"x" * 600, lun=1)
    snaps.create_snapshot(manager, "vm1", "s1")
    _write(manager, GRAIN + 5, b"B" * 700)  # s2's own grain: partial, copied up
    _write(manager, 7 * MIB, b"b" * (2 * GRAIN))
    _write(manager, MIB, b"y" * 512, lun=1)


def test_a_full_snapshot_holds_its_whole_image(manager: VmManager) -> None:
    _setup(manager)
    seen: list[tuple[int, int]] = []
    info = snaps.create_snapshot(
        manager, "vm1", "s2", full=True, progress=lambda d, t: seen.append((d, t))
    )
    expected = _images(manager, "s2")
    assert info.to_json()["full"] is True
    assert info.to_json()["bytes"] == info.to_json()["size"] == sum(SIZES)
    assert layers_alone(manager, "vm1", "s2") == expected  # no grain comes from below
    assert seen and seen == sorted(seen) and seen[-1][0] == seen[-1][1]
    _write(manager, 0, b"C" * (4 * GRAIN))  # the live disk moves on; s2 does not
    snaps.create_snapshot(manager, "vm1", "s3")
    assert _info(manager, "s3")["full"] is False
    assert _info(manager, "s1")["full"] is True  # it froze the units themselves
    listed = {i.name: i.to_json() for i in snaps.list_snapshots(manager, "vm1", fullness=True)}
    assert listed["s2"]["full"] is True and listed["s3"]["bytes"] < listed["s3"]["size"]
    live = [snaps.open_live(manager, manager.find("vm1"), n) for n in range(len(SIZES))]
    live_images = [bytes(b.read(0, b.size)) for b in live]
    for backend in live:
        backend.close()
    snaps.delete_snapshot(manager, "vm1", "s1")  # its predecessor goes
    assert _images(manager, "s2") == expected
    assert layers_alone(manager, "vm1", "s2") == expected
    assert [_image(manager, "s3", n) for n in range(len(SIZES))] == live_images


def test_fill_makes_an_existing_snapshot_full(manager: VmManager) -> None:
    _setup(manager)
    snaps.create_snapshot(manager, "vm1", "s2")
    expected = _images(manager, "s2")
    before = _info(manager, "s2")
    assert before["full"] is False and before["size"] == sum(SIZES)
    filled = fill_snapshot(manager, "vm1", "s2")
    assert filled == sum(SIZES) - before["bytes"]  # type: ignore[operator]
    assert _info(manager, "s2")["full"] is True
    assert layers_alone(manager, "vm1", "s2") == _images(manager, "s2") == expected
    assert fill_snapshot(manager, "vm1", "s2") == 0  # nothing left to do
    assert fill_snapshot(manager, "vm1", "s1") == 0  # full from the start


def test_cli_full_snapshot_list_and_fill(state_dir: Path) -> None:
    with VmManager(StateDir.at(str(state_dir))) as manager:
        _setup(manager)
    proc = run_cli(state_dir, "vm", "snapshot", "vm1", "s2", "--full", "--progress", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["full"] is True
    assert "filling" in proc.stderr and "100%" in proc.stderr  # the progress bar
    proc = run_cli(state_dir, "vm", "snapshot", "vm1", "s3")
    assert proc.returncode == 0 and "delta" in proc.stdout, proc.stderr
    proc = run_cli(state_dir, "vm", "snapshot", "list", "vm1", "--json")
    listed = {i["name"]: i for i in json.loads(proc.stdout)}
    assert listed["s2"]["full"] and listed["s2"]["bytes"] == sum(SIZES)
    assert not listed["s3"]["full"]
    proc = run_cli(state_dir, "vm", "snapshot", "list", "vm1")
    assert f"full {sum(SIZES)}/{sum(SIZES)} bytes" in proc.stdout
    proc = run_cli(state_dir, "vm", "snapshot", "fill", "vm1", "s3")
    assert proc.returncode == 0 and "is full" in proc.stdout, proc.stderr
    proc = run_cli(state_dir, "vm", "snapshot", "fill", "vm1", "nope")
    assert proc.returncode != 0 and "no snapshot named 'nope'" in proc.stderr


@pytest.mark.parametrize("crashpoint", ["fill.copying", "fill.flushed"])
def test_kill_mid_fill_leaves_a_valid_snapshot(state_dir: Path, crashpoint: str) -> None:
    with VmManager(StateDir.at(str(state_dir))) as manager:
        _setup(manager)
        snaps.create_snapshot(manager, "vm1", "s2")
        expected = _images(manager, "s2")
        held = _info(manager, "s2")["bytes"]
        snaps.delete_snapshot(manager, "vm1", "s2")
    proc = run_cli(state_dir, "vm", "snapshot", "vm1", "s2", "--full", crashpoint=crashpoint)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    proc = run_cli(state_dir, "discover", "--json")
    assert proc.returncode == 0, proc.stderr
    assert not json.loads(proc.stdout)["damaged"]
    with VmManager(StateDir.at(str(state_dir))) as manager:
        info = _info(manager, "s2")
        assert _images(manager, "s2") == expected  # valid: it reads what it should
        assert info["full"] is False
        flushed = FLUSH_EVERY * GRAIN if crashpoint == "fill.flushed" else 0
        assert info["bytes"] == held + flushed  # what was flushed stays filled
    proc = run_cli(state_dir, "vm", "snapshot", "fill", "vm1", "s2")
    assert proc.returncode == 0, proc.stderr
    with VmManager(StateDir.at(str(state_dir))) as manager:
        assert _info(manager, "s2")["full"] is True
        assert layers_alone(manager, "vm1", "s2") == _images(manager, "s2") == expected
