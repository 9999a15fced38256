"""Block commands (SBC-3 §5): capacity, read, write, verify, cache and start/stop.

Data path: a READ allocates one bytearray of the transfer size and has the
backend fill it through a memoryview; a WRITE hands the backend a memoryview
slice of the Data-Out buffer. No payload byte is copied on the way.

Short or long Data-Out (the transport's expected length differs from the
CDB's): we write exactly the bytes that arrived, up to what the CDB
describes, at the CDB's LBA, and complete with GOOD. Bytes the initiator did
not send are not written; the transport reports the residual (FCP-4 §9.4.2
option a, which libiscsi's ``iSCSIResiduals`` tests check byte by byte).
"""

from __future__ import annotations

import struct
from typing import Final

from ..storage.backend import BackendError
from ..storage.nowait import MODE
from .command import Command, check_lba_range, parse_block_range, require
from .logical_unit import LogicalUnit
from .medium_transfer import MediumTransfer
from .sense import Reason, ScsiError

_COMPARE_CHUNK: Final = 4096
_VERIFY_CHUNK_BLOCKS: Final = 256
#: POWER CONDITION values of START STOP UNIT that SBC-3 §5.25 defines (table 62).
_POWER_CONDITIONS: Final = frozenset({0x0, 0x1, 0x2, 0x3, 0x7, 0xA, 0xB})


# -- medium access: backend failures become MEDIUM ERROR sense -----------------------


def read_medium(lu: LogicalUnit, offset: int, buf: memoryview) -> None:
    try:
        lu.backend.read_into(offset, buf)
    except (BackendError, OSError) as exc:
        raise ScsiError(Reason.UNRECOVERED_READ_ERROR) from exc


def write_medium(lu: LogicalUnit, offset: int, data: memoryview) -> None:
    try:
        lu.backend.write(offset, data)
    except (BackendError, OSError) as exc:
        raise ScsiError(Reason.WRITE_ERROR) from exc


def unmap_medium(lu: LogicalUnit, offset: int, length: int) -> None:
    """Unmap a byte range (SBC-4 §4.7.3): a thin LU deallocates it (the backend
    punches a hole), a resource-provisioned one anchors it (zeroed in place, its
    allocation kept). Either way it reads back as zeros (LBPRZ=1)."""
    try:
        if lu.thin_provisioning:
            lu.backend.unmap(offset, length)
        else:  # LogicalUnit made sure a resource-provisioned LU's backend has it
            zero = lu.abilities.zero_range
            assert zero is not None
            zero(offset, length)
    except (BackendError, OSError) as exc:
        raise ScsiError(Reason.WRITE_ERROR) from exc


def flush_medium(lu: LogicalUnit) -> None:
    try:
        lu.backend.flush()
    except (BackendError, OSError) as exc:
        raise ScsiError(Reason.WRITE_ERROR) from exc


def check_transfer(lu: LogicalUnit, blocks: int, length_byte: int) -> None:
    """TRANSFER LENGTH above the Block Limits MAXIMUM TRANSFER LENGTH (SBC-3 §6.5.3)."""
    require(blocks <= lu.max_transfer_blocks, length_byte)


# Old private names, kept for the handlers below.
_read_medium = read_medium
_write_medium = write_medium
_flush = flush_medium
_check_transfer = check_transfer


def _first_difference(actual: bytes | bytearray, expected: memoryview) -> int:
    for start in range(0, len(expected), _COMPARE_CHUNK):
        end = min(start + _COMPARE_CHUNK, len(expected))
        if actual[start:end] != expected[start:end]:
            for index in range(start, end):
                if actual[index] != expected[index]:
                    return index
    return len(expected)


def first_difference(actual: bytes | bytearray, expected: memoryview) -> int:
    """Offset of the first byte where ``actual`` and ``expected`` differ."""
    return _first_difference(actual, expected)


