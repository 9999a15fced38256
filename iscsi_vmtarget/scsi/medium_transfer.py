"""READ and WRITE started without waiting, on a backend with asynchronous I/O.

A remote backend (RBD) answers a read or write after a network round trip. Run
synchronously, each command holds a worker thread for that time; a backend with the
:class:`~..storage.backend.AsyncIO` ability can instead start the request and call
back when it completes. :meth:`.target_device.ScsiTarget.submit` runs every check
a command gets (unit attention, ALUA state, reservations, write protection, LBA
range, SBC-3 §5.8-5.11, §5.32-5.35) as for any other, and for a plain READ, or a
WRITE without FUA while the write cache is on, returns a :class:`MediumTransfer`
instead of touching the medium. The caller (the server's glue) starts it and, once
called back, takes its :meth:`~MediumTransfer.response`.

Atomicity against COMPARE AND WRITE and the others (SBC-3 §5.2) stays the range
lock's: :meth:`MediumTransfer.start` takes the range only when it is free at once
and keeps it until the backend answers; when another command holds part of it,
``start`` returns False and the caller runs :meth:`MediumTransfer.run`, the ordinary
waiting access, in a worker thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..storage.backend import BackendError
from .check_condition import check_condition
from .logical_unit import LogicalUnit
from .sense import Reason, ScsiError
from .task import ScsiResponse, Status

_log = logging.getLogger(__name__)


class MediumTransfer:
    """One checked READ (``data`` None) or WRITE (``data``: the Data-Out bytes to
    store) of ``blocks`` blocks at ``lba``, ready to start."""

    __slots__ = ("_outcome", "blocks", "data", "data_out_length", "lba", "lu")

    def __init__(self, lu: LogicalUnit, lba: int, blocks: int, data: memoryview | None) -> None:
        self.lu = lu
        self.lba = lba
        self.blocks = blocks
        self.data = data
        self.data_out_length = 0  # set by the dispatcher, as for a response
        self._outcome: bytes | bytearray | Exception | None = None

    @property
    def _offset(self) -> int:
        return self.lba * self.lu.block_size

    def start(self, done: Callable[[], None]) -> bool:
        """Start the backend's request; ``done()`` is called once it is over (from
        the backend's thread, or from here when it failed at once). False, with
        nothing started, when an overlapping command holds the range."""
        lu = self.lu
        aio = lu.abilities.aio
        assert aio is not None, "submit() only makes transfers for AsyncIO backends"
        span = lu.ranges.try_hold(self.lba, self.blocks)
        if span is None:
            return False

        def finished(outcome: bytes | Exception | None) -> None:
            lu.ranges.release(span)
            self._outcome = outcome
            done()

        try:
            if self.data is None:
                aio.start_read(self._offset, self.blocks * lu.block_size, finished)
            else:
                aio.start_write(self._offset, self.data, finished)
        except Exception as exc:  # refused before it started: answer as the backend would
            finished(exc)
        return True

    def run(self) -> None:
        """The access done the ordinary way: wait for the range, then read or write
        synchronously (in a worker thread). Never raises: see :meth:`response`."""
        lu = self.lu
        try:
            with lu.ranges.hold(self.lba, self.blocks):
                if self.data is None:
                    buf = bytearray(self.blocks * lu.block_size)
                    lu.backend.read_into(self._offset, memoryview(buf))
                    self._outcome = buf
                else:
                    lu.backend.write(self._offset, self.data)
        except Exception as exc:
            self._outcome = exc

    def response(self) -> ScsiResponse:
        """The command's completion: GOOD (with the data read), or CHECK CONDITION
        with MEDIUM ERROR sense when the backend failed (SBC-3 §4.14)."""
        outcome = self._outcome
        if isinstance(outcome, Exception):
            response = failure(self.lu, self.lba, self.data is not None, outcome)
        elif outcome is None:
            response = ScsiResponse(Status.GOOD)
        else:
            response = ScsiResponse(Status.GOOD, outcome)
        response.data_out_length = self.data_out_length
        return response


def failure(lu: LogicalUnit, lba: int, write: bool, exc: Exception) -> ScsiResponse:
    """The completion of a READ (``write`` False) or WRITE at ``lba`` whose medium
    access failed with ``exc``: CHECK CONDITION, MEDIUM ERROR sense (UNRECOVERED READ
    ERROR, WRITE ERROR; SBC-3 §4.14) for a backend's error, INTERNAL TARGET FAILURE for
    anything else (a bug: logged, never crashing the server). Also the fast lane's
    (:mod:`.fast_lane`)."""
    if isinstance(exc, (BackendError, OSError)):
        reason = Reason.WRITE_ERROR if write else Reason.UNRECOVERED_READ_ERROR
        return check_condition(lu, ScsiError(reason))
    _log.error("medium transfer at LBA %d failed: %r", lba, exc)
    return check_condition(lu, ScsiError(Reason.INTERNAL_TARGET_FAILURE))
