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
  since every nexus was told (SBC-3 §4.10), a SANITIZE runs, the LU has ALUA port
  groups, or any persistent reservation registration, persistent reservation or
  SPC-2 reservation exists (SPC-4 §5.13);
* a WRITE to a write-protected LU (SBC-3 §4.11) or with the write cache off;
* the block range is empty, beyond the capacity or the MAXIMUM TRANSFER LENGTH, or
  its byte count differs from what the transport expects (``expected``: residuals);
* the backend is remote or has asynchronous I/O (RBD: started, not run inline);
* another command holds part of the range (COMPARE AND WRITE in a thread, a
  backend swap), or the backend raises anything: a medium error, or a read the
  kernel would block on (``RWF_NOWAIT``, :mod:`..storage.nowait`). A plain read or
  write is idempotent, so the full path doing it again is harmless.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from ..storage.nowait import MODE, RWF_NOWAIT, WouldBlock
from .logical_unit import LogicalUnit
from .opcodes import find_row
from .task import ItKey

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


def fast_io(
    luns: Mapping[int, LogicalUnit],
    key: ItKey,
    lun: int,
    cdb: bytes,
    data: bytes | bytearray | memoryview,
    expected: int,
) -> bytes | bytearray | None:
    """Run a READ or WRITE in the common state: the data read (a WRITE: ``b""``), the
    command then being GOOD with no residual; or None when it must take the full path
    (module doc), in which case nothing was done; WouldBlock when the kernel would
    block it (module doc). ``data``: a WRITE's Data-Out, all of it (``expected``
    bytes); ``key``: the I_T nexus (:func:`.task.it_key`)."""
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
        or lu.alua is not None
        or state.registrations
        or state.reservation is not None
        or state.spc2_holder is not None
        or (writing and ((cdb[1] & _FUA and length != 6) or lu.write_protected or not lu.mode.wce))
    ):
        return None
    size = lu.block_size
    nbytes = blocks * size
    if (
        not blocks
        or nbytes != expected
        or blocks > lu.max_transfer_blocks
        or (writing and len(data) != nbytes)
    ):
        return None
    ranges = lu.ranges
    span = ranges.try_hold(lba, blocks)
    if span is None:
        return None
    try:
        # read inside the hold: a backend swap (replace_backend) waits for it
        backend = lu.backend
        abilities = lu.abilities
        capacity = backend.size
        if (
            capacity != lu.known_size  # CAPACITY DATA CHANGED first, in the full path
            or lba + blocks > capacity // size
            or abilities.remote
            or abilities.aio is not None
        ):
            return None
        if writing:
            if "write" in abilities.nowait:
                MODE.flags = RWF_NOWAIT
            backend.write(lba * size, data)
            return _NO_DATA
        buf = bytearray(nbytes)
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
        ranges.release(span)
