"""Logical block provisioning (SBC-3 §4.7): WRITE SAME, UNMAP and GET LBA STATUS.

A thin-provisioned LU (``LogicalUnit.thin_provisioning``) reports LBPME=1 and
LBPRZ=1: UNMAP and WRITE SAME with the UNMAP bit hand the range to the
backend's ``unmap`` (a punched hole in a sparse file, which reads back as
zeros), and GET LBA STATUS asks the backend's ``allocated_ranges`` (SEEK_DATA /
SEEK_HOLE) which blocks are mapped. A resource-provisioned LU (a preallocated,
thick file) reports LBPME=1 and LBPRZ=1 too, but unmapping anchors: the backend's
``zero_range`` zeroes the range and keeps its allocation (SBC-4 §4.7.2.2), and
GET LBA STATUS reports what is not data as anchored. A fully provisioned LU refuses UNMAP
as an unsupported command, refuses the UNMAP bit of WRITE SAME, and reports every
block as mapped.
"""

from __future__ import annotations

import struct
from typing import Final

from .command import Command, be, check_lba_range, require
from .logical_unit import LogicalUnit
from .sbc import flush_medium, unmap_medium, write_medium
from .sense import Reason, ScsiError, param_field

#: Bytes written per backend call by WRITE SAME (the pattern repeated this far).
WRITE_SAME_CHUNK: Final = 1 << 20
#: Block Limits VPD (SBC-3 §6.5.3) values for WRITE SAME and UNMAP.
MAX_WRITE_SAME_BLOCKS: Final = 0xFFFF
MAX_UNMAP_LBA_COUNT: Final = 0xFFFFFFFF  # no limit: a hole punch costs the same at any size
MAX_UNMAP_DESCRIPTORS: Final = 4095  # as many as a 64 KiB parameter list holds

PROVISIONING_MAPPED: Final = 0x0
PROVISIONING_DEALLOCATED: Final = 0x1
PROVISIONING_ANCHORED: Final = 0x2


# -- WRITE SAME --------------------------------------------------------------------------


def write_same_data_length(cdb: bytes, block_size: int) -> int:
    """Data-Out of WRITE SAME: one block, none with NDOB (SBC-3 §5.42, SBC-4 §5.50)."""
    return 0 if len(cdb) == 16 and cdb[1] & 0x01 else block_size


def write_same(cmd: Command) -> None:
    """WRITE SAME(10) (SBC-3 §5.41) and WRITE SAME(16) (SBC-3 §5.42).

    One block of Data-Out (or zeros with NDOB) is written to every block of the
    range; NUMBER OF LOGICAL BLOCKS zero means "to the end of the medium"
    (WSNZ=0). With UNMAP=1 on a thin LU the range is deallocated instead, whatever
    the pattern (SBC-3 §4.7.3.4 lets the device server unmap; the blocks then read
    back as zeros, LBPRZ=1) - what LIO does and what libiscsi's
    WriteSame*.UnmapUntilEnd expects. ANCHOR is refused (ANC_SUP=0).
    """
    lu = cmd.unit
    cdb = cmd.cdb
    sixteen = len(cdb) == 16
    flags = cdb[1]
    ndob = sixteen and bool(flags & 0x01)  # NDOB
    unmap = bool(flags & 0x08)  # UNMAP
    require(not flags & 0x10, 1, 4)  # ANCHOR
    require(not unmap or lu.provisioning_managed, 1, 3)
    lba, blocks = (be(cdb, 2, 8), be(cdb, 10, 4)) if sixteen else (be(cdb, 2, 4), be(cdb, 7, 2))
    length_byte = 10 if sixteen else 7
    if blocks == 0:
        check_lba_range(lu.num_blocks, lba, 0)
        blocks = lu.num_blocks - lba
    else:
        check_lba_range(lu.num_blocks, lba, blocks)
    if MAX_WRITE_SAME_BLOCKS:
        require(blocks <= MAX_WRITE_SAME_BLOCKS, length_byte)
    size = lu.block_size
    if ndob:
        pattern = bytes(size)
    else:
        if len(cmd.data_out) != size:  # exactly one block of Data-Out (SBC-3 §5.41)
            raise ScsiError(Reason.INVALID_FIELD_IN_CDB)
        pattern = bytes(cmd.data_out)
    if unmap:
        deallocate(lu, lba, blocks)
    else:
        fill(lu, lba, blocks, pattern)
    if not lu.mode.wce:
        flush_medium(lu)


