"""Commands that read and write a range as one indivisible step (SBC-3 §5.2, §5.9;
SBC-4 §5.48): COMPARE AND WRITE, ORWRITE(16) and WRITE ATOMIC(16).

Each holds the LU's range lock over its blocks for the whole read-modify-write,
and every other medium access takes the same lock, so no command can see or
make a half-done update. On a crash the file system decides what survives:
writes are all-or-nothing per 4 KiB page of the backing file, which is why
WRITE ATOMIC requires 4 KiB alignment and granularity (ATOMIC ALIGNMENT and
ATOMIC TRANSFER LENGTH GRANULARITY of the Block Limits VPD page).
"""

from __future__ import annotations

from typing import Final

from .command import Command, be, check_lba_range, require
from .logical_unit import LogicalUnit
from .sbc import check_transfer, first_difference, flush_medium, read_medium, write_medium
from .sense import Reason, ScsiError

#: MAXIMUM COMPARE AND WRITE LENGTH (Block Limits VPD byte 5, a one-byte field).
MAX_COMPARE_AND_WRITE_BLOCKS: Final = 255
#: MAXIMUM ATOMIC TRANSFER LENGTH in blocks (SBC-4 §6.6.4).
MAX_ATOMIC_TRANSFER_BLOCKS: Final = 2048


def _durable(cmd: Command, lu: LogicalUnit) -> None:
    """FUA, or a disabled write cache, makes the write durable before GOOD."""
    if cmd.cdb[1] & 0x08 or not lu.mode.wce:
        flush_medium(lu)


# -- COMPARE AND WRITE -------------------------------------------------------------------


def compare_and_write_length(cdb: bytes, block_size: int) -> int:
    """Data-Out of COMPARE AND WRITE: the verify data then the write data."""
    return 2 * cdb[13] * block_size


def compare_and_write(cmd: Command) -> None:
    """COMPARE AND WRITE (SBC-3 §5.2).

    The first half of the Data-Out is compared with the medium; only if every
    byte matches is the second half written. A mismatch ends with MISCOMPARE,
    MISCOMPARE DURING VERIFY OPERATION and the offset of the first differing
    byte in INFORMATION. The Data-Out must be exactly two times NUMBER OF
    LOGICAL BLOCKS blocks long.
    """
    lu = cmd.unit
    cdb = cmd.cdb
    lba = be(cdb, 2, 8)  # LOGICAL BLOCK ADDRESS
    blocks = cdb[13]  # NUMBER OF LOGICAL BLOCKS
    check_lba_range(lu.num_blocks, lba, blocks)
    require(blocks <= MAX_COMPARE_AND_WRITE_BLOCKS, 13)
    length = blocks * lu.block_size
    if len(cmd.data_out) != 2 * length:
        raise ScsiError(Reason.INVALID_FIELD_IN_CDB, field=None)
    if blocks == 0:
        return
    expected = cmd.data_out[:length]
    with lu.ranges.hold(lba, blocks):
        actual = bytearray(length)
        read_medium(lu, lba * lu.block_size, memoryview(actual))
        if actual != expected:
            raise ScsiError(
                Reason.MISCOMPARE_DURING_VERIFY, information=first_difference(actual, expected)
            )
        write_medium(lu, lba * lu.block_size, cmd.data_out[length:])
    _durable(cmd, lu)


def fua_may_block(cdb: bytes) -> bool:
    return bool(cdb[1] & 0x08)


# -- ORWRITE -----------------------------------------------------------------------------


def orwrite(cmd: Command) -> None:
    """ORWRITE(16) (SBC-3 §5.9): each block becomes its old contents OR the Data-Out."""
    lu = cmd.unit
    cdb = cmd.cdb
    lba = be(cdb, 2, 8)  # LOGICAL BLOCK ADDRESS
    blocks = be(cdb, 10, 4)  # TRANSFER LENGTH
    check_lba_range(lu.num_blocks, lba, blocks)
    check_transfer(lu, blocks, 10)
    data = cmd.data_out[: blocks * lu.block_size]
    if not len(data):
        return
    offset = lba * lu.block_size
    with lu.ranges.hold(lba, blocks):
        current = bytearray(len(data))
        read_medium(lu, offset, memoryview(current))
        merged = (int.from_bytes(current, "little") | int.from_bytes(data, "little")).to_bytes(
            len(data), "little"
        )
        write_medium(lu, offset, memoryview(merged))
    _durable(cmd, lu)


# -- WRITE ATOMIC ------------------------------------------------------------------------


def write_atomic_length(cdb: bytes, block_size: int) -> int:
    return be(cdb, 12, 2) * block_size


def write_atomic(cmd: Command) -> None:
    """WRITE ATOMIC(16) (SBC-4 §5.48): all of the blocks or none, in units of
    ATOMIC TRANSFER LENGTH GRANULARITY at multiples of ATOMIC ALIGNMENT (both one
    4 KiB allocation unit); ATOMIC BOUNDARY is not supported and must be zero."""
    lu = cmd.unit
    cdb = cmd.cdb
    lba = be(cdb, 2, 8)  # LOGICAL BLOCK ADDRESS
    boundary = be(cdb, 10, 2)  # ATOMIC BOUNDARY
    blocks = be(cdb, 12, 2)  # TRANSFER LENGTH
    check_lba_range(lu.num_blocks, lba, blocks)
    require(boundary == 0, 10)
    unit = lu.allocation_unit_blocks
    require(lba % unit == 0, 2)
    require(blocks % unit == 0 and blocks <= MAX_ATOMIC_TRANSFER_BLOCKS, 12)
    data = cmd.data_out[: blocks * lu.block_size]
    if not len(data):
        return
    with lu.ranges.hold(lba, blocks):
        write_medium(lu, lba * lu.block_size, data)
    _durable(cmd, lu)
