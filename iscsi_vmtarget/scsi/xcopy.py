"""EXTENDED COPY (LID1) and RECEIVE COPY RESULTS (SPC-4 §6.4, §6.18): the copy
manager in the target copies blocks between LUs without the data crossing the wire.

Target descriptors are identification descriptors (type E4h) naming an LU by its
NAA designator (VPD 0x83); they are resolved only among ``cmd.luns``, the LUN map the
requesting initiator's ACL shows it (one :class:`~.target.ScsiTarget` per ACL): an LU
it cannot see is UNREACHABLE COPY TARGET even when its designator is known, and a
guest view answers only to the designator it reports (the original volume's, for a
snapshot the guest runs on), with the copy bounded by that view's capacity. Segment
descriptors are block-to-block (type 02h). The copy runs synchronously, in
chunks, each under the range locks of its source and destination, so the status
RECEIVE COPY RESULTS reports is always "completed".
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from .command import Command, be, require
from .logical_unit import LogicalUnit
from .sbc import read_medium, write_medium
from .sense import Reason, ScsiError, param_field
from .task import Nexus, it_key

OP_EXTENDED_COPY: Final = 0x83
OP_RECEIVE_COPY_RESULTS: Final = 0x84
SA_EXTENDED_COPY_LID1: Final = 0x00
SA_COPY_STATUS: Final = 0x00
SA_OPERATING_PARAMETERS: Final = 0x03

TARGET_IDENTIFICATION: Final = 0xE4  # identification descriptor target descriptor
SEGMENT_BLOCK_TO_BLOCK: Final = 0x02
IMPLEMENTED_DESCRIPTORS: Final = (SEGMENT_BLOCK_TO_BLOCK, TARGET_IDENTIFICATION)

MAX_TARGET_DESCRIPTORS: Final = 4
MAX_SEGMENT_DESCRIPTORS: Final = 64
_HEADER: Final = 16
_TARGET_LENGTH: Final = 32
_BLOCK_SEGMENT_LENGTH: Final = 28
MAX_DESCRIPTOR_LIST_LENGTH: Final = (
    MAX_TARGET_DESCRIPTORS * _TARGET_LENGTH + MAX_SEGMENT_DESCRIPTORS * _BLOCK_SEGMENT_LENGTH
)
MAX_SEGMENT_BLOCKS: Final = 0xFFFF  # BLOCK DEVICE NUMBER OF BLOCKS is a 16-bit field
COPY_CHUNK: Final = 1 << 20

LIST_ID_USAGE_HOLD: Final = 0b00
LIST_ID_USAGE_NO_HOLD: Final = 0b10
LIST_ID_USAGE_NONE: Final = 0b11

COPY_COMPLETED: Final = 0x01  # COPY MANAGER STATUS: completed without errors


@dataclass(frozen=True)
class _Target:
    lu: LogicalUnit | None  # None: NUL descriptor or an LU this target does not show


# -- EXTENDED COPY ------------------------------------------------------------------------


def extended_copy(cmd: Command) -> None:
    """EXTENDED COPY(LID1) (SPC-4 §6.4). Errors in the lists are ILLEGAL REQUEST;
    errors while copying a segment end the command with COPY ABORTED."""
    length = be(cmd.cdb, 10, 4)  # PARAMETER LIST LENGTH
    if length == 0:
        return
    if length < _HEADER or len(cmd.data_out) < length:
        raise ScsiError(Reason.PARAMETER_LIST_LENGTH_ERROR)
    data = bytes(cmd.data_out[:length])
    list_id = data[0]  # LIST IDENTIFIER
    usage = (data[1] >> 3) & 0x03  # LIST ID USAGE
    if usage == 0b01 or (usage == LIST_ID_USAGE_NONE and list_id != 0):
        raise ScsiError(Reason.INVALID_FIELD_IN_PARAMETER_LIST, field=param_field(1, 4))
    target_length = be(data, 2, 2)  # TARGET DESCRIPTOR LIST LENGTH
    segment_length = be(data, 8, 4)  # SEGMENT DESCRIPTOR LIST LENGTH
    inline_length = be(data, 12, 4)  # INLINE DATA LENGTH
    if target_length + segment_length > MAX_DESCRIPTOR_LIST_LENGTH:
        raise ScsiError(Reason.PARAMETER_LIST_LENGTH_ERROR)
    if _HEADER + target_length + segment_length + inline_length != length:
        raise ScsiError(Reason.PARAMETER_LIST_LENGTH_ERROR)
    if inline_length:
        raise ScsiError(Reason.INVALID_FIELD_IN_PARAMETER_LIST, field=param_field(12))
    targets = _parse_targets(cmd, data, _HEADER, _HEADER + target_length)
    segments = _parse_segments(data, _HEADER + target_length, length)
    processed = copied = 0
    for source, destination, blocks, src_lba, dst_lba in segments:
        copied += _copy_segment(targets, source, destination, blocks, src_lba, dst_lba)
        processed += 1
    if usage != LIST_ID_USAGE_NONE:
        _remember(cmd.unit, cmd.nexus, list_id, processed, copied)


def _parse_targets(cmd: Command, data: bytes, start: int, end: int) -> list[_Target]:
    """Target descriptors (SPC-4 §6.4.5): each 32 bytes, identification type only."""
    if (end - start) % _TARGET_LENGTH:
        raise ScsiError(Reason.PARAMETER_LIST_LENGTH_ERROR)
    count = (end - start) // _TARGET_LENGTH
    if count > MAX_TARGET_DESCRIPTORS:
        raise ScsiError(Reason.TOO_MANY_TARGET_DESCRIPTORS)
    targets = []
    for at in range(start, end, _TARGET_LENGTH):
        kind = data[at]  # DESCRIPTOR TYPE CODE
        if kind != TARGET_IDENTIFICATION:
            raise ScsiError(Reason.UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE, field=param_field(at))
        flags = data[at + 1]  # bits 7:6 were LU ID TYPE in SPC-3, obsolete in SPC-4: ignored
        if flags & 0x1F:  # PERIPHERAL DEVICE TYPE: only direct access (00h)
            raise ScsiError(Reason.INVALID_FIELD_IN_PARAMETER_LIST, field=param_field(at + 1, 4))
        if flags & 0x20:  # NUL: the descriptor names no device
            targets.append(_Target(None))
            continue
        block_length = be(data, at + 29, 3)  # DISK BLOCK LENGTH
        lu = _resolve(cmd, data[at + 4 : at + 28])
        if lu is not None and block_length not in (0, lu.block_size):
            raise ScsiError(Reason.INVALID_FIELD_IN_PARAMETER_LIST, field=param_field(at + 29))
        targets.append(_Target(lu))
    return targets


def _resolve(cmd: Command, designation: bytes) -> LogicalUnit | None:
    """The LU of this target whose NAA designator (VPD 0x83, association LU) matches."""
    designator_type = designation[1] & 0x0F  # DESIGNATOR TYPE
    association = (designation[1] >> 4) & 0x03  # ASSOCIATION
    size = designation[3]  # DESIGNATOR LENGTH
    if designator_type != 0x3 or association != 0 or size > 20:
        return None
    naa = bytes(designation[4 : 4 + size])
    for lu in cmd.luns.values():
        if lu.identity.naa == naa:
            return lu
    return None


_Segment = tuple[int, int, int, int, int]


def _parse_segments(data: bytes, start: int, end: int) -> list[_Segment]:
    """Segment descriptors (SPC-4 §6.4.6): block-to-block (02h) only."""
    segments: list[_Segment] = []
    at = start
    while at < end:
        if at + 4 > end:
            raise ScsiError(Reason.PARAMETER_LIST_LENGTH_ERROR)
        kind = data[at]  # DESCRIPTOR TYPE CODE
        size = 4 + be(data, at + 2, 2)  # DESCRIPTOR LENGTH
        if kind != SEGMENT_BLOCK_TO_BLOCK:
            raise ScsiError(Reason.UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE, field=param_field(at))
        if size != _BLOCK_SEGMENT_LENGTH or at + size > end:
            raise ScsiError(Reason.PARAMETER_LIST_LENGTH_ERROR)
        if len(segments) == MAX_SEGMENT_DESCRIPTORS:
            raise ScsiError(Reason.TOO_MANY_SEGMENT_DESCRIPTORS)
        segments.append(
            (
                be(data, at + 4, 2),  # SOURCE TARGET DESCRIPTOR INDEX
                be(data, at + 6, 2),  # DESTINATION TARGET DESCRIPTOR INDEX
                be(data, at + 10, 2),  # BLOCK DEVICE NUMBER OF BLOCKS
                be(data, at + 12, 8),  # SOURCE BLOCK DEVICE LOGICAL BLOCK ADDRESS
                be(data, at + 20, 8),  # DESTINATION BLOCK DEVICE LOGICAL BLOCK ADDRESS
            )
        )
        at += size
    return segments


def _copy_segment(
    targets: list[_Target], source: int, destination: int, blocks: int, src_lba: int, dst_lba: int
) -> int:
    """Copy one block-to-block segment; returns the bytes copied."""
    if source >= len(targets) or destination >= len(targets):
        raise ScsiError(Reason.UNREACHABLE_COPY_TARGET)
    src, dst = targets[source].lu, targets[destination].lu
    if src is None or dst is None:
        raise ScsiError(Reason.UNREACHABLE_COPY_TARGET)
    if src.block_size != dst.block_size:
        raise ScsiError(Reason.COPY_TARGET_DEVICE_NOT_REACHABLE)
    if src_lba + blocks > src.num_blocks or dst_lba + blocks > dst.num_blocks:
        raise ScsiError(Reason.COPY_TARGET_DEVICE_NOT_REACHABLE)
    if blocks == 0:
        return 0
    dst.check_writable()
    size = src.block_size
    per_chunk = max(1, COPY_CHUNK // size)
    starts = list(range(0, blocks, per_chunk))
    if src is dst and src_lba < dst_lba < src_lba + blocks:
        starts.reverse()  # overlapping forward move: copy from the end
    buf = bytearray(min(per_chunk, blocks) * size)
    for first in starts:
        count = min(per_chunk, blocks - first)
        view = memoryview(buf)[: count * size]
        with src.ranges.hold(src_lba + first, count):
            read_medium(src, (src_lba + first) * size, view)
        with dst.ranges.hold(dst_lba + first, count):
            write_medium(dst, (dst_lba + first) * size, view)
    return blocks * size


def _remember(lu: LogicalUnit, nexus: Nexus, list_id: int, segments: int, copied: int) -> None:
    """Keep the COPY STATUS of a finished copy for RECEIVE COPY RESULTS."""
    units, count = (0x00, copied) if copied <= 0xFFFFFFFF else (0x01, copied >> 10)
    status = struct.pack(
        ">IBHBI",
        8,  # AVAILABLE DATA
        COPY_COMPLETED,  # HDD=0, COPY MANAGER STATUS
        min(segments, 0xFFFF),  # SEGMENTS PROCESSED
        units,  # TRANSFER COUNT UNITS: bytes, or KiB
        count & 0xFFFFFFFF,  # TRANSFER COUNT
    )
    with lu.pr_lock:
        lu.copy_results.setdefault(it_key(nexus), {})[list_id] = status


# -- RECEIVE COPY RESULTS -------------------------------------------------------------------


def receive_copy_results(cmd: Command) -> bytes:
    """RECEIVE COPY RESULTS (SPC-4 §6.18): COPY STATUS and OPERATING PARAMETERS."""
    lu = cmd.unit
    action = cmd.cdb[1] & 0x1F  # SERVICE ACTION
    if action == SA_OPERATING_PARAMETERS:
        return operating_parameters(lu)
    list_id = cmd.cdb[2]  # LIST IDENTIFIER
    with lu.pr_lock:
        status = lu.copy_results.get(it_key(cmd.nexus), {}).get(list_id)
    require(status is not None, 2)
    assert status is not None
    return status


def operating_parameters(lu: LogicalUnit) -> bytes:
    """OPERATING PARAMETERS parameter data (SPC-4 §6.18.4, LID1)."""
    descriptors = bytes(IMPLEMENTED_DESCRIPTORS)
    body = struct.pack(
        ">B3sHHIIIII2sHBBBB3sB",
        0x01,  # SNLID: LIST ID USAGE 11b is supported
        b"",  # reserved
        MAX_TARGET_DESCRIPTORS,  # MAXIMUM TARGET DESCRIPTOR COUNT
        MAX_SEGMENT_DESCRIPTORS,  # MAXIMUM SEGMENT DESCRIPTOR COUNT
        MAX_DESCRIPTOR_LIST_LENGTH,  # MAXIMUM DESCRIPTOR LIST LENGTH
        MAX_SEGMENT_BLOCKS * lu.block_size,  # MAXIMUM SEGMENT LENGTH
        0,  # MAXIMUM INLINE DATA LENGTH
        0,  # HELD DATA LIMIT
        0,  # MAXIMUM STREAM DEVICE TRANSFER SIZE
        b"",  # reserved
        1,  # TOTAL CONCURRENT COPIES
        1,  # MAXIMUM CONCURRENT COPIES
        lu.block_size.bit_length() - 1,  # DATA SEGMENT GRANULARITY (log2)
        0,  # INLINE DATA GRANULARITY
        0,  # HELD DATA GRANULARITY
        b"",  # reserved
        len(descriptors),  # IMPLEMENTED DESCRIPTOR LIST LENGTH
    )
    body += descriptors  # the implemented descriptor type codes
    return struct.pack(">I", len(body)) + body  # AVAILABLE DATA


# -- Third-party Copy VPD page -------------------------------------------------------------

#: Supported commands: EXTENDED COPY(LID1); RECEIVE COPY RESULTS COPY STATUS, OPERATING PARAMETERS.
_SUPPORTED: Final = (
    (OP_EXTENDED_COPY, (SA_EXTENDED_COPY_LID1,)),
    (OP_RECEIVE_COPY_RESULTS, (SA_COPY_STATUS, SA_OPERATING_PARAMETERS)),
)


def third_party_copy_page(lu: LogicalUnit, nexus: Nexus) -> bytes:
    """Third-party Copy VPD page body (SPC-4 §7.8.17) with one Supported Commands
    third-party copy descriptor (§7.8.17.3)."""
    commands = b"".join(
        struct.pack(">BB", opcode, len(actions)) + bytes(actions)  # OPERATION CODE, SA LENGTH
        for opcode, actions in _SUPPORTED
    )
    payload = bytes([len(commands)]) + commands  # COMMANDS SUPPORTED LIST LENGTH, list
    payload += bytes(-len(payload) % 4)  # pad to a multiple of four bytes
    return (
        struct.pack(
            ">HH",
            0x0001,  # THIRD-PARTY COPY DESCRIPTOR TYPE: supported commands
            len(payload),  # THIRD-PARTY COPY DESCRIPTOR LENGTH
        )
        + payload
    )
