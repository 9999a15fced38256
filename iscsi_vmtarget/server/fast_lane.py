"""The server's part of the fast lane (issue 18): joins the transport's half
(``iscsi/fast_lane.py``: the PDU) to the SCSI layer's (``scsi/fast_lane.py``: the
READ or WRITE), with the LUN decoded and masked and the command counted exactly as on
the full path (:meth:`.listener.ConnectionHandler._execute`).

Masking: the lane looks LUNs up in the session's own :class:`~..scsi.ScsiTarget`
(the initiator's view, built at login, :meth:`.registry.Registry.scsi_for`), with
:func:`.fabric.decode_lun`, as the full path does; a LUN it does not show takes the
full path, which answers LOGICAL UNIT NOT SUPPORTED.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from ..iscsi.fast_lane import FastLane
from ..iscsi.pdu import Payload
from ..scsi import ScsiTarget
from ..scsi.fast_lane import fast_io
from ..scsi.task import Nexus, it_key
from ..storage.nowait import WouldBlock
from . import fabric
from .metrics import Metrics


def session_lane(
    scsi: ScsiTarget,
    nexus: Nexus,
    metrics: Metrics,
    target_name: str,
    lun_names: Mapping[int, int],
    tsih: int,
    blocked: set[int],
) -> FastLane:
    """The lane of one logged-in session (``TargetConnection.fast_lane``). The ITT of
    a command the kernel would have blocked goes into ``blocked``: the full path, which
    then gets the command, must run it in a worker thread without trying it inline."""
    luns = scsi.luns  # the session's view: fixed for its lifetime, like its ScsiTarget
    key = it_key(nexus)
    record = metrics.record
    clock = time.perf_counter
    numbers: dict[bytes, int] = {}  # LUN field -> LUN, for the LUs the view shows

    def lane(
        itt: int, lun_field: bytes, cdb: bytes, data: Payload, expected: int
    ) -> bytes | bytearray | None:
        lun = numbers.get(lun_field)
        if lun is None:
            try:
                lun = fabric.decode_lun(lun_field)
            except ValueError:
                return None
            if lun not in luns:
                return None
            numbers[lun_field] = lun
        start = clock()
        try:
            result = fast_io(luns, key, lun, cdb, data, expected)
        except WouldBlock:  # the full path runs it in a thread (ConnectionHandler._execute)
            blocked.add(itt)
            return None
        except Exception:  # a bug, say in a backend's property: the full path reports it
            return None
        if result is not None:
            name = lun_names.get(lun)
            if name is not None:  # as ConnectionHandler._account
                record(target_name, name, tsih, cdb[0], True, expected, clock() - start)
        return result

    return lane
