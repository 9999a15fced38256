"""The fast lane: a plain READ or WRITE of a logical unit in the common state, in one
function (issue 18).

A 4 KiB READ through :meth:`.target_device.ScsiTarget.submit` costs about 60 Python
calls in the SCSI layer alone (opcode row, CDB validation, the :class:`.command.Command`,
the handler, range lock objects, the response). Almost every command of a VM disk is
a READ or WRITE (6/10/12/16) of an LU with no unit attention, reservation, ALUA group
or sanitize in sight: :func:`fast_io` serves exactly those, with the same checks
done as plain comparisons, and answers None - nothing done, nothing changed - for
anything else, which then takes the full path and gets the sense data, residuals and
blocking behaviour the full path gives. The guard falls back when:

* the LUN has no LU, or the opcode is not a READ/WRITE (6/10/12/16);
* the CDB sets a bit the opcode's usage mask refuses (RDPROTECT/WRPROTECT, reserved
  bits, NACA: INVALID FIELD IN CDB), or is a WRITE with FUA (made durable in a
  worker thread); DPO and the group number are hints the full path ignores too, FUA
  on a READ needs no action (SBC-3 §5.8);
* a unit attention is queued for this I_T nexus (SAM-5 §5.14), the capacity changed
  since every nexus was told (SBC-3 §4.10), a SANITIZE runs, the LU's own target port
  group is not active (standby, transitioning: SPC-4 §5.15.2.4; an RBD gateway's
  LUs have ALUA groups, and the owner's is active/optimized), or any persistent
  reservation registration, persistent reservation or SPC-2 reservation exists
  (SPC-4 §5.13);
* a WRITE to a write-protected LU (SBC-3 §4.11) or with the write cache off;
* the block range is empty, beyond the capacity or the MAXIMUM TRANSFER LENGTH, or
  its byte count differs from what the transport expects (``expected``: residuals);
* the backend is remote without asynchronous I/O (run in a worker thread);
* another command holds part of the range (COMPARE AND WRITE in a thread, a
  backend swap), or the backend raises anything: a medium error, or a read the
  kernel would block on (``RWF_NOWAIT``, :mod:`..storage.nowait`). A plain read or
  write is idempotent, so the full path doing it again is harmless.

A backend with asynchronous I/O (:class:`~..storage.backend.AsyncIO`: RBD) is not
run inline but started (:func:`fast_start`), as the full path starts a
:class:`~.medium_transfer.MediumTransfer`: after the same guards, and also not while
a PERSISTENT RESERVE OUT holds the LU's reservation lock (the full path then runs the
command in a thread, :meth:`.target_device.ScsiTarget.may_block`). It holds its range
until the backend answers; a backend's failure ends the command as the full path's
does (:func:`.medium_transfer.failure`: MEDIUM ERROR sense).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Final

from ..storage.backend import BackendError
from ..storage.nowait import MODE, RWF_NOWAIT, WouldBlock
from .logical_unit import LogicalUnit
from .medium_transfer import failure
from .opcodes import find_row
from .task import ItKey, ScsiResponse

_READS: Final = (0x08, 0x28, 0xA8, 0x88)
_WRITES: Final = (0x0A, 0x2A, 0xAA, 0x8A)


def _spec(opcode: int) -> tuple[int, int, bool]:
    row = find_row(bytes((opcode,)))
    assert row is not None
    return row.cdb_length, row.reject_mask, opcode in _WRITES


#: opcode -> (CDB length, the opcode row's reject mask over bytes 1.., writes)
SPECS: Final = {op: _spec(op) for op in _READS + _WRITES}
_FUA: Final = 0x08
_NO_DATA: Final = b""


#: how a started command ended: a READ's data or a WRITE's ``b""`` (GOOD, no
#: residual), or the full path's CHECK CONDITION when the backend failed
Outcome = bytes | bytearray | ScsiResponse
Finished = Callable[[Outcome], None]
Data = bytes | bytearray | memoryview


def _hold(
    luns: Mapping[int, LogicalUnit], key: ItKey, lun: int, cdb: bytes, data: Data, expected: int
) -> tuple[LogicalUnit, int, int, bool, tuple[int, int]] | None:
    """The LU, LBA, block count, direction (True: a WRITE) and held range (to give
    back: ``lu.ranges.release``) of a command every guard before the range hold lets
    through (module doc), or None, nothing held."""
    spec = SPECS.get(cdb[0])
    lu = luns.get(lun)
    if spec is None or lu is None:
        return None
    length, reject, writing = spec
    if len(cdb) < length or int.from_bytes(cdb[1:length], "big") & reject:
        return None  # the full path names the field
    # LBA and TRANSFER LENGTH (SBC-3 §5): the layouts of parse_block_range, inline
    if length == 10:
        lba, blocks = int.from_bytes(cdb[2:6], "big"), (cdb[7] << 8) | cdb[8]
    elif length == 16:
        lba, blocks = int.from_bytes(cdb[2:10], "big"), int.from_bytes(cdb[10:14], "big")
    elif length == 12:
        lba, blocks = int.from_bytes(cdb[2:6], "big"), int.from_bytes(cdb[6:10], "big")
    else:  # 6: a 21-bit LBA, 0 blocks meaning 256; no FUA bit
        lba, blocks = int.from_bytes(cdb[1:4], "big") & 0x1FFFFF, cdb[4] or 256
    state = lu.reservations
    if (
        lu.attentions.get(key)
        or lu.sanitizing is not None
        or (lu.alua is not None and not lu.alua.active)
        or state.registrations
        or state.reservation is not None
        or state.spc2_holder is not None
        or (writing and ((cdb[1] & _FUA and length != 6) or lu.write_protected or not lu.mode.wce))
    ):
        return None
    nbytes = blocks * lu.block_size
    if (
        not blocks
        or nbytes != expected
        or blocks > lu.max_transfer_blocks
        or (writing and len(data) != nbytes)
    ):
        return None
    span = lu.ranges.try_hold(lba, blocks)
    return None if span is None else (lu, lba, blocks, writing, span)


def _fits(lu: LogicalUnit, lba: int, blocks: int) -> bool:
    """Inside the range hold (a backend swap, ``replace_backend``, waits for it): the
    capacity is the one every nexus was told (else CAPACITY DATA HAS CHANGED first, in
    the full path) and holds the range."""
    capacity = lu.backend.size
    return capacity == lu.known_size and lba + blocks <= capacity // lu.block_size


def fast_io(
    luns: Mapping[int, LogicalUnit], key: ItKey, lun: int, cdb: bytes, data: Data, expected: int
) -> bytes | bytearray | None:
    """Run a READ or WRITE in the common state: the data read (a WRITE: ``b""``), the
    command then being GOOD with no residual; or None when it must take the full path
    (module doc), in which case nothing was done; WouldBlock when the kernel would
    block it (module doc). ``data``: a WRITE's Data-Out, all of it (``expected``
    bytes); ``key``: the I_T nexus (:func:`.task.it_key`)."""
    held = _hold(luns, key, lun, cdb, data, expected)
    if held is None:
        return None
    lu, lba, blocks, writing, span = held
    try:
        abilities = lu.abilities
        if not _fits(lu, lba, blocks) or abilities.remote or abilities.aio is not None:
            return None
        backend = lu.backend
        size = lu.block_size
        if writing:
            if "write" in abilities.nowait:
                MODE.flags = RWF_NOWAIT
            backend.write(lba * size, data)
            return _NO_DATA
        buf = bytearray(blocks * size)
        if "read" in abilities.nowait:
            MODE.flags = RWF_NOWAIT
        backend.read_into(lba * size, memoryview(buf))
        return buf
    except WouldBlock:
        raise  # the caller runs it in a thread (trying inline again would double the I/O)
    except Exception:  # a medium error, a bug: the full path runs it again, reports it
        return None
    finally:
        MODE.flags = 0
        lu.ranges.release(span)


def fast_start(
    luns: Mapping[int, LogicalUnit], key: ItKey, lun: int, cdb: bytes, data: Data,
    expected: int, done: Finished,
) -> bool:  # fmt: skip
    """Start a READ or WRITE in the common state on a backend with asynchronous I/O
    (module doc): True once started, ``done(outcome)`` then being called exactly once
    from whatever thread the backend completes in, after the range is given back;
    False, nothing done, when it must take the full path (as :func:`fast_io`'s None;
    also for a backend without asynchronous I/O, and when the backend refuses to start
    it: the full path starts it again and reports that)."""
    held = _hold(luns, key, lun, cdb, data, expected)
    if held is None:
        return False
    lu, lba, blocks, writing, span = held
    ranges = lu.ranges
    aio = lu.abilities.aio
    # pr_lock: as ScsiTarget.may_block, the full path would run it in a thread
    if aio is None or lu.pr_lock.locked() or not _fits(lu, lba, blocks):
        ranges.release(span)
        return False
    offset = lba * lu.block_size

    def finished(outcome: bytes | BackendError | None) -> None:
        ranges.release(span)
        if isinstance(outcome, Exception):
            response = failure(lu, lba, writing, outcome)
            response.data_out_length = expected if writing else 0  # as the dispatcher's
            done(response)
        else:
            done(_NO_DATA if outcome is None else outcome)

    try:
        if writing:
            aio.start_write(offset, data, finished)
        else:
            aio.start_read(offset, expected, finished)
    except Exception:  # refused outright (done not called): the full path reports it
        ranges.release(span)
        return False
    return True
