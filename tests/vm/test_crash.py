"""kill -9 during header updates, state writes, creation, key rotation and resize, then
``discover``: every unit consistent, the VM whole, nothing half-visible to a guest.

Each test runs the real ``iscsi-vmtarget`` in a subprocess with
``ISCSI_VMTARGET_CRASHPOINT`` naming where it SIGKILLs itself (:mod:`iscsi_vmtarget.vm.faults`).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from iscsi_vmtarget.testing.ceph import CephCluster
from iscsi_vmtarget.vm import IntegrityError, StateDir, VmManager
from iscsi_vmtarget.vm.format import sealed
from iscsi_vmtarget.vm.format.header import Mode, RegionKind, UnitState
from iscsi_vmtarget.vm.units.unit import Unit
from tests.vm.helpers import run_cli, run_killed
from tests.vm.test_manager import guest_read_all, read_state, snapshot

MIB = 1 << 20
DISK = 8 * MIB
STATE = b"MEMORY-IMAGE" * 5000
HEAD, TAIL = b"HEAD" * 256, b"TAIL" * 256


def setup_vm(
    state: Path, mode: Mode, pool: str = "default", ceph: CephCluster | None = None
) -> None:
    """VM ``vm1`` in ``pool``: the default directory pool, else a device pool, or an
    rbd pool in a namespace of its own on ``ceph``."""
    with VmManager(StateDir.at(str(state))) as manager:
        if ceph is not None:
            namespace = f"{ceph.pool}/crash{state.parent.name[-12:]}"
            ceph.rbd("namespace", "create", namespace)
            manager.catalog.create_rbd(pool, namespace, ceph.conf)
        elif pool != "default":
            manager.catalog.create_device(pool, str(state.parent / "device.img"), size=256 * MIB)
        manager.create(
            "vm1", disk=DISK, memory=4 * MIB, secondaries=(4 * MIB,), mode=mode, pool=pool
        )
        manager.write_state("vm1", io.BytesIO(STATE), len(STATE))
        vm = manager.find("vm1")
        unit = Unit.open(manager.catalog.get(vm.base.pool), vm.base.ref)
        view = unit.guest_view()
        view.write(0, HEAD)
        view.write(DISK - len(TAIL), TAIL)
        view.flush()
        view.close()
        unit.close()


def check_consistent(state: Path, disk_sizes: tuple[int, ...]) -> int:
    """Discover (repairing), then check the VM is whole; return its disk size."""
    with VmManager(StateDir.at(str(state))) as manager:
        found = manager.discover()
        assert not found.damaged and not found.orphans, found.to_json()
        vm = found.find("vm1")
        assert vm is not None
        assert len(vm.secondaries) == 1 and not vm.missing
        assert all(u.header.state is UnitState.CLEAN for u in vm.units)
        size = vm.base.header.disk_size
        assert size in disk_sizes
        guest = guest_read_all(manager, "vm1")
        assert guest[: len(HEAD)] == HEAD and guest[DISK - len(TAIL) : DISK] == TAIL
        assert guest[DISK:] == bytes(size - DISK)
        assert read_state(manager, "vm1") == STATE
        again = manager.discover()
        assert not again.repaired  # the repair is complete and idempotent
        return size


def test_kill_while_recording_the_growth_intent(tmp_path: Path) -> None:
    """The growth intent file appears whole or not at all: killed before its rename,
    only a temporary is left, which the repair removes; an empty intent (what an older
    version could leave) is dropped instead of breaking every later open."""
    state = tmp_path / "state"
    setup_vm(state, Mode.TRUNCATE)
    run_killed(state, "resize.intent", "vm", "resize", "vm1", "--disk", str(2 * DISK))
    pool = state / "pools" / "default"
    assert [p.name for p in pool.glob(".*.grow.tmp")] and not list(pool.glob("*.grow"))
    assert check_consistent(state, (DISK,)) == DISK
    assert not list(pool.glob(".*.tmp"))
    unit = next(pool.glob("*.unit"))
    (pool / (unit.name + ".grow")).write_text("")  # created, never written
    with VmManager(StateDir.at(str(state))) as manager:
        actions = [r["action"] for r in manager.discover().repaired]
    assert actions == ["unfinished extension intent removed (the file was never extended)"]
    assert check_consistent(state, (DISK,)) == DISK


RESIZE_POINTS = [
    ("resize.extended", (DISK,)),  # room made, no new header yet: rolled back
    ("resize.journaled", (3 * DISK,)),  # journal at the new tail: rolled forward
    ("resize.moving", (3 * DISK,)),
    ("resize.moved", (3 * DISK,)),
    ("resize.scrubbed", (3 * DISK,)),
    ("header.torn", (3 * DISK,)),  # the SCRUBBING commit torn: the journal remains
    ("header.committed", (3 * DISK,)),
]


@pytest.mark.parametrize("mode", list(Mode), ids=lambda m: m.name.lower())
@pytest.mark.parametrize(("point", "sizes"), RESIZE_POINTS, ids=[p for p, _ in RESIZE_POINTS])
def test_kill_during_resize(tmp_path: Path, mode: Mode, point: str, sizes: tuple[int, ...]) -> None:
    state = tmp_path / "state"
    setup_vm(state, mode)
    run_killed(state, point, "vm", "resize", "vm1", "--disk", str(3 * DISK), "--memory", "32M")
    check_consistent(state, sizes)


POOL_RESIZE_CASES = [
    *((point, "device") for point in ("resize.extended", "resize.journaled", "resize.moved")),
    *((point, "rbd") for point in ("resize.extended", "resize.moved")),  # ~9 s each
]


@pytest.mark.parametrize(("point", "kind"), POOL_RESIZE_CASES)
def test_kill_during_resize_in_a_device_or_rbd_pool(
    tmp_path: Path, point: str, kind: str, request: pytest.FixtureRequest
) -> None:
    """Killed with room made but no header at the new tail, the unit shrinks back (a
    device pool's table, an rbd pool's growth intent in the image metadata); later,
    the journal rolls the resize forward."""
    state = tmp_path / "state"
    ceph = request.getfixturevalue("ceph_cluster") if kind == "rbd" else None
    setup_vm(state, Mode.ALIGNED, pool="dev", ceph=ceph)
    run_killed(state, point, "vm", "resize", "vm1", "--disk", str(3 * DISK))
    size = check_consistent(state, (DISK, 3 * DISK))
    assert size == (DISK if point == "resize.extended" else 3 * DISK)


def test_kill_during_state_write(tmp_path: Path) -> None:
    state = tmp_path / "state"
    setup_vm(state, Mode.TRUNCATE)
    image = tmp_path / "new.img"
    image.write_bytes(b"NEW-IMAGE" * 9000)  # fits the region twice: staged, crash-atomic
    for point in ("header.torn", "region.written"):  # before the switch: the old state
        run_killed(state, point, "vm", "state", "write", "vm1", str(image))
        check_consistent(state, (DISK,))
    for point in ("region.staged", "region.unstaged"):  # after it: the new state
        run_killed(state, point, "vm", "state", "write", "vm1", str(image))
        with VmManager(StateDir.at(str(state))) as manager:
            vm = manager.discover(repair=False).find("vm1")
            assert vm is not None
            unit = Unit.open(manager.catalog.get(vm.base.pool), vm.base.ref, repair=False)
            with contextlib.closing(unit):
                assert unit.header.require_region(RegionKind.STATE).status.name == "STAGED"
                staged = b"".join(unit.read_region(manager.keyring(), RegionKind.STATE))
            assert staged == image.read_bytes()  # readable before the repair
            assert manager.discover().repaired  # which finishes the copy
            assert read_state(manager, "vm1") == image.read_bytes()
            manager.write_state("vm1", io.BytesIO(STATE), len(STATE))
        check_consistent(state, (DISK,))
    # an image too large to stage is written in place: killed after the chunks, before
    # the VALID commit, it leaves a clear error, never mixed bytes
    with VmManager(StateDir.at(str(state))) as manager:
        region = manager.find("vm1").base.header.require_region(RegionKind.STATE)
    image.write_bytes(b"BIG-IMAGE" * (sealed.capacity(region.length) * 3 // 4 // 9))
    run_killed(state, "region.written", "vm", "state", "write", "vm1", str(image))
    with VmManager(StateDir.at(str(state))) as manager:
        assert not manager.discover().damaged
        with pytest.raises(IntegrityError, match="last write was interrupted"):
            read_state(manager, "vm1")
        manager.write_state("vm1", io.BytesIO(STATE), len(STATE))
    check_consistent(state, (DISK,))


CONFIG_POINTS = [
    ("header.torn", False),  # the switch commit torn: the old config
    ("region.written", False),  # staged, not switched: the old config
    ("region.staged", True),  # switched, not copied: the new config (read from staging)
    ("region.unstaged", True),  # copied, not committed VALID: the new config
]


@pytest.mark.parametrize(("point", "switched"), CONFIG_POINTS, ids=[p for p, _ in CONFIG_POINTS])
def test_kill_during_config_write_keeps_a_whole_config(
    tmp_path: Path, point: str, switched: bool
) -> None:
    """A config rewrite is crash-atomic (it used to lose the whole config)."""
    state = tmp_path / "state"
    setup_vm(state, Mode.TRUNCATE)
    with VmManager(StateDir.at(str(state))) as manager:
        before = manager.config("vm1")
    run_killed(state, point, "vm", "config", "set", "vm1", "cpus=7")
    check_consistent(state, (DISK,))
    with VmManager(StateDir.at(str(state))) as manager:
        assert manager.config("vm1") == {**before, "cpus": 7 if switched else before["cpus"]}


@pytest.mark.parametrize("point", ["region.written", "region.staged"])
def test_kill_during_resize_config_update(tmp_path: Path, point: str) -> None:
    """``vm resize`` grows the unit, then rewrites the config: killed in that rewrite,
    the unit has its new size and the config is the old or the new one, never lost."""
    state = tmp_path / "state"
    setup_vm(state, Mode.TRUNCATE)
    with VmManager(StateDir.at(str(state))) as manager:
        before = manager.config("vm1")
    run_killed(state, point, "vm", "resize", "vm1", "--disk", str(2 * DISK))
    assert check_consistent(state, (2 * DISK,)) == 2 * DISK
    with VmManager(StateDir.at(str(state))) as manager:
        after = manager.config("vm1")
        assert after["disks"][0] in (DISK, 2 * DISK)  # type: ignore[index]
        assert {k: v for k, v in after.items() if k != "disks"} == {
            k: v for k, v in before.items() if k != "disks"
        }
        snapshot_of_it = manager.find("vm1")  # and the VM stays usable
        assert snapshot_of_it.base.header.disk_size == 2 * DISK


def test_kill_during_create_leaves_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    setup_vm(state, Mode.OFFSET)
    before = snapshot(state)
    run_killed(state, "create.written", "vm", "create", "vm2", "--disk", "8M", "--memory", "4M")
    with VmManager(StateDir.at(str(state))) as manager:
        found = manager.discover()
        assert [vm.name for vm in found.vms] == ["vm1"]
        assert [r["action"] for r in found.repaired] == ["unfinished unit removed"]
    assert snapshot(state) == before


def test_kill_while_creating_the_new_master_key(tmp_path: Path) -> None:
    """The new key file appears whole or not at all: killed before its link, nothing
    but a temporary is left; units and state stay readable and the next rotation
    succeeds (and removes the temporary)."""
    state = tmp_path / "state"
    setup_vm(state, Mode.TRUNCATE)
    run_killed(state, "key.written", "key", "rotate")
    assert not (state / "master.key.new").exists()
    assert list(state.glob(".master.key.new.tmp-*"))
    check_consistent(state, (DISK,))
    proc = run_cli(state, "key", "rotate")
    assert proc.returncode == 0, proc.stderr
    assert not list(state.glob(".master.key*"))
    check_consistent(state, (DISK,))


def test_kill_during_key_rotation(tmp_path: Path) -> None:
    state = tmp_path / "state"
    setup_vm(state, Mode.TRUNCATE)
    with VmManager(StateDir.at(str(state))) as manager:
        manager.create("vm2", disk=DISK, memory=4 * MIB)
    run_killed(state, "header.committed", "key", "rotate")
    assert (state / "master.key.new").exists()
    check_consistent(state, (DISK,))  # both keys unwrap meanwhile
    proc = run_cli(state, "key", "rotate")
    assert proc.returncode == 0, proc.stderr
    assert "re-wrapped 1 unit keys, 1 already current" in proc.stdout
    assert not (state / "master.key.new").exists()
    check_consistent(state, (DISK,))
