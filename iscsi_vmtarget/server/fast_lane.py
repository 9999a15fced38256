"""The server's part of the fast lane (issue 18): joins the transport's half
(``iscsi/fast_lane.py``: the PDU) to the SCSI layer's (``scsi/fast_lane.py``: the
READ or WRITE), with the LUN decoded and masked and the command counted exactly as on
the full path (:meth:`.listener.ConnectionHandler._execute`).

Masking: the lane looks LUNs up in the session's own :class:`~..scsi.ScsiTarget`
(the initiator's view, built at login, :meth:`.registry.Registry.scsi_for`), with
:func:`.fabric.decode_lun`, as the full path does; a LUN it does not show takes the
full path, which answers LOGICAL UNIT NOT SUPPORTED.

On an LU whose backend has asynchronous I/O (RBD) the command is started
(:func:`..scsi.fast_lane.fast_start`) and the lane answers
:data:`~..iscsi.fast_lane.STARTED`; the backend's completion comes back to the event
loop through the connection's handler (:class:`LaneHost`, the server's
:class:`~.completions.Inbox`, as for a :class:`~..scsi.medium_transfer.MediumTransfer`),
is counted there with its real duration, and ends the command
(:meth:`~..iscsi.fast_lane.FastCommands.fast_completed`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Protocol, runtime_checkable

from ..iscsi.connection import TargetConnection
from ..iscsi.fast_lane import STARTED, FastLane, Started
from ..iscsi.pdu import Payload
from ..scsi import ScsiTarget
from ..scsi.fast_lane import Outcome, fast_io, fast_start
from ..scsi.task import Nexus, ScsiResponse, it_key
from ..storage.nowait import WouldBlock
from . import fabric
from .metrics import Metrics

Step = Callable[[], None]


@runtime_checkable
class LaneHost(Protocol):
    """What the lane needs of its connection's handler
    (:class:`.listener.ConnectionHandler`) for the commands it starts."""

    #: commands handed to a backend or thread and not completed yet
    running: int

    @property
    def conn(self) -> TargetConnection: ...

    def post_completion(self, complete: Step) -> None:
        """Run ``complete()`` on the event loop (called from any thread), then send
        what it queued."""


def session_lane(
    scsi: ScsiTarget,
    nexus: Nexus,
    metrics: Metrics,
    target_name: str,
    lun_names: Mapping[int, int],
    tsih: int,
    blocked: set[int],
    host: LaneHost | None = None,
) -> FastLane:
    """The lane of one logged-in session (``TargetConnection.fast_lane``). The ITT of
    a command the kernel would have blocked goes into ``blocked``: the full path, which
    then gets the command, must run it in a worker thread without trying it inline.
    Without ``host`` (a connection driven by hand) LUs with asynchronous I/O take the
    full path."""
    luns = scsi.luns  # the session's view: fixed for its lifetime, like its ScsiTarget
    key = it_key(nexus)
    record = metrics.record
    clock = time.perf_counter
    numbers: dict[bytes, int] = {}  # LUN field -> LUN, for the LUs the view shows

    def ended(
        owner: LaneHost, itt: int, lun: int, cdb: bytes, expected: int, begun: float,
        outcome: Outcome,
    ) -> None:  # fmt: skip
        """On the loop: a started command is over (counted as _account counts)."""
        owner.running -= 1
        name = lun_names.get(lun)
        if name is not None:
            if isinstance(outcome, ScsiResponse):  # a failed READ counts no bytes
                good, nbytes = False, outcome.data_out_length
            else:
                good, nbytes = True, expected
            record(target_name, name, tsih, cdb[0], good, nbytes, clock() - begun, True)
        owner.conn.fast_completed(itt, outcome)

    def start(
        itt: int, lun: int, cdb: bytes, data: Payload, expected: int, begun: float
    ) -> Started | None:
        owner = host
        if owner is None:
            return None

        def done(outcome: Outcome) -> None:  # the backend's thread
            owner.post_completion(lambda: ended(owner, itt, lun, cdb, expected, begun, outcome))

        if not fast_start(luns, key, lun, cdb, data, expected, done):
            return None
        owner.running += 1
        return STARTED

    def lane(
        itt: int, lun_field: bytes, cdb: bytes, data: Payload, expected: int
    ) -> bytes | bytearray | Started | None:
        lun = numbers.get(lun_field)
        if lun is None:
            try:
                lun = fabric.decode_lun(lun_field)
            except ValueError:
                return None
            if lun not in luns:
                return None
            numbers[lun_field] = lun
        begun = clock()
        try:
            if luns[lun].abilities.aio is not None:  # checked again inside the range hold
                return start(itt, lun, cdb, data, expected, begun)
            result = fast_io(luns, key, lun, cdb, data, expected)
        except WouldBlock:  # the full path runs it in a thread (ConnectionHandler._execute)
            blocked.add(itt)
            return None
        except Exception:  # a bug, say in a backend's property: the full path reports it
            return None
        if result is not None:
            name = lun_names.get(lun)
            if name is not None:  # as ConnectionHandler._account
                record(target_name, name, tsih, cdb[0], True, expected, clock() - begun, True)
        return result

    return lane
