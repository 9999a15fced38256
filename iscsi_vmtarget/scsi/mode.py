"""MODE SENSE(6/10) and MODE SELECT(6/10) (SPC-4 §6.9-6.12) over the pages of
:mod:`.mode_pages`.

MODE SENSE with PC=changeable reports the mask,
MODE SELECT accepts a change only where the mask allows it. Nothing is saved
(PC=saved gives SAVING PARAMETERS NOT SUPPORTED), so a logical unit reset puts
the defaults back.
"""

from __future__ import annotations

import struct

from .command import Command, be, require
from .logical_unit import LogicalUnit
from .mode_pages import (
    ALL_PAGES,
    ALL_SUBPAGES,
    MODE_PAGES,
    PAGES_BY_CODE,
    PC_CHANGEABLE,
    PC_SAVED,
    ModePageDef,
)
from .sense import Reason, ScsiError, cdb_field, param_field
from .task import it_key


def _block_descriptor(lu: LogicalUnit, long_lba: bool, pc: int) -> bytes:
    """Mode parameter block descriptor (SBC-3 §6.4.2); nothing in it is changeable."""
    blocks = 0 if pc == PC_CHANGEABLE else lu.num_blocks
    length = 0 if pc == PC_CHANGEABLE else lu.block_size
    if long_lba:
        return struct.pack(
            ">QII",
            blocks,  # NUMBER OF LOGICAL BLOCKS
            0,  # reserved
            length,  # LOGICAL BLOCK LENGTH
        )
    return struct.pack(
        ">IB3s",
        min(blocks, 0xFFFFFFFF),  # NUMBER OF LOGICAL BLOCKS (all ones: too many to say)
        0,  # reserved
        length.to_bytes(3, "big"),  # LOGICAL BLOCK LENGTH
    )


def _select_pages(cdb: bytes) -> tuple[ModePageDef, ...]:
    page_code = cdb[2] & 0x3F  # PAGE CODE
    subpage = cdb[3]  # SUBPAGE CODE
    require(subpage in (0x00, ALL_SUBPAGES), 3)
    if page_code == ALL_PAGES:
        return MODE_PAGES
    definition = PAGES_BY_CODE.get(page_code)
    require(definition is not None, 2, 5)
    assert definition is not None
    return (definition,)


def mode_sense(cmd: Command, ten: bool) -> bytes:
    """MODE SENSE(6) (SPC-4 §6.11) and MODE SENSE(10) (SPC-4 §6.12)."""
    lu = cmd.unit
    cdb = cmd.cdb
    dbd = bool(cdb[1] & 0x08)  # DBD
    long_lba = ten and bool(cdb[1] & 0x10)  # LLBAA
    pc = cdb[2] >> 6  # PC
    if pc == PC_SAVED:
        raise ScsiError(Reason.SAVING_PARAMETERS_NOT_SUPPORTED, field=cdb_field(2, 7))
    pages = b"".join(lu.mode.page(p.code, pc) for p in _select_pages(cdb))
    descriptor = b"" if dbd else _block_descriptor(lu, long_lba, pc)
    device_specific = (0x80 if lu.write_protected else 0) | 0x10  # WP, DPOFUA (SBC-3 §6.4.1)
    if ten:
        header_len = 8
        header = struct.pack(
            ">HBBBBH",
            header_len - 2 + len(descriptor) + len(pages),  # MODE DATA LENGTH
            0x00,  # MEDIUM TYPE
            device_specific,  # DEVICE-SPECIFIC PARAMETER
            0x01 if long_lba and descriptor else 0x00,  # LONGLBA
            0x00,  # reserved
            len(descriptor),  # BLOCK DESCRIPTOR LENGTH
        )
    else:
        header_len = 4
        header = struct.pack(
            ">BBBB",
            header_len - 1 + len(descriptor) + len(pages),  # MODE DATA LENGTH
            0x00,  # MEDIUM TYPE
            device_specific,  # DEVICE-SPECIFIC PARAMETER
            len(descriptor),  # BLOCK DESCRIPTOR LENGTH
        )
    return header + descriptor + pages


def mode_sense6(cmd: Command) -> bytes:
    return mode_sense(cmd, ten=False)


def mode_sense10(cmd: Command) -> bytes:
    return mode_sense(cmd, ten=True)


def _parameter_length_error() -> ScsiError:
    return ScsiError(Reason.PARAMETER_LIST_LENGTH_ERROR)