def _compare(lu: LogicalUnit, offset: int, expected: memoryview, base: int = 0) -> None:
    """Byte-by-byte comparison with the medium; MISCOMPARE with INFORMATION set to
    the offset of the first differing byte (SBC-3 §5.27)."""
    actual = bytearray(len(expected))
    size = lu.block_size
    with lu.ranges.hold(offset // size, -(-len(expected) // size)):  # as a READ does
        _read_medium(lu, offset, memoryview(actual))
    if actual != expected:
        raise ScsiError(
            Reason.MISCOMPARE_DURING_VERIFY,
            information=base + _first_difference(actual, expected),
        )


# -- READ CAPACITY ---------------------------------------------------------------------


def read_capacity10(cmd: Command) -> bytes:
    """READ CAPACITY(10) (SBC-3 §5.15); all ones when the last LBA needs 64 bits."""
    lu = cmd.unit
    last = max(lu.num_blocks - 1, 0)
    return struct.pack(
        ">II",
        min(last, 0xFFFFFFFF),  # RETURNED LOGICAL BLOCK ADDRESS
        lu.block_size,  # LOGICAL BLOCK LENGTH IN BYTES
    )


def read_capacity16(cmd: Command) -> bytes:
    """READ CAPACITY(16) (SBC-3 §5.16): no protection information; LBPME and
    LBPRZ set on a thin- or resource-provisioned LU (unmapped blocks read as zeros)."""
    lu = cmd.unit
    thin = 0xC000 if lu.provisioning_managed else 0x0000
    return struct.pack(
        ">QIBBH16s",
        max(lu.num_blocks - 1, 0),  # RETURNED LOGICAL BLOCK ADDRESS
        lu.block_size,  # LOGICAL BLOCK LENGTH IN BYTES
        0x00,  # P_TYPE=0, PROT_EN=0
        lu.blocks_per_physical_block.bit_length() - 1,  # P_I_EXPONENT=0, LBPPBE
        thin,  # LBPME, LBPRZ, LOWEST ALIGNED LOGICAL BLOCK ADDRESS=0
        b"",  # reserved
    )


# -- READ / WRITE ------------------------------------------------------------------------


def read(cmd: Command) -> bytearray | MediumTransfer | None:
    """READ(6/10/12/16) (SBC-3 §5.8-5.11). DPO and FUA need no action: reads
    come from the backend, which is coherent with every completed write. Where the
    caller can start it (``cmd.startable``) on a backend with asynchronous I/O, the
    read is returned unstarted (:mod:`.medium_transfer`).

    Run in nowait mode (``ScsiTarget.submit``), READ and WRITE check again
    inside their range hold that the backend honours it: the dispatcher looked before
    the hold, and a backend swap (``LogicalUnit.replace_backend``) may have put a
    copy-on-write chain, which must never be cut off, in its place meanwhile."""
    lu = cmd.unit
    lba, blocks, length_byte = parse_block_range(cmd.cdb)
    check_lba_range(lu.num_blocks, lba, blocks)
    _check_transfer(lu, blocks, length_byte)
    if blocks == 0:
        return None
    if cmd.startable and lu.abilities.aio is not None:
        return MediumTransfer(lu, lba, blocks, None)
    buf = bytearray(blocks * lu.block_size)
    with lu.ranges.hold(lba, blocks):
        if cmd.nowait and "read" not in lu.abilities.nowait:  # swapped (a live snapshot)
            MODE.flags = 0
        _read_medium(lu, lba * lu.block_size, memoryview(buf))
    return buf


def _write_checked(cmd: Command, lu: LogicalUnit) -> tuple[int, int, memoryview]:
    """Range-check a write: its LBA, block count and the Data-Out bytes to store
    (those received, up to what the CDB describes: see module doc)."""
    lba, blocks, length_byte = parse_block_range(cmd.cdb)
    check_lba_range(lu.num_blocks, lba, blocks)
    _check_transfer(lu, blocks, length_byte)
    return lba, blocks, cmd.data_out[: blocks * lu.block_size]


def _write_received(cmd: Command, lu: LogicalUnit) -> tuple[int, memoryview]:
    """Range-check a write and store the Data-Out bytes received."""
    lba, blocks, data = _write_checked(cmd, lu)
    offset = lba * lu.block_size
    if len(data):
        with lu.ranges.hold(lba, blocks):
            if cmd.nowait and "write" not in lu.abilities.nowait:  # see read()
                MODE.flags = 0
            _write_medium(lu, offset, data)
    return offset, data


def write(cmd: Command) -> MediumTransfer | None:
    """WRITE(6/10/12/16) (SBC-3 §5.32-5.35). FUA=1, or a disabled write cache
    (WCE=0), makes the data durable before GOOD; DPO is a hint we ignore. Without
    either, where the caller can start it (``cmd.startable``) on a backend with
    asynchronous I/O, the write is returned unstarted (:mod:`.medium_transfer`)."""
    lu = cmd.unit
    fua = len(cmd.cdb) > 6 and bool(cmd.cdb[1] & 0x08)  # FUA (WRITE(6) has none)
    if cmd.startable and lu.abilities.aio is not None and not fua and lu.mode.wce:
        lba, blocks, data = _write_checked(cmd, lu)
        return MediumTransfer(lu, lba, blocks, data) if len(data) else None
    _, data = _write_received(cmd, lu)
    if len(data) and (fua or not lu.mode.wce):
        _flush(lu)


def write_and_verify(cmd: Command) -> None:
    """WRITE AND VERIFY(10/12/16) (SBC-3 §5.36-5.38): write, make it durable (the
    verification is of the medium), then with BYTCHK=1 compare it byte by byte."""
    lu = cmd.unit
    offset, data = _write_received(cmd, lu)
    if not len(data):
        return
    _flush(lu)
    if cmd.cdb[1] & 0x02:  # BYTCHK
        _compare(lu, offset, data)


def verify(cmd: Command) -> None:
    """VERIFY(10/12/16) (SBC-3 §5.27-5.29).

    BYTCHK 00b: only the range is checked (the medium is always readable).
    BYTCHK 01b: the Data-Out is compared with the medium. BYTCHK 11b: one block
    of Data-Out is compared with every block of the range. 10b is reserved.
    """
    lu = cmd.unit
    cdb = cmd.cdb
    bytchk = (cdb[1] >> 1) & 0x03  # BYTCHK
    require(bytchk != 0b10, 1, 2)
    lba, blocks, length_byte = parse_block_range(cdb)
    check_lba_range(lu.num_blocks, lba, blocks)
    if bytchk == 0b00 or blocks == 0:
        return
    size = lu.block_size
    if bytchk == 0b01:
        _check_transfer(lu, blocks, length_byte)
        _compare(lu, lba * size, cmd.data_out[: blocks * size])
        return
    pattern = cmd.data_out[:size]
    for first in range(0, blocks, _VERIFY_CHUNK_BLOCKS):
        count = min(_VERIFY_CHUNK_BLOCKS, blocks - first)
        if len(pattern) < size:  # short Data-Out: compare what arrived of each block
            for block in range(count):
                _compare(lu, (lba + first + block) * size, pattern, (first + block) * size)
        else:
            expected = memoryview(bytes(pattern) * count)
            _compare(lu, (lba + first) * size, expected, first * size)


# -- cache and power ----------------------------------------------------------------------


def synchronize_cache(cmd: Command) -> None:
    """SYNCHRONIZE CACHE(10/16) (SBC-3 §5.22-5.23): range checked, then the whole
    backend is flushed (NUMBER OF LOGICAL BLOCKS 0 means "to the end"). IMMED is
    accepted; we complete after the flush either way."""
    lu = cmd.unit
    lba, blocks, _ = parse_block_range(cmd.cdb)
    check_lba_range(lu.num_blocks, lba, blocks)
    _flush(lu)


def pre_fetch(cmd: Command) -> None:
    """PRE-FETCH(10/16) (SBC-3 §5.6-5.7): range checked; GOOD (not CONDITION MET),
    since we keep no cache of our own to guarantee the blocks will stay in."""
    lu = cmd.unit
    lba, blocks, _ = parse_block_range(cmd.cdb)
    check_lba_range(lu.num_blocks, lba, blocks)


def start_stop_unit(cmd: Command) -> None:
    """START STOP UNIT (SBC-3 §5.25). The medium is not removable, so LOEJ=1 is
    refused; a stop with NO_FLUSH=0 flushes; power conditions are accepted."""
    lu = cmd.unit
    control = cmd.cdb[4]
    power_condition = control >> 4  # POWER CONDITION
    require(power_condition in _POWER_CONDITIONS, 4, 7)
    require(not control & 0x02, 4, 1)  # LOEJ
    if power_condition == 0 and not control & 0x01 and not control & 0x04:  # START, NO_FLUSH
        _flush(lu)


def start_stop_allowed_under_reservation(cdb: bytes) -> bool:
    """START STOP UNIT with START=1 and POWER CONDITION=0 is allowed for every I_T
    nexus under a persistent reservation (SBC-3 §4.17, table 13)."""
    return cdb[4] >> 4 == 0 and bool(cdb[4] & 0x01)


def prevent_allow(cmd: Command) -> None:
    """PREVENT ALLOW MEDIUM REMOVAL (SBC-3 §5.5): the medium is not removable
    (RMB=0), so there is nothing to lock; PREVENT 00b-11b are accepted."""
    cmd.unit  # noqa: B018 - the LU must exist


def prevent_allows_removal(cdb: bytes) -> bool:
    """PREVENT=00b is allowed under any reservation (SBC-3 table 13)."""
    return cdb[4] & 0x03 == 0


#: DEFECT LIST FORMAT values SBC-3 defines (table 37); 111b is reserved.
_DEFECT_FORMATS: Final = frozenset(range(7))


def read_defect_data(cmd: Command) -> bytes:
    """READ DEFECT DATA(10/12) (SBC-3 §5.12, §5.13): a file has no grown or primary
    defects, so the list is empty, in the format that was asked for."""
    cdb = cmd.cdb
    cmd.unit  # noqa: B018
    at = 2 if len(cdb) == 10 else 1  # the flags are in byte 2 of (10), byte 1 of (12)
    plist = cdb[at] & 0x10  # REQ_PLIST
    glist = cdb[at] & 0x08  # REQ_GLIST
    list_format = cdb[at] & 0x07  # DEFECT LIST FORMAT
    require(list_format in _DEFECT_FORMATS, at, 2)
    flags = plist | glist | list_format  # PLISTV, GLISTV (same bits), DEFECT LIST FORMAT
    if len(cdb) == 10:
        return struct.pack(
            ">BBH",
            0x00,  # reserved
            flags,  # reserved, PLISTV, GLISTV, DEFECT LIST FORMAT
            0,  # DEFECT LIST LENGTH
        )
    return struct.pack(
        ">BBHI",
        0x00,  # reserved
        flags,  # reserved, PLISTV, GLISTV, DEFECT LIST FORMAT
        0,  # GENERATION CODE
        0,  # DEFECT LIST LENGTH
    )


def stop_flushes(cdb: bytes) -> bool:
    """Whether START STOP UNIT will flush (used by ``may_block``)."""
    return cdb[4] >> 4 == 0 and not cdb[4] & 0x05
