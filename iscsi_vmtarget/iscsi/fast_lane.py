"""The transport's half of the fast lane (issue 18): a SCSI Command PDU that needs
nothing of the session's machinery is decoded with one ``struct`` call, handed to the
server's lane (``TargetConnection.fast_lane``: the SCSI layer's
``scsi/fast_lane.py``), and ended with the one PDU :func:`.completion.command_end`
packs, without a :class:`~.pdu.ScsiCommand`, a :class:`~.transfer.Task`, an event or
a response object.

Only the plainest command qualifies; anything else is handled as before, so the lane
changes no protocol behaviour (RFC 7143):

* non-immediate (I=0), CmdSN equal to ExpCmdSN with nothing held back out of order
  (§4.2.2.1), no event waiting for the server (commands run in CmdSN order), no
  logout under way, no AHS (no extended CDB), no data digest error;
* F=1 and either R=1, W=0 with no data segment, or W=1, R=0 with all of the
  Expected Data Transfer Length as immediate data (ImmediateData=Yes, within
  FirstBurstLength: no R2T, no Data-Out), and task attribute SIMPLE (§11.3.1);
* an ITT not in use, room in the task set (else TASK SET FULL, from the full path);
* a read whose data fits one Data-In (MaxRecvDataSegmentLength, MaxBurstLength),
  so the status travels with it (§11.7.4).

The lane itself may still refuse (it answers None): the PDU then takes the full path
as if the lane did not exist.

On a backend with asynchronous I/O (RBD) the lane answers :data:`STARTED`: the command
was started and ends later, when the server calls :meth:`FastCommands.fast_completed`
on the loop. Meanwhile it is a task as any the full path has dispatched (its CmdSN
counted, its ITT in use, its Data-Out buffered, in the task set's count), so ABORT
TASK, ABORT TASK SET, a reset and a logout treat it as the full path's.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from .completion import CommandResult, command_end
from .pdu import BHS_LEN, Payload, RawPdu
from .settings import ConnectionSettings
from .transfer import Task

if TYPE_CHECKING:
    from collections import deque

    from .events import Event
    from .params import SessionParams
    from .pdu import Pdu


class Started:
    """The type of :data:`STARTED`."""

    __slots__ = ()


#: The lane's answer for a command it started: it ends with :meth:`fast_completed`.
STARTED: Final = Started()

#: (ITT, LUN field, CDB, Data-Out, Expected Data Transfer Length) -> the Data-In (a
#: write: ``b""``) of a command that ended GOOD without residual, :data:`STARTED`, or
#: None: take the full path (the ITT names the command there, as the task's)
FastLane = Callable[[int, bytes, bytes, Payload, int], "bytes | bytearray | Started | None"]

#: The SCSI Command BHS (§11.3): flags, LUN, ITT, EDTL, CmdSN (ExpStatSN, CDB after).
_COMMAND: Final = struct.Struct(">xB6x8sIII4x16s").unpack
#: byte 0 of a non-immediate SCSI Command (the fast lane's first test)
SCSI_COMMAND_BYTE: Final = 0x01
_READ_SIMPLE: Final = 0xC1  # F, R, ATTR=SIMPLE
_WRITE_SIMPLE: Final = 0xA1  # F, W, ATTR=SIMPLE


def limits(params: SessionParams, max_data_out: int) -> tuple[int, int]:
    """The largest read and write (bytes) the lane takes under these parameters:
    a read's data in one Data-In, a write's all as immediate data."""
    read = min(params.max_recv_data_segment_length, params.max_burst_length)
    write = min(params.first_burst_length, max_data_out) if params.immediate_data else 0
    return read, write


class FastCommands:
    """The lane's method, mixed into :class:`~.connection.TargetConnection` (whose
    state it reads and advances as ``_handle_sequenced`` and ``_send_status`` do)."""

    # set by the server once a normal session is logged in (None: no lane)
    fast_lane: FastLane | None = None
    fast_limits: tuple[int, int] = (0, 0)  # :func:`limits` of the session
    settings: ConnectionSettings
    tasks: dict[int, Task]
    expcmdsn: int
    statsn: int
    _events: deque[Event]
    _pending: dict[int, Pdu]
    _logout_pdu: Pdu | None
    _buffered: int
    _header_digest: bool
    _data_digest: bool
    closing: bool
    decode_lun: Callable[[bytes], int]

    def _emit(self, buffers: list[Payload], size: int) -> None: ...
    def _drop_task(self, task: Task) -> None: ...
    def _maybe_finish_logout(self) -> None: ...
    def command_completed(self, task: Task, response: CommandResult) -> None: ...
    def _end_without_sense(
        self, task: Task, status: int, overflow: bool, underflow: bool, residual: int,
        data: bytes | bytearray | memoryview,
    ) -> None: ...  # fmt: skip

    def _fast_command(self, raw: RawPdu) -> bool:
        """Run ``raw`` (a SCSI Command PDU, I=0) through the lane; False when it must
        take the full path (module doc), nothing having been done."""
        lane = self.fast_lane
        if lane is None or raw.ahs or raw.digest_error or self._events or self._pending:
            return False
        flags, lun, itt, edtl, cmdsn, cdb = _COMMAND(raw.bhs)
        data = raw.data
        tasks = self.tasks
        settings = self.settings
        if cmdsn != self.expcmdsn or itt in tasks or len(tasks) >= settings.max_tasks:
            return False
        read_limit, write_limit = self.fast_limits
        if flags == _READ_SIMPLE:
            if data or edtl > read_limit:
                return False
        elif (
            flags != _WRITE_SIMPLE
            or len(data) != edtl
            or edtl > write_limit
            or (edtl + self._buffered > settings.max_buffered_data_out)
        ):
            return False
        if self._logout_pdu is not None:
            return False
        result = lane(itt, lun, cdb, data, edtl)
        if result is None:
            return False
        expcmdsn = self.expcmdsn = (cmdsn + 1) & 0xFFFFFFFF  # sn_add, inline
        if isinstance(result, Started):  # a task as _start_command makes, dispatched
            task = tasks[itt] = Task(
                itt, cmdsn, self.decode_lun(lun), lun, cdb, flags == _READ_SIMPLE,
                flags == _WRITE_SIMPLE, edtl, delivered=True, dispatched=True,
            )  # fmt: skip
            if task.write:  # all its data came as immediate data (as _start_command)
                task.buffer = data
                task.unsolicited_end = task.unsolicited_received = task.received = edtl
                task.next_r2t_offset = edtl
                self._buffered += edtl
            return True
        statsn = self.statsn
        self.statsn = (statsn + 1) & 0xFFFFFFFF
        maxcmdsn = (expcmdsn + settings.cmd_window - 1) & 0xFFFFFFFF  # as maxcmdsn
        self._emit(
            command_end(
                itt, 0, 0, 0, statsn, expcmdsn, maxcmdsn, result, 0,
                self._header_digest, self._data_digest,
            ),
            BHS_LEN + len(result),
        )  # fmt: skip
        return True

    def fast_completed(self, itt: int, outcome: bytes | bytearray | CommandResult) -> None:
        """The server's backend ended the command the lane answered :data:`STARTED`
        for: ``outcome`` is its Data-In (a write: ``b""``), GOOD without residual, sent
        in one PDU with the StatSN of now (as :meth:`command_completed` would), or the
        response of a failure, sent as the full path sends it. Nothing is sent for a
        task aborted meanwhile (§4.2.3.3: no response for an aborted task); a logout
        waiting for it may then end."""
        task = self.tasks.get(itt)
        if task is None:  # never: a dispatched task stays until it completes
            return
        if not isinstance(outcome, (bytes, bytearray)):
            self.command_completed(task, outcome)
            return
        self._drop_task(task)
        # ``closing``: the connection is gone (every task aborted then) or logged out
        if not task.aborted and not self.closing:
            self._end_without_sense(task, 0, False, False, 0, outcome)
        self._maybe_finish_logout()
