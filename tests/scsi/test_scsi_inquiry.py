"""INQUIRY (SPC-4 §6.6) and the VPD pages (SPC-4 §7.8, SBC-3 §6.5)."""

from __future__ import annotations

import struct
import uuid
from typing import TYPE_CHECKING

import pytest

from iscsi_vmtarget.scsi import UnitIdentity
from iscsi_vmtarget.scsi.vpd import VPD_PAGES

if TYPE_CHECKING:
    from tests.scsi.conftest import Harness

ILLEGAL_INVALID_FIELD = (0x5, 0x24, 0x00)


def inquiry(evpd: int, page: int, alloc: int) -> bytes:
    return struct.pack(">BBBHB", 0x12, evpd, page, alloc, 0)


def test_standard_data(scsi: Harness) -> None:
    data = scsi.good(inquiry(0, 0, 260))
    assert len(data) == 96
    assert data[0] == 0x00  # connected direct-access device
    assert data[2] == 0x06  # SPC-4
    assert data[3] == 0x12  # HISUP, response data format 2
    assert data[4] == len(data) - 5
    assert data[7] & 0x02  # CMDQUE
    assert data[8:16] == b"ISCSIVMT"
    assert data[16:32] == b"VIRTUAL-DISK    "
    assert data[32:36] == b"0001"
    descriptors = struct.unpack(">8H", data[58:74])
    assert 0x04C0 in descriptors and 0x0460 in descriptors  # SBC-3, SPC-4


@pytest.mark.parametrize("alloc", [0, 1, 5, 36, 95, 255, 256])
def test_allocation_length_truncates(scsi: Harness, alloc: int) -> None:
    full = scsi.good(inquiry(0, 0, 1024))
    assert scsi.good(inquiry(0, 0, alloc)) == full[:alloc]


def test_evpd_zero_with_page_code_is_invalid(scsi: Harness) -> None:
    response = scsi.check(inquiry(0, 1, 256), ILLEGAL_INVALID_FIELD)
    assert response.sense[15:18] == bytes.fromhex("c00002")


def test_cmddt_bit_is_invalid(scsi: Harness) -> None:
    response = scsi.check(inquiry(2, 0, 256), ILLEGAL_INVALID_FIELD)
    assert response.sense[15:18] == bytes.fromhex("c90001")  # byte 1 bit 1


def test_unsupported_vpd_page(scsi: Harness) -> None:
    scsi.check(inquiry(1, 0x99, 256), ILLEGAL_INVALID_FIELD)


def test_supported_pages_derive_from_table(scsi: Harness) -> None:
    data = scsi.good(inquiry(1, 0x00, 255))
    assert data[:2] == b"\x00\x00"
    assert data[4:] == bytes(sorted(p.code for p in VPD_PAGES))
    assert struct.unpack(">H", data[2:4])[0] == len(data) - 4
    for code in data[4:]:
        page = scsi.good(inquiry(1, code, 255))
        assert page[1] == code
        assert struct.unpack(">H", page[2:4])[0] == len(page) - 4


def test_unit_serial_number(scsi: Harness) -> None:
    data = scsi.good(inquiry(1, 0x80, 255))
    assert data[4:] == b"12345678123456781234567812345678"


def designators(page: bytes) -> list[tuple[int, int, int, int, bytes]]:
    out = []
    pos = 4
    while pos < len(page):
        length = page[pos + 3]
        out.append(
            (
                page[pos] >> 4,  # protocol identifier
                page[pos] & 0x0F,  # code set
                page[pos + 1],  # PIV, association, type
                length,
                page[pos + 4 : pos + 4 + length],
            )
        )
        pos += 4 + length
    assert pos == len(page)
    return out


def test_device_identification(scsi: Harness) -> None:
    page = scsi.good(inquiry(1, 0x83, 1024))
    found = designators(page)
    naa = found[0]
    assert naa[1:4] == (0x1, 0x03, 16)
    assert naa[4] == scsi.lu.identity.naa
    assert naa[4][0] >> 4 == 6
    t10 = found[1]
    assert t10[1:3] == (0x2, 0x01)
    assert t10[4] == b"ISCSIVMT" + scsi.lu.identity.naa.hex().upper().encode()
    port_name = found[2]
    assert port_name[:3] == (0x5, 0x3, 0x80 | 0x10 | 0x8)  # iSCSI, UTF-8, PIV+port+name
    assert port_name[3] % 4 == 0
    assert port_name[4].rstrip(b"\x00") == scsi.nexus.target_port.encode()
    relative = found[3]
    assert relative[:3] == (0x5, 0x1, 0x80 | 0x10 | 0x4)
    assert relative[4] == b"\x00\x00\x00\x01"
    device = found[4]
    assert device[2] == 0x80 | 0x20 | 0x8
    assert device[4].rstrip(b"\x00") == scsi.nexus.target_name.encode()


def test_block_limits(scsi: Harness) -> None:
    page = scsi.good(inquiry(1, 0xB0, 255))
    assert len(page) == 64 and page[3] == 0x3C
    assert struct.unpack(">I", page[8:12])[0] == scsi.lu.max_transfer_blocks
    assert page[20:28] == bytes(8)  # no UNMAP: both maxima zero


def test_block_device_characteristics(scsi: Harness) -> None:
    page = scsi.good(inquiry(1, 0xB1, 255))
    assert len(page) == 64 and page[3] == 0x3C
    assert page[4:6] == b"\x00\x01"  # non-rotating


def test_logical_block_provisioning(scsi: Harness) -> None:
    assert scsi.good(inquiry(1, 0xB2, 255)) == bytes.fromhex("00b2000400000000")


def test_unknown_lun_standard_inquiry(scsi: Harness) -> None:
    data = scsi.good(inquiry(0, 0, 96), lun=7)
    assert data[0] == 0x7F
    assert len(data) == 96


def test_unknown_lun_vpd(scsi: Harness) -> None:
    scsi.check(inquiry(1, 0x83, 255), (0x5, 0x25, 0x00), lun=7)


def test_identity_from_uuid_is_stable() -> None:
    u = uuid.UUID("00000000-0000-4000-8000-0000000000ff")
    a = UnitIdentity.from_uuid(u)
    assert a == UnitIdentity.from_uuid(u)
    # NAA 6, company ID 5A4D56, then the UUID's low 100 bits
    assert a.naa == bytes.fromhex("65a4d5600000400080000000000000ff")
    assert a.serial == u.hex
    named = UnitIdentity.from_uuid(u, "vm1-disk0")
    assert named.serial == "vm1-disk0" and named.naa == a.naa


@pytest.mark.parametrize(
    "kwargs",
    [
        {"naa": bytes(16), "serial": "x"},
        {"naa": b"\x60" + bytes(14), "serial": "x"},
        {"naa": b"\x60" + bytes(15), "serial": ""},
        {"naa": b"\x60" + bytes(15), "serial": "x", "vendor": "TOO-LONG-VENDOR"},
        {"naa": b"\x60" + bytes(15), "serial": "caf\u00e9"},
    ],
)
def test_identity_validation(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        UnitIdentity(**kwargs)  # type: ignore[arg-type]
