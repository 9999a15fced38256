"""kill -9 during header updates, state writes, creation, key rotation and resize, then
``discover``: every unit consistent, the VM whole, nothing half-visible to a guest.

Each test runs the real ``iscsi-vmtarget`` in a subprocess with
``ISCSI_VMTARGET_CRASHPOINT`` naming where it SIGKILLs itself (:mod:`iscsi_vmtarget.vm.faults`).
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from iscsi_vmtarget.vm import IntegrityError, StateDir, VmManager
from iscsi_vmtarget.vm.faults import ENV
from iscsi_vmtarget.vm.format import Mode, UnitState
from tests.vm.test_manager import guest_read_all, read_state, snapshot

MIB = 1 << 20
DISK = 8 * MIB
STATE = b"MEMORY-IMAGE" * 5000
HEAD, TAIL = b"HEAD" * 256, b"TAIL" * 256


def run_killed(state: Path, crashpoint: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, ENV: crashpoint}
    proc = subprocess.run(
        [sys.executable, "-m", "iscsi_vmtarget", *args, "--state-dir", str(state)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr)
    return proc


def setup_vm(state: Path, mode: Mode, pool: str = "default") -> None:
    with VmManager(StateDir.at(str(state))) as manager:
        if pool != "default":
            manager.catalog.create_device(pool, str(state.parent / "device.img"), size=256 * MIB)
        manager.create(
            "vm1", disk=DISK, memory=4 * MIB, secondaries=(4 * MIB,), mode=mode, pool=pool
        )
        manager.write_state("vm1", io.BytesIO(STATE), len(STATE))
        vm = manager.find("vm1")
        from iscsi_vmtarget.vm.unit import Unit

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


@pytest.mark.parametrize("point", ["resize.extended", "resize.journaled", "resize.moved"])
def test_kill_during_resize_in_a_device_pool(tmp_path: Path, point: str) -> None:
    state = tmp_path / "state"
    setup_vm(state, Mode.ALIGNED, pool="dev")
    run_killed(state, point, "vm", "resize", "vm1", "--disk", str(3 * DISK))
    size = check_consistent(state, (DISK, 3 * DISK))
    assert size == (DISK if point == "resize.extended" else 3 * DISK)


def test_kill_during_state_write(tmp_path: Path) -> None:
    state = tmp_path / "state"
    setup_vm(state, Mode.TRUNCATE)
    image = tmp_path / "new.img"
    image.write_bytes(b"NEW-IMAGE" * 9000)
    # torn WRITING commit: the old header (and the old state) stay valid
    run_killed(state, "header.torn", "vm", "state", "write", "vm1", str(image))
    check_consistent(state, (DISK,))
    # killed after the chunks, before the VALID commit: a clear error, never mixed bytes
    run_killed(state, "region.written", "vm", "state", "write", "vm1", str(image))
    with VmManager(StateDir.at(str(state))) as manager:
        assert not manager.discover().damaged
        with pytest.raises(IntegrityError, match="last write was interrupted"):
            read_state(manager, "vm1")
        manager.write_state("vm1", io.BytesIO(STATE), len(STATE))
    check_consistent(state, (DISK,))


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


def test_kill_during_key_rotation(tmp_path: Path) -> None:
    state = tmp_path / "state"
    setup_vm(state, Mode.TRUNCATE)
    with VmManager(StateDir.at(str(state))) as manager:
        manager.create("vm2", disk=DISK, memory=4 * MIB)
    run_killed(state, "header.committed", "key", "rotate")
    assert (state / "master.key.new").exists()
    check_consistent(state, (DISK,))  # both keys unwrap meanwhile
    proc = subprocess.run(
        [sys.executable, "-m", "iscsi_vmtarget", "key", "rotate", "--state-dir", str(state)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "re-wrapped 1 unit keys, 1 already current" in proc.stdout
    assert not (state / "master.key.new").exists()
    check_consistent(state, (DISK,))