def _check_block_descriptors(
    lu: LogicalUnit, data: bytes, start: int, end: int, size: int, length_at: int
) -> None:
    """A block descriptor may only restate the current geometry (SBC-3 §6.4.2)."""
    if (end - start) % size:
        raise ScsiError(Reason.INVALID_FIELD_IN_PARAMETER_LIST, field=param_field(length_at))
    for offset in range(start, end, size):
        if size == 16:
            blocks, length = be(data, offset, 8), be(data, offset + 12, 4)
            length_at, all_ones = offset + 12, 0xFFFFFFFFFFFFFFFF
        else:
            blocks, length = be(data, offset, 4), be(data, offset + 5, 3)
            length_at, all_ones = offset + 5, 0xFFFFFFFF
        if blocks not in (0, lu.num_blocks, min(lu.num_blocks, all_ones)):
            raise ScsiError(Reason.INVALID_FIELD_IN_PARAMETER_LIST, field=param_field(offset))
        if length != lu.block_size:
            raise ScsiError(Reason.INVALID_FIELD_IN_PARAMETER_LIST, field=param_field(length_at))


def _parse_page(lu: LogicalUnit, data: bytes, pos: int, staged: dict[int, bytes]) -> int:
    """Validate one mode page at ``pos`` against its changeable mask; return its size."""
    if pos + 2 > len(data):
        raise _parameter_length_error()
    first = data[pos]
    if first & 0x40:  # SPF: we implement no subpages
        raise ScsiError(Reason.INVALID_FIELD_IN_PARAMETER_LIST, field=param_field(pos, 6))
    definition = PAGES_BY_CODE.get(first & 0x3F)  # PAGE CODE (PS is reserved here: ignored)
    if definition is None:
        raise ScsiError(Reason.INVALID_FIELD_IN_PARAMETER_LIST, field=param_field(pos, 5))
    size = data[pos + 1] + 2  # PAGE LENGTH
    if size != len(definition.default):
        raise ScsiError(Reason.INVALID_FIELD_IN_PARAMETER_LIST, field=param_field(pos + 1))
    if pos + size > len(data):
        raise _parameter_length_error()
    current = staged.get(definition.code, lu.mode.page(definition.code))
    page = bytearray(current)
    for index in range(2, size):
        wanted = data[pos + index]
        fixed = (wanted ^ current[index]) & ~definition.changeable[index] & 0xFF
        if fixed:
            raise ScsiError(
                Reason.INVALID_FIELD_IN_PARAMETER_LIST,
                field=param_field(pos + index, fixed.bit_length() - 1),
            )
        page[index] = wanted
    staged[definition.code] = bytes(page)
    return size


def mode_select(cmd: Command, ten: bool) -> None:
    """MODE SELECT(6) (SPC-4 §6.9) and MODE SELECT(10) (SPC-4 §6.10).

    All pages are validated before any is applied. A change establishes MODE
    PARAMETERS CHANGED for the other I_T nexuses (SPC-4 §6.9).
    """
    lu = cmd.unit
    cdb = cmd.cdb
    require(not cdb[1] & 0x01, 1, 0)  # SP: nothing can be saved
    length = be(cdb, 7, 2) if ten else cdb[4]  # PARAMETER LIST LENGTH
    if length == 0:
        return
    if len(cmd.data_out) < length:
        raise _parameter_length_error()
    data = bytes(cmd.data_out[:length])
    header_len = 8 if ten else 4
    if length < header_len:
        raise _parameter_length_error()
    if ten:
        descriptor_len = be(data, 6, 2)  # BLOCK DESCRIPTOR LENGTH
        descriptor_size = 16 if data[4] & 0x01 else 8  # LONGLBA
    else:
        descriptor_len = data[3]  # BLOCK DESCRIPTOR LENGTH
        descriptor_size = 8
    pos = header_len + descriptor_len
    if pos > length:
        raise _parameter_length_error()
    _check_block_descriptors(lu, data, header_len, pos, descriptor_size, 6 if ten else 3)
    staged: dict[int, bytes] = {}
    while pos < length:
        pos += _parse_page(lu, data, pos, staged)
    if lu.mode.apply(staged):
        lu.establish_attention(Reason.MODE_PARAMETERS_CHANGED, exclude=it_key(cmd.nexus))


def mode_select6(cmd: Command) -> None:
    mode_select(cmd, ten=False)


def mode_select10(cmd: Command) -> None:
    mode_select(cmd, ten=True)
