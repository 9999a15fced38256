"""PREEMPT AND ABORT aborts the preempted I_T nexuses' tasks (SPC-4 §5.13.11.2.6):
server/pr_abort.py gives each LU a task aborter that, on the event loop, aborts the
tasks every matching session has on that LU - under whatever LUN number its ACL
shows it, read-only mappings included - and nobody else's."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field

from iscsi_vmtarget.scsi import LogicalUnit, Nexus, ScsiTarget, Status, UnitIdentity
from iscsi_vmtarget.server import pr_abort
from iscsi_vmtarget.server.masking import ReadOnlyUnit
from iscsi_vmtarget.server.registry import Registry
from iscsi_vmtarget.storage import MemoryBackend
from tests.scsi.test_scsi_pr import EA, PREEMPT_ABORT, REGISTER, RESERVE, TUR, nexus, prout


@dataclass
class FakeConnection:
    aborted: list[int | None] = field(default_factory=list)

    def abort_tasks(self, lun: int | None = None) -> None:
        self.aborted.append(lun)


@dataclass
class FakeHandler:
    nexus: Nexus
    scsi: ScsiTarget
    conn: FakeConnection = field(default_factory=FakeConnection)


def test_preempt_and_abort_aborts_the_victims_tasks_only() -> None:
    lu = LogicalUnit(MemoryBackend(64 * 512), UnitIdentity.from_uuid(uuid.UUID(int=5)))
    other = LogicalUnit(MemoryBackend(64 * 512), UnitIdentity.from_uuid(uuid.UUID(int=6)))
    registry = Registry()
    winner, victim = nexus("iqn.2026-12.test:winner"), nexus("iqn.2026-12.test:victim")
    handlers = {
        1: FakeHandler(winner, ScsiTarget({0: lu})),
        2: FakeHandler(victim, ScsiTarget({3: other, 5: ReadOnlyUnit(lu)})),  # type: ignore[dict-item]
    }
    registry.connections.update(handlers)  # type: ignore[arg-type]

    async def scenario() -> None:
        for handler in handlers.values():
            pr_abort.attach(registry, handler.scsi, asyncio.get_running_loop())
            handler.scsi.nexus_added(handler.nexus)
            handler.scsi.execute(handler.nexus, 0 if handler.nexus is winner else 5, TUR, None)
        steps = [
            (victim, 5, prout(REGISTER, sark=0xB)),
            (victim, 5, prout(RESERVE, key=0xB, kind=EA)),
            (winner, 0, prout(REGISTER, sark=0xA)),
            (winner, 0, prout(PREEMPT_ABORT, key=0xA, sark=0xB, kind=EA)),
        ]
        for who, lun, (cdb, data) in steps:
            # in a worker thread, as the server runs commands; the aborts come back
            # to the loop
            response = await asyncio.to_thread(
                handlers[1 if who is winner else 2].scsi.execute, who, lun, cdb, data
            )
            assert response.status == Status.GOOD
        await asyncio.sleep(0)

    asyncio.run(scenario())
    assert handlers[2].conn.aborted == [5]  # the victim's mapping of the LU, not LUN 3
    assert handlers[1].conn.aborted == []
