"""The SCSI target device: the LUNs one target shows, command dispatch, task management.

:meth:`ScsiTarget.execute` is SAM-5's Execute Command (§5.1): it checks the
LUN, reports a pending unit attention (§5.14), finds the opcode row, checks
the CDB against it and runs the handler, turning a raised
:class:`~.sense.ScsiError` into CHECK CONDITION with sense data in the format
the LU's control mode page asks for.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping

from ..storage.nowait import MODE, RWF_NOWAIT, WouldBlock
from .check_condition import check_condition
from .command import Command
from .logical_unit import LogicalUnit
from .medium_transfer import MediumTransfer
from .opcode_row import DataDirection, HandlerResult, OpcodeRow
from .opcodes import find_row, lookup, validate_cdb
from .pr import initiator_of
from .sense import Reason, ReservationConflict, ScsiError
from .task import (
    SUPPORTED_TMFS,
    Nexus,
    Remainder,
    ScsiResponse,
    Status,
    TmfFunction,
    TmfResult,
    it_key,
)

_log = logging.getLogger(__name__)
_EMPTY = memoryview(b"")


class ScsiTarget:
    """The logical units one SCSI target device shows, by LUN number."""

    def __init__(self, luns: Mapping[int, LogicalUnit]) -> None:
        self._luns: dict[int, LogicalUnit] = dict(luns)
        self._nexuses: set[tuple[str, str]] = set()

    @property
    def luns(self) -> Mapping[int, LogicalUnit]:
        return self._luns

    # -- I_T nexus lifecycle ------------------------------------------------------------

    def nexus_added(self, nexus: Nexus) -> None:
        """A new I_T nexus: each LU queues POWER ON, RESET, OR BUS DEVICE RESET
        OCCURRED for it once (SAM-5 §5.14, §6.3.1)."""
        key = it_key(nexus)
        self._nexuses.add(key)
        for lu in self._luns.values():
            lu.add_nexus(key)

    def nexus_removed(self, nexus: Nexus) -> None:
        key = it_key(nexus)
        self._nexuses.discard(key)
        for lu in self._luns.values():
            lu.remove_nexus(key)

    # -- commands -----------------------------------------------------------------------

    def may_block(self, cdb: bytes, lun: int | None = None) -> bool:
        """True if the command may fsync (SYNCHRONIZE CACHE, WRITE with FUA,
        WRITE AND VERIFY, a flushing STOP, or any write while the write cache
        is disabled), or reads or writes the medium of a remote backend (RBD: every
        read waits on the network), so the server should run it in a worker thread."""
        row = find_row(bytes(cdb))
        if row is None or len(cdb) < row.cdb_length:
            return False
        own = self._luns.get(lun) if lun is not None else None
        if (
            own is not None
            and own.abilities.remote
            and (row.writes_medium or row.reads_medium)
        ):  # unless :meth:`submit` makes it a MediumTransfer, started without waiting
            return not (
                row.startable
                and own.abilities.aio is not None
                and not row.may_block(bytes(cdb))
                and (own.mode.wce or not row.writes_medium)
                # a PERSISTENT RESERVE OUT holds it across a RADOS round trip (shared
                # reservations): the reservation check would wait, so not on the loop
                and not own.pr_lock.locked()
            )
        if row.may_block(bytes(cdb)):
            return True
        if not row.writes_medium:
            return False
        lus = [self._luns[lun]] if lun in self._luns else list(self._luns.values())
        return any(not lu.mode.wce for lu in lus)

    def execute(
        self,
        nexus: Nexus,
        lun: int,
        cdb: bytes | bytearray | memoryview,
        data_out: memoryview | bytes | bytearray | None,
    ) -> ScsiResponse:
        """Run one command to completion (synchronously) and return its status."""
        response = self._run(nexus, lun, cdb, data_out, inline=False)
        assert isinstance(response, ScsiResponse)
        return response

    def submit(
        self,
        nexus: Nexus,
        lun: int,
        cdb: bytes | bytearray | memoryview,
        data_out: memoryview | bytes | bytearray | None,
    ) -> ScsiResponse | MediumTransfer | BlockedCommand:
        """As :meth:`execute`, for a caller that must not block (the event loop), for
        the plain READ and WRITE (rows with ``startable``/``nowait_kind``) of an LU:

        * whose backend has asynchronous I/O (one :meth:`may_block` lets run here): the
          command comes back checked but unstarted, as a :class:`MediumTransfer` for
          the caller to start (:mod:`.medium_transfer`);
        * whose backend tries that kind of I/O without blocking
          (:class:`~..storage.backend.NowaitCapable`): its medium I/O runs in nowait
          mode, and when the kernel would block (pages not in the page cache, a
          throttled write) it comes back as a :class:`BlockedCommand` whose
          :meth:`~BlockedCommand.run` - in a thread where blocking is fine - does that
          I/O again, whole.

        Everything before the medium I/O (unit attention, reservations, write
        protection, range checks) happens once, here; a command refused by them never
        blocks. Between the two runs of a blocked command the range lock is not held:
        a write cut off part way may be seen half done by an overlapping command, as
        while any write is in flight (SAM-5 §8.6: SIMPLE tasks have no order among
        themselves)."""
        return self._run(nexus, lun, cdb, data_out, inline=True)

    def _run(
        self,
        nexus: Nexus,
        lun: int,
        cdb: bytes | bytearray | memoryview,
        data_out: memoryview | bytes | bytearray | None,
        inline: bool,
    ) -> ScsiResponse | MediumTransfer | BlockedCommand:
        raw = bytes(cdb)
        lu = self._luns.get(lun)
        row = find_row(raw)
        data_out_length = _described_data_out(row, raw, lu)
        response: ScsiResponse | MediumTransfer | BlockedCommand
        try:
            response = self._dispatch(nexus, lun, lu, raw, row, data_out, inline)
        except Exception as exc:
            response = _failure(lu, raw, lun, exc)
        response.data_out_length = data_out_length
        return response

    def _dispatch(
        self,
        nexus: Nexus,
        lun: int,
        lu: LogicalUnit | None,
        raw: bytes,
        row: OpcodeRow | None,
        data_out: memoryview | bytes | bytearray | None,
        inline: bool,
    ) -> ScsiResponse | MediumTransfer | BlockedCommand:
        if lu is None and (row is None or row.needs_lu):
            raise ScsiError(Reason.LOGICAL_UNIT_NOT_SUPPORTED)
        if lu is not None:
            lu.check_capacity()
            sanitizing = lu.sanitizing
            if sanitizing is not None and (row is None or not row.sanitize_exempt):
                raise sanitizing.error()  # NOT READY, SANITIZE IN PROGRESS (SBC-3 §4.11)
            if lu.alua is not None and row is not None:
                lu.alua.check(row.opcode, row.service_action)  # SPC-4 §5.15.2.4
            if row is None or not row.ua_exempt:
                attention = lu.pop_attention(it_key(nexus))
                if attention is not None:
                    raise ScsiError(attention)
        if row is None or (lu is not None and not row.supported(lu)):
            row = lookup(raw, lu)  # raises INVALID COMMAND OPERATION CODE or INVALID FIELD
        cdb = validate_cdb(row, raw)
        if lu is not None:
            _check_reservations(lu, nexus, row, cdb)
            if row.writes_medium:
                lu.check_writable()
        view = _EMPTY if data_out is None else memoryview(data_out)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        command = Command(nexus, lun, lu, cdb, view, self._luns, inline)
        kind = row.nowait_kind
        if inline and kind is not None and lu is not None and kind in lu.abilities.nowait:
            command.nowait = True
            MODE.flags = RWF_NOWAIT
            try:
                result = row.handler(command)
            except WouldBlock:  # rerun in a thread: the handler again, the checks not
                rerun = lambda: _respond(row, command, row.handler(command))  # noqa: E731
                return BlockedCommand(lu, raw, lun, rerun)
            finally:
                MODE.flags = 0
        else:
            result = row.handler(command)
        if isinstance(result, MediumTransfer):
            return result  # the Data-In is the transfer length exactly: nothing to trim
        return _respond(row, command, result)

    # -- task management ------------------------------------------------------------------

    def task_management(self, nexus: Nexus, function: TmfFunction, lun: int) -> TmfResult:
        """The SCSI side of a task management function (SAM-5 §7).

        Aborting tasks is the transport's work; here LOGICAL UNIT RESET and
        TARGET RESET reset the LUs (unit attentions, default mode pages; on every
        gateway of a shared LU), and the other functions only check that the LUN
        exists. A function not in :data:`SUPPORTED_TMFS` is FUNCTION REJECTED
        (SAM-5 §7.1).
        """
        result, remainder = self.begin_task_management(nexus, function, lun)
        if remainder is not None:
            remainder()
        return result

    def begin_task_management(
        self, nexus: Nexus, function: TmfFunction, lun: int
    ) -> tuple[TmfResult, Remainder | None]:
        """:meth:`task_management` without waiting for the other gateways of shared
        LUs: its result once the returned :data:`Remainder` (None: nothing left) ran."""
        if function not in SUPPORTED_TMFS:
            return TmfResult.FUNCTION_REJECTED, None
        if function is TmfFunction.TARGET_RESET:
            remainders = [unit.begin_reset(Reason.POWER_ON_RESET) for unit in self._luns.values()]
            return TmfResult.FUNCTION_COMPLETE, _all_of(remainders)
        lu = self._luns.get(lun)
        if lu is None:
            return TmfResult.INCORRECT_LOGICAL_UNIT_NUMBER, None
        if function is TmfFunction.LOGICAL_UNIT_RESET:
            return TmfResult.FUNCTION_COMPLETE, lu.begin_reset(Reason.BUS_DEVICE_RESET)
        return TmfResult.FUNCTION_COMPLETE, None


def _all_of(remainders: list[Remainder | None]) -> Remainder | None:
    """One remainder running each of ``remainders`` at the same time (a gateway that
    does not answer holds a TARGET RESET up once, not once per LU); None when there is
    none."""
    left = [r for r in remainders if r is not None]
    if len(left) <= 1:
        return left[0] if left else None

    def run() -> None:
        others = [threading.Thread(target=r, name="tmf-remainder") for r in left[1:]]
        for thread in others:
            thread.start()
        left[0]()
        for thread in others:
            thread.join()

    return run


def _respond(row: OpcodeRow, command: Command, result: HandlerResult) -> ScsiResponse:
    """A handler's result as a response, its Data-In cut to what the CDB asked for."""
    if isinstance(result, ScsiResponse):
        response = result
    else:
        response = ScsiResponse(Status.GOOD, b"" if result is None else result)
    if row.direction is DataDirection.IN:
        lu = command.lu
        limit = row.transfer_length(command.cdb, lu.block_size if lu else 512)
        if len(response.data_in) > limit:
            response.data_in = memoryview(response.data_in)[:limit]
    return response


