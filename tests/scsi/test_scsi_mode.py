"""MODE SENSE / MODE SELECT (SPC-4 §6.9-6.12) and the pages of mode.py."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import pytest

from iscsi_vmtarget.scsi import Status, TmfFunction

if TYPE_CHECKING:
    from tests.scsi.conftest import Harness

BLOCK = 512
INVALID_FIELD = (0x5, 0x24, 0x00)
INVALID_PARAM = (0x5, 0x26, 0x00)
PARAM_LENGTH = (0x5, 0x1A, 0x00)
CACHING = bytes.fromhex("0812 04 00 0000 0000 0000 0000 00 00 0000 00 000000")
CONTROL = bytes.fromhex("0a0a 02 10 00 00 0000 ffff 0000")
IEC = bytes.fromhex("1c0a 08 00 00000000 00000000")


def sense6(pc: int = 0, page: int = 0x3F, sub: int = 0, alloc: int = 255, dbd: int = 0) -> bytes:
    return bytes([0x1A, dbd << 3, pc << 6 | page, sub, alloc, 0])


def sense10(
    pc: int = 0, page: int = 0x3F, alloc: int = 1024, llbaa: int = 0, dbd: int = 0
) -> bytes:
    return struct.pack(
        ">BBBBBBBHB", 0x5A, llbaa << 4 | dbd << 3, pc << 6 | page, 0, 0, 0, 0, alloc, 0
    )


def select6(params: bytes, sp: int = 0) -> bytes:
    return bytes([0x15, 0x10 | sp, 0, 0, len(params), 0])


def select10(params: bytes) -> bytes:
    return struct.pack(">BBBBBBBHB", 0x55, 0x10, 0, 0, 0, 0, 0, len(params), 0)


def header6(bdl: int = 0) -> bytes:
    return bytes([0, 0, 0, bdl])


def test_all_pages_current(scsi: Harness) -> None:
    data = scsi.good(sense6())
    descriptor = struct.pack(">IB3s", 2048, 0, BLOCK.to_bytes(3, "big"))
    body = descriptor + CACHING + CONTROL + IEC
    assert data == bytes([3 + len(body), 0x00, 0x10, 8]) + body


def test_allocation_length_four(scsi: Harness) -> None:
    data = scsi.good(sense6(alloc=4))
    assert len(data) == 4 and data[0] == 3 + 8 + len(CACHING + CONTROL + IEC)


def test_dbd_and_single_page(scsi: Harness) -> None:
    assert scsi.good(sense6(page=0x0A, dbd=1)) == bytes([3 + 12, 0, 0x10, 0]) + CONTROL
    assert scsi.good(sense6(page=0x08, dbd=1))[4:] == CACHING
    assert scsi.good(sense6(page=0x3F, sub=0xFF, dbd=1))[4:] == CACHING + CONTROL + IEC


def test_changeable_and_default(scsi: Harness) -> None:
    changeable = scsi.good(sense6(pc=1, page=0x3F, dbd=1))[4:]
    assert changeable[:20] == bytes.fromhex("0812 04") + bytes(17)
    assert changeable[20:32] == bytes.fromhex("0a0a 04 00 08") + bytes(7)
    assert changeable[32:] == bytes.fromhex("1c0a") + bytes(10)
    assert scsi.good(sense6(pc=2, dbd=1))[4:] == CACHING + CONTROL + IEC


def test_saved_values_not_supported(scsi: Harness) -> None:
    response = scsi.check(sense6(pc=3), (0x5, 0x39, 0x00))
    assert response.sense[15:18] == bytes.fromhex("cf0002")


def test_unsupported_page_and_subpage(scsi: Harness) -> None:
    response = scsi.check(sense6(page=0x19), INVALID_FIELD)
    assert response.sense[15:18] == bytes.fromhex("cd0002")
    scsi.check(sense6(page=0x0A, sub=1), INVALID_FIELD)


def test_mode_sense10_long_lba(scsi: Harness) -> None:
    data = scsi.good(sense10(llbaa=1))
    assert struct.unpack(">H", data[:2])[0] == len(data) - 2
    assert data[3] == 0x10 and data[4] == 0x01  # DPOFUA, LONGLBA
    assert struct.unpack(">H", data[6:8])[0] == 16
    assert data[8:24] == struct.pack(">QII", 2048, 0, BLOCK)
    short = scsi.good(sense10())
    assert short[4] == 0 and struct.unpack(">H", short[6:8])[0] == 8


def test_write_protect_bit(scsi_ro: Harness) -> None:
    assert scsi_ro.good(sense6())[2] == 0x90


# -- MODE SELECT ----------------------------------------------------------------------------


def control_with(d_sense: int = 0, swp: int = 0) -> bytes:
    page = bytearray(CONTROL)
    page[2] |= d_sense << 2
    page[4] |= swp << 3
    return bytes(page)


def test_d_sense_switches_sense_format(scsi: Harness) -> None:
    params = header6() + control_with(d_sense=1)
    scsi.good(select6(params), params)
    response = scsi.run(scsi.cdb16(0x88, 2**64 - 1, 1))
    assert response.sense[:4] == bytes.fromhex("72052100")
    assert scsi.good(sense6(page=0x0A, dbd=1))[4:] == control_with(d_sense=1)


def test_mode_select_sets_unit_attention_for_other_nexuses(scsi: Harness) -> None:
    other = scsi.make_nexus("iqn.2024-01.test:other")
    scsi.target.nexus_added(other)
    scsi.check(bytes(6), (0x6, 0x29, 0x00), nexus=other)
    params = header6() + control_with(d_sense=1)
    scsi.good(select6(params), params)
    scsi.good(bytes(6))  # the issuing nexus gets none
    response = scsi.run(bytes(6), nexus=other)
    assert response.sense[:4] == bytes.fromhex("72062a01")  # descriptor format now
    scsi.good(bytes(6), nexus=other)
    scsi.good(select6(params), params)  # no change: no new unit attention
    scsi.good(bytes(6), nexus=other)


def test_software_write_protect(scsi: Harness) -> None:
    params = header6() + control_with(swp=1)
    scsi.good(select6(params), params)
    scsi.check(scsi.cdb10(0x2A, 0, 1), (0x7, 0x27, 0x02), bytes(BLOCK))
    scsi.good(scsi.cdb10(0x28, 0, 1))
    assert scsi.good(sense6())[2] & 0x80
    params = header6() + control_with(swp=0)
    scsi.good(select6(params), params)
    scsi.good(scsi.cdb10(0x2A, 0, 1), bytes(BLOCK))


def test_write_cache_disabled_makes_writes_durable(scsi: Harness) -> None:
    page = bytearray(CACHING)
    page[2] = 0x00
    params = header6() + bytes(page)
    write = scsi.cdb10(0x2A, 0, 1)
    assert not scsi.target.may_block(write, 0)
    scsi.good(select6(params), params)
    assert scsi.target.may_block(write, 0) and scsi.target.may_block(write)
    scsi.good(write, bytes(BLOCK))
    assert scsi.backend.flushes == 1


def test_unchangeable_bit_refused(scsi: Harness) -> None:
    page = bytearray(CONTROL)
    page[3] = 0x00  # QUEUE ALGORITHM MODIFIER is not changeable
    params = header6() + bytes(page)
    response = scsi.check(select6(params), INVALID_PARAM, params)
    assert response.sense[15:18] == bytes.fromhex("8c0007")  # C/D=0, bit 4 of byte 7


@pytest.mark.parametrize(
    "params",
    [
        header6() + bytes.fromhex("1902 0000"),  # unknown page
        header6() + CONTROL[:1] + b"\x0b" + CONTROL[2:] + b"\x00",  # wrong page length
        header6() + bytes([0x4A]) + CONTROL[1:],  # SPF: no subpages
        header6(8) + struct.pack(">IB3s", 0, 0, (4096).to_bytes(3, "big")) + CONTROL,
    ],
)
def test_invalid_parameter_lists(scsi: Harness, params: bytes) -> None:
    scsi.check(select6(params), INVALID_PARAM, params)


def test_block_descriptor_restating_geometry_is_accepted(scsi: Harness) -> None:
    params = header6(8) + struct.pack(">IB3s", 2048, 0, BLOCK.to_bytes(3, "big")) + CONTROL
    scsi.good(select6(params), params)


@pytest.mark.parametrize(
    ("cdb_len", "params"),
    [
        (3, header6()),  # shorter than the header
        (15, header6() + CONTROL),  # page cut short
        (2 + 4 + 12, header6() + CONTROL),  # Data-Out shorter than the list length
    ],
)
def test_parameter_list_length_errors(scsi: Harness, cdb_len: int, params: bytes) -> None:
    cdb = bytes([0x15, 0x10, 0, 0, cdb_len, 0])
    scsi.check(cdb, PARAM_LENGTH, params[:cdb_len])


def test_zero_length_is_a_no_op(scsi: Harness) -> None:
    scsi.good(bytes([0x15, 0x10, 0, 0, 0, 0]))


def test_save_pages_refused(scsi: Harness) -> None:
    params = header6() + CONTROL
    scsi.check(select6(params, sp=1), INVALID_FIELD, params)


def test_mode_select10(scsi: Harness) -> None:
    params = bytes(8) + control_with(d_sense=1)
    response = scsi.run(select10(params), params)
    assert response.status == Status.GOOD and response.data_out_length == len(params)
    assert scsi.lu.mode.d_sense


def test_lu_reset_restores_defaults(scsi: Harness) -> None:
    params = header6() + control_with(d_sense=1, swp=1)
    scsi.good(select6(params), params)
    scsi.target.task_management(scsi.nexus, TmfFunction.LOGICAL_UNIT_RESET, 0)
    assert not scsi.lu.mode.d_sense and not scsi.lu.mode.swp
    scsi.check(bytes(6), (0x6, 0x29, 0x03))


def test_libiscsi_set_swp_sequence(scsi: Harness) -> None:
    """What libiscsi's set_swp() sends: read the page with DBD, flip SWP, select it back."""
    current = scsi.good(sense6(page=0x0A, dbd=1))
    assert scsi.good(sense6(pc=1, page=0x0A, dbd=1))[4 + 4] & 0x08  # SWP changeable
    page = bytearray(current[4:])
    page[0] &= 0x7F  # PS is reserved for MODE SELECT
    page[4] |= 0x08
    params = bytes(4) + bytes(page)
    scsi.good(select6(params), params)
    scsi.check(scsi.cdb10(0x2A, 0, 1), (0x7, 0x27, 0x02), bytes(BLOCK))
