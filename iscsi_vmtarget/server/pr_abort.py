"""PREEMPT AND ABORT's task aborts (SPC-4 §5.13.11.2.6) for the sessions of this process.

The reservation rules name the preempted I_T nexuses (``scsi/pr.py``, also when the
preemption came from another gateway of a shared LU); the tasks are the transport's.
:func:`attach` gives each logical unit a session reaches a
:data:`~iscsi_vmtarget.scsi.logical_unit.TaskAborter` that, on the event loop, aborts
the tasks every matching session has on that unit (as ABORT TASK SET would: they end
without a response, TAS=0, and the nexus gets REGISTRATIONS PREEMPTED).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ..scsi import LogicalUnit, ScsiTarget
from ..scsi.pr import initiator_of
from ..scsi.pr_state import Initiator
from .masking import ReadOnlyUnit
from .registry import Registry


def _unit(lu: LogicalUnit | ReadOnlyUnit) -> LogicalUnit:
    return lu.shared if isinstance(lu, ReadOnlyUnit) else lu


def attach(registry: Registry, scsi: ScsiTarget, loop: asyncio.AbstractEventLoop) -> None:
    """Give every unit of ``scsi`` (one session's LUN map) its task aborter, once."""
    for lu in scsi.luns.values():
        unit = _unit(lu)
        if unit.task_aborter is None:
            unit.task_aborter = _aborter(registry, unit, loop)


def _aborter(
    registry: Registry, unit: LogicalUnit, loop: asyncio.AbstractEventLoop
) -> Callable[[Callable[[Initiator], bool]], None]:
    def abort(wants: Callable[[Initiator], bool]) -> None:
        # called from a worker thread or a RADOS watch callback: the tasks live on the loop
        loop.call_soon_threadsafe(abort_where, registry, unit, wants)

    return abort


def abort_where(registry: Registry, unit: LogicalUnit, wants: Callable[[Initiator], bool]) -> None:
    """Abort the tasks on ``unit`` of every session whose I_T nexus ``wants`` names."""
    for handler in list(registry.connections.values()):
        nexus, scsi = handler.nexus, handler.scsi
        if nexus is None or scsi is None or not wants(initiator_of(nexus)):
            continue
        for lun, lu in scsi.luns.items():
            if _unit(lu) is unit:
                handler.conn.abort_tasks(lun)