def fill(lu: LogicalUnit, lba: int, blocks: int, pattern: bytes) -> None:
    """Write ``pattern`` (one block) to ``blocks`` blocks from ``lba``, a chunk at a time."""
    size = lu.block_size
    per_chunk = max(1, WRITE_SAME_CHUNK // size)
    chunk = memoryview(pattern * min(per_chunk, blocks))
    done = 0
    while done < blocks:
        count = min(per_chunk, blocks - done)
        with lu.ranges.hold(lba + done, count):
            write_medium(lu, (lba + done) * size, chunk[: count * size])
        done += count


def deallocate(lu: LogicalUnit, lba: int, blocks: int) -> None:
    """Unmap a range: whole physical blocks are handed to the backend as holes; the
    backend zeroes the partial ones at the edges, so the whole range reads as zeros."""
    if blocks:
        with lu.ranges.hold(lba, blocks):
            unmap_medium(lu, lba * lu.block_size, blocks * lu.block_size)


def write_same_may_block(cdb: bytes) -> bool:
    """WRITE SAME can touch the whole medium: run it off the event loop."""
    return True


# -- UNMAP -------------------------------------------------------------------------------

_UNMAP_HEADER: Final = 8
_UNMAP_DESCRIPTOR: Final = 16


def unmap(cmd: Command) -> None:
    """UNMAP (SBC-3 §5.28): deallocate every range of the parameter list.

    All descriptors are checked (range and Block Limits) before any is applied.
    """
    lu = cmd.unit
    cdb = cmd.cdb
    require(not cdb[1] & 0x01, 1, 0)  # ANCHOR: ANC_SUP=0
    length = be(cdb, 7, 2)  # PARAMETER LIST LENGTH
    if length == 0:
        return
    if length < _UNMAP_HEADER or len(cmd.data_out) < length:
        raise ScsiError(Reason.PARAMETER_LIST_LENGTH_ERROR)
    data = bytes(cmd.data_out[:length])
    data_length = be(data, 0, 2)  # UNMAP DATA LENGTH
    descriptors_length = be(data, 2, 2)  # UNMAP BLOCK DESCRIPTOR DATA LENGTH
    if data_length + 2 > length or descriptors_length + _UNMAP_HEADER > length:
        raise ScsiError(Reason.PARAMETER_LIST_LENGTH_ERROR)
    count = descriptors_length // _UNMAP_DESCRIPTOR
    if count > MAX_UNMAP_DESCRIPTORS:
        raise ScsiError(Reason.INVALID_FIELD_IN_PARAMETER_LIST, field=param_field(2))
    ranges: list[tuple[int, int]] = []
    total = 0
    for index in range(count):
        at = _UNMAP_HEADER + index * _UNMAP_DESCRIPTOR
        lba = be(data, at, 8)  # UNMAP LOGICAL BLOCK ADDRESS
        blocks = be(data, at + 8, 4)  # NUMBER OF LOGICAL BLOCKS
        if blocks == 0:
            continue
        check_lba_range(lu.num_blocks, lba, blocks)
        total += blocks
        ranges.append((lba, blocks))
    if total > MAX_UNMAP_LBA_COUNT:
        raise ScsiError(Reason.INVALID_FIELD_IN_PARAMETER_LIST, field=param_field(8 + 8))
    for lba, blocks in coalesce(ranges):
        deallocate(lu, lba, blocks)
    if not lu.mode.wce:
        flush_medium(lu)


def coalesce(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sort (lba, blocks) ranges and merge the ones that overlap or touch, so the
    backend punches one hole per contiguous extent."""
    merged: list[tuple[int, int]] = []
    for lba, blocks in sorted(ranges):
        if merged and lba <= merged[-1][0] + merged[-1][1]:
            first, count = merged[-1]
            merged[-1] = (first, max(count, lba + blocks - first))
        else:
            merged.append((lba, blocks))
    return merged


def unmap_supported(lu: LogicalUnit) -> bool:
    """UNMAP exists only on provisioning-managed LUs (LBPU=1, SBC-3 §6.5.4)."""
    return lu.provisioning_managed


# -- GET LBA STATUS ------------------------------------------------------------------------

_LBA_STATUS_HEADER: Final = 8
_LBA_STATUS_DESCRIPTOR: Final = 16


def get_lba_status(cmd: Command) -> bytes:
    """GET LBA STATUS (SBC-3 §5.7): mapped and deallocated extents from the
    STARTING LOGICAL BLOCK ADDRESS on, as many as the allocation length holds.

    Extents come from the backend's ``allocated_ranges`` (byte ranges of data);
    the rest is deallocated on a thin LU and anchored on a resource-provisioned
    one (SEEK_DATA skips preallocated, unwritten extents, which is what an
    anchored LBA is: space reserved, contents zero). A backend without
    ``allocated_ranges``, or a fully provisioned LU, is mapped everywhere.
    """
    lu = cmd.unit
    cdb = cmd.cdb
    start = be(cdb, 2, 8)  # STARTING LOGICAL BLOCK ADDRESS
    allocation = be(cdb, 10, 4)  # ALLOCATION LENGTH
    check_lba_range(lu.num_blocks, start, 0)
    room = max(1, (allocation - _LBA_STATUS_HEADER) // _LBA_STATUS_DESCRIPTOR)
    extents = lba_extents(lu, start, room)
    body = b"".join(
        struct.pack(
            ">QIB3s",
            lba,  # LBA STATUS LOGICAL BLOCK ADDRESS
            count,  # NUMBER OF LOGICAL BLOCKS
            status & 0x0F,  # PROVISIONING STATUS
            b"",  # reserved
        )
        for lba, count, status in extents
    )
    return (
        struct.pack(
            ">II",
            len(body) + 4,  # PARAMETER DATA LENGTH (bytes after this field)
            0,  # reserved
        )
        + body
    )


def lba_extents(lu: LogicalUnit, start: int, limit: int) -> list[tuple[int, int, int]]:
    """Up to ``limit`` (lba, count, status) extents covering ``start`` onwards."""
    end = lu.num_blocks
    # thick: FIEMAP's written extents (a read of an anchored block must not make it
    # look mapped, which SEEK_DATA does once the zero pages are cached)
    finder = lu.abilities.allocated_ranges
    if lu.resource_provisioning:
        finder = lu.abilities.written_ranges or finder
    if not lu.provisioning_managed or finder is None:
        return [(start, end - start, PROVISIONING_MAPPED)]
    # What is not data: a hole (thin) or a preallocated, unwritten extent (thick)
    unmapped = PROVISIONING_DEALLOCATED if lu.thin_provisioning else PROVISIONING_ANCHORED
    size = lu.block_size
    out: list[tuple[int, int, int]] = []
    position = start
    window = max(1, (64 << 20) // size)  # ask the backend 64 MiB at a time
    while position < end and len(out) < limit:
        stop = min(end, position + window)
        mapped = [
            (offset // size, -(-(offset + length) // size))
            for offset, length in finder(position * size, (stop - position) * size)
        ]
        for first, last in mapped:
            first, last = max(first, position), min(last, stop)
            if first > position:
                _append(out, position, first - position, unmapped)
            if last > first:
                _append(out, first, last - first, PROVISIONING_MAPPED)
            position = max(position, last)
        if position < stop:
            _append(out, position, stop - position, unmapped)
        position = stop
    return out[:limit]


def _append(out: list[tuple[int, int, int]], lba: int, count: int, status: int) -> None:
    """Add an extent, merging it with the previous one when the status is the same."""
    if out and out[-1][2] == status and out[-1][0] + out[-1][1] == lba:
        first, previous, _ = out[-1]
        out[-1] = (first, previous + count, status)
    else:
        out.append((lba, count, status))
