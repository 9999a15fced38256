"""``vm move``: every unit of a VM with snapshots moves to another pool, reads and
identities unchanged; kill -9 at every step, then the VM is whole in exactly one pool."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from iscsi_vmtarget.testing.ceph import CephCluster
from iscsi_vmtarget.vm import StateDir, VmManager
from iscsi_vmtarget.vm.faults import ENV
from iscsi_vmtarget.vm.operations import snapshot as snaps
from iscsi_vmtarget.vm.operations.move import move

MIB = 1 << 20


def _images(manager: VmManager) -> dict[str, list[bytes]]:
    vm = manager.find("vm1")
    out = {}
    for lun in vm.lun_map():
        backend = snaps.open_live(manager, vm, lun)
        try:
            out.setdefault("", []).append(bytes(backend.read(0, backend.size)))
        finally:
            backend.close()
        backend = snaps.open_snapshot(manager, "vm1", "s1", lun)
        try:
            out.setdefault("s1", []).append(bytes(backend.read(0, backend.size)))
        finally:
            backend.close()
    return out


def _setup(state: Path) -> tuple[dict[str, list[bytes]], list[bytes]]:
    with VmManager(StateDir.at(str(state))) as manager:
        manager.catalog.create_directory("p2", None)
        manager.create("vm1", disk=4 * MIB, memory=MIB, secondaries=(2 * MIB,))
        for lun, data in ((0, b"one" * 5000), (1, b"two" * 300)):
            backend = snaps.open_live(manager, manager.find("vm1"), lun)
            backend.write(1000, data)
            backend.flush()
            backend.close()
        snaps.create_snapshot(manager, "vm1", "s1")
        backend = snaps.open_live(manager, manager.find("vm1"), 0)
        backend.write(70000, b"three" * 3000)
        backend.flush()
        backend.close()
        return _images(manager), [u.header.naa for u in manager.find("vm1").units]


def _check(state: Path, images: dict[str, list[bytes]], naas: list[bytes]) -> set[str]:
    with VmManager(StateDir.at(str(state))) as manager:
        found = manager.discover()
        assert not found.damaged and not found.orphans, found.to_json()
        vm = manager.find("vm1", found)
        assert _images(manager) == images
        assert [u.header.naa for u in vm.units] == naas
        pools = {u.pool for u in vm.all_units}
        assert len(pools) == 1
        return pools


def test_move_keeps_everything(tmp_path: Path) -> None:
    state = tmp_path / "state"
    images, naas = _setup(state)
    with VmManager(StateDir.at(str(state))) as manager:
        assert move(manager, "vm1", "p2") == 5  # base, secondary, 2 deltas, 1 record
    assert _check(state, images, naas) == {"p2"}
    assert not os.listdir(state / "pools" / "default")


@pytest.mark.parametrize("point", ["move.copying", "move.copied", "move.committed"])
def test_kill_during_move(tmp_path: Path, point: str) -> None:
    state = tmp_path / "state"
    images, naas = _setup(state)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "iscsi_vmtarget",
            "vm",
            "move",
            "vm1",
            "--pool",
            "p2",
            "--state-dir",
            str(state),
        ],
        env={**os.environ, ENV: point},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    pools = _check(state, images, naas)
    assert pools == ({"p2"} if point == "move.committed" else {"default"})


def test_move_into_an_rbd_pool_and_back(tmp_path: Path, ceph_cluster: CephCluster) -> None:
    """A directory pool's VM moves to an rbd pool and back: data, snapshots and every
    unit's NAA designator (VPD 0x83) unchanged each time."""
    state = tmp_path / "state"
    images, naas = _setup(state)
    namespace = f"{ceph_cluster.pool}/m{uuid.uuid4().hex[:12]}"
    ceph_cluster.rbd("namespace", "create", namespace)
    with VmManager(StateDir.at(str(state))) as manager:
        manager.catalog.create_rbd("ceph", namespace, ceph_cluster.conf)
        assert move(manager, "vm1", "ceph") == 5
    assert _check(state, images, naas) == {"ceph"}
    assert not os.listdir(state / "pools" / "default")
    with VmManager(StateDir.at(str(state))) as manager:
        assert move(manager, "vm1", "default") == 5
    assert _check(state, images, naas) == {"default"}
    assert ceph_cluster.rbd("ls", namespace).split() == []
