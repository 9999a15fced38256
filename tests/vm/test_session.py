"""The manager's session (every pool locked, discovered once) and the crash recovery
the operations register with it (:data:`iscsi_vmtarget.vm.manager.RECOVERY`)."""

from __future__ import annotations

import pytest

from iscsi_vmtarget.vm import NotFoundError, VmManager
from iscsi_vmtarget.vm.manager import RECOVERY
from iscsi_vmtarget.vm.operations.clone import finish_clones
from iscsi_vmtarget.vm.operations.move import finish_moves
from iscsi_vmtarget.vm.operations.promote import finish_promotes
from iscsi_vmtarget.vm.units import locks

MIB = 1 << 20


def _held(manager: VmManager, pool: str) -> bool:
    """Whether some open file holds pool ``pool``'s lock (flock: per open file)."""
    return locks.operation_running(manager.state.root, f"pool.{pool}")


def test_every_operation_registers_its_recovery_once() -> None:
    """Interrupted moves are finished before failed clones are rolled back; a repairing
    discovery finishes snapshot changes; a deletion forgets replication records; a
    promote cut short loses its temporary VM."""
    expected = [finish_moves, finish_clones, finish_promotes]
    assert [run for _rank, run in RECOVERY.all_locked] == expected
    assert len(RECOVERY.vm_found) == 1 and len(RECOVERY.deleted) == 1


def test_a_session_holds_every_pool_lock(manager: VmManager) -> None:
    manager.catalog.create_directory("second", None)
    manager.create("vm1", disk=4 * MIB, memory=MIB)
    with manager.session() as session:
        assert sorted(p.name for p in session.pools) == ["default", "second"]
        assert session.find("vm1").name == "vm1"
        assert _held(manager, "default") and _held(manager, "second")
        with pytest.raises(NotFoundError, match="no VM named 'nope'"):
            session.find("nope")
    assert not _held(manager, "default") and not _held(manager, "second")