def _failure(lu: LogicalUnit | None, raw: bytes, lun: int, exc: Exception) -> ScsiResponse:
    """The status a command that raised ends with."""
    if isinstance(exc, ScsiError):
        return check_condition(lu, exc)
    if isinstance(exc, ReservationConflict):
        return ScsiResponse(Status.RESERVATION_CONFLICT)
    # a bug or an unexpected backend failure: never crash the server
    _log.error("command %s on LUN %d failed", raw[:1].hex(), lun, exc_info=exc)
    return check_condition(lu, ScsiError(Reason.INTERNAL_TARGET_FAILURE))


class BlockedCommand:
    """A command whose nowait medium I/O the kernel would have blocked
    (:meth:`ScsiTarget.submit`): :meth:`run` completes it, blocking."""

    __slots__ = ("_lu", "_lun", "_raw", "_rerun", "data_out_length")

    def __init__(
        self, lu: LogicalUnit, raw: bytes, lun: int, rerun: Callable[[], ScsiResponse]
    ) -> None:
        self._lu, self._raw, self._lun = lu, raw, lun
        self._rerun = rerun
        self.data_out_length = 0  # set by the dispatcher, as for a response

    def run(self) -> ScsiResponse:
        """The handler again, whole and blocking (in a worker thread): the checks
        before it ran once, in :meth:`ScsiTarget.submit`."""
        try:
            response = self._rerun()
        except Exception as exc:
            response = _failure(self._lu, self._raw, self._lun, exc)
        response.data_out_length = self.data_out_length
        return response


def _check_reservations(lu: LogicalUnit, nexus: Nexus, row: OpcodeRow, cdb: bytes) -> None:
    """RESERVATION CONFLICT if an SPC-2 or persistent reservation held through
    another I_T nexus forbids this command (SPC-4 §5.13.1, SPC-2 §5.5.1)."""
    state = lu.reservations
    if state.reservation is None and state.spc2_holder is None:  # the common case, no lock
        return
    relaxed = row.pr_relaxed is not None and row.pr_relaxed(cdb)
    with lu.pr_lock:
        state.check_access(initiator_of(nexus), row.pr_policy, row.spc2_exempt, relaxed)


def _described_data_out(row: OpcodeRow | None, cdb: bytes, lu: LogicalUnit | None) -> int:
    """The Data-Out byte count the CDB describes, for the transport's residuals."""
    if row is None or row.direction is not DataDirection.OUT or len(cdb) < row.cdb_length:
        return 0
    return row.transfer_length(cdb[: row.cdb_length], lu.block_size if lu else 512)

