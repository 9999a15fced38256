"""Trying a file read or write without blocking: ``preadv2``/``pwritev2`` with
``RWF_NOWAIT`` (Linux 4.14+).

An event loop can serve a page-cached read or a buffered write inline, cheaper than a
thread hand-off, but must not stall on a read of pages not in the page cache or on a
write the kernel throttles (dirty-page balancing). In nowait mode a backend that
honours it (:class:`~.backend.NowaitCapable`) asks the kernel with ``RWF_NOWAIT``
and raises :class:`WouldBlock` when the kernel says the call would block (EAGAIN, or
a short count followed by EAGAIN); the caller then runs the same I/O again where
blocking is fine (a worker thread). The mode is per thread (:data:`MODE`), turned on
around one call, so I/O in every other thread keeps blocking as usual.

File systems that do not support ``RWF_NOWAIT`` for an operation answer EOPNOTSUPP:
ext4 for every buffered write (Linux 6.18), tmpfs for reads too. A backend then does
that operation blocking, as without nowait mode, and never asks again.

Writes are not tried nowait at all (:data:`NOWAIT_WRITES`): where the kernel takes
them (XFS), it also refuses one whenever the file's timestamps need an update, about
once per clock tick, not only when it throttles. Measured through the server on XFS
(issue 18), 7-14% of 4 KiB writes at QD1 then went to a worker thread and the target
CPU per write rose 20-40%; a blocking write held up by the timestamp update costs
microseconds. So writes stay inline and blocking, as before; reads, which only the
disk holds up, are tried nowait.
"""

from __future__ import annotations

import os
import threading
from typing import Final

from ..errors import IscsiVmtargetError

#: 0 where the platform has no RWF_NOWAIT: nowait mode then changes nothing
RWF_NOWAIT: Final = getattr(os, "RWF_NOWAIT", 0)

#: Try buffered writes with RWF_NOWAIT too (module doc: measured, not worth it).
NOWAIT_WRITES: Final = False

#: Test seam: "read", "write" or "read,write" makes nowait I/O of that kind refuse
#: as a kernel that would block does (a write after writing its first half), whether
#: or not the file system supports RWF_NOWAIT, and writes whether or not they are tried
#: nowait (:data:`NOWAIT_WRITES`): the layers above stay tested for a backend that
#: does refuse them. Throttling cannot be provoked reliably.
REFUSE_ENV: Final = "ISCSI_VMTARGET_NOWAIT_REFUSE"


class WouldBlock(IscsiVmtargetError):
    """The kernel would have blocked this I/O. Nothing failed (not a BackendError:
    no sense data may come of it): run the same I/O again where blocking is fine.
    A write may be partly done; rerun it whole (a plain write is idempotent)."""


#: the kinds of nowait I/O the :data:`REFUSE_ENV` seam refuses (tests may replace it)
refused: frozenset[str] = frozenset(
    kind for kind in os.environ.get(REFUSE_ENV, "").split(",") if kind
)


class _Mode(threading.local):
    #: RWF_NOWAIT while this thread is in nowait mode, else 0 (the class default)
    flags = 0


#: This thread's mode, read by backends on every I/O. A caller turns nowait on with
#: ``MODE.flags = RWF_NOWAIT`` and back off with ``MODE.flags = 0`` in a ``finally``
#: (two attribute stores: a context manager would cost several times that per command).
MODE: Final = _Mode()
