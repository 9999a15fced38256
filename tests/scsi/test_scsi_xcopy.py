"""EXTENDED COPY (LID1) and RECEIVE COPY RESULTS (SPC-4 §6.4, §6.18), and the
Third-party Copy VPD page (SPC-4 §7.8.17)."""

from __future__ import annotations

import struct
import uuid
from typing import TYPE_CHECKING

import pytest

from iscsi_vmtarget.scsi import LogicalUnit, ScsiTarget, UnitIdentity
from iscsi_vmtarget.scsi.xcopy import MAX_SEGMENT_DESCRIPTORS, MAX_TARGET_DESCRIPTORS
from iscsi_vmtarget.storage import MemoryBackend

if TYPE_CHECKING:
    from tests.scsi.conftest import Harness

BLOCK = 512
INVALID_FIELD = (0x5, 0x24, 0x00)
INVALID_PARAM = (0x5, 0x26, 0x00)
PARAM_LENGTH = (0x5, 0x1A, 0x00)
TOO_MANY_TARGETS = (0x5, 0x26, 0x06)
UNSUPPORTED_TARGET = (0x5, 0x26, 0x07)
TOO_MANY_SEGMENTS = (0x5, 0x26, 0x08)
UNSUPPORTED_SEGMENT = (0x5, 0x26, 0x09)
UNREACHABLE = (0xA, 0x08, 0x04)
NOT_REACHABLE = (0xA, 0x0D, 0x02)
WRITE_PROTECTED = (0x7, 0x27, 0x00)


def target_descriptor(lu: LogicalUnit, kind: int = 0xE4, flags: int = 0) -> bytes:
    """Identification descriptor target descriptor naming ``lu`` by its NAA."""
    designator = struct.pack(">BBBB", 0x01, 0x03, 0, 16) + lu.identity.naa  # binary, LU, NAA
    designator += bytes(24 - len(designator))
    return (
        struct.pack(">BBH", kind, flags, 0) + designator + struct.pack(">B3s", 0, b"\x00\x02\x00")
    )


def segment(src: int, dst: int, blocks: int, src_lba: int, dst_lba: int, kind: int = 2) -> bytes:
    return struct.pack(">BBHHHHHQQ", kind, 0, 0x18, src, dst, 0, blocks, src_lba, dst_lba)


def parameters(
    targets: list[bytes], segments: list[bytes], list_id: int = 1, usage: int = 0
) -> bytes:
    t, s = b"".join(targets), b"".join(segments)
    header = struct.pack(">BBH4sII", list_id, usage << 3, len(t), b"", len(s), 0)
    return header + t + s


def xcopy(data: bytes, length: int | None = None) -> bytes:
    return struct.pack(">BB8sIBB", 0x83, 0, b"", len(data) if length is None else length, 0, 0)


def copy_results(action: int, list_id: int = 0, alloc: int = 1024) -> bytes:
    return struct.pack(">BBB7sIBB", 0x84, action, list_id, b"", alloc, 0, 0)


def make_lu(blocks: int = 2048, read_only: bool = False) -> LogicalUnit:
    return LogicalUnit(
        MemoryBackend(blocks * BLOCK), UnitIdentity.from_uuid(uuid.uuid4()), read_only=read_only
    )


@pytest.fixture
def pair(scsi: Harness) -> tuple[Harness, LogicalUnit]:
    """LU 0 and a second LU 1 on the same target."""
    other = make_lu()
    scsi.target.nexus_removed(scsi.nexus)
    scsi.target = ScsiTarget({0: scsi.lu, 1: other})
    scsi.target.nexus_added(scsi.nexus)
    scsi.run(bytes(6))
    scsi.run(bytes(6), lun=1)
    return scsi, other


def test_copy_within_one_lu(scsi: Harness) -> None:
    """libiscsi ExtendedCopy.Simple: 2048... blocks from the start to the end."""
    scsi.backend.write(0, b"A" * 64 * BLOCK)
    data = parameters([target_descriptor(scsi.lu)], [segment(0, 0, 64, 0, 2048 - 64)])
    scsi.good(xcopy(data), data)
    assert scsi.backend.read((2048 - 64) * BLOCK, 64 * BLOCK) == b"A" * 64 * BLOCK


def test_copy_between_lus(pair: tuple[Harness, LogicalUnit]) -> None:
    scsi, other = pair
    scsi.backend.write(10 * BLOCK, bytes(range(256)) * 2 * 3)
    data = parameters(
        [target_descriptor(scsi.lu), target_descriptor(other)], [segment(0, 1, 3, 10, 100)]
    )
    scsi.good(xcopy(data), data)
    assert other.backend.read(100 * BLOCK, 3 * BLOCK) == bytes(range(256)) * 2 * 3


def test_overlapping_forward_copy(scsi: Harness) -> None:
    payload = b"".join(bytes([i]) * BLOCK for i in range(1, 9))
    scsi.backend.write(0, payload)
    data = parameters([target_descriptor(scsi.lu)], [segment(0, 0, 8, 0, 2)])
    scsi.good(xcopy(data), data)
    assert scsi.backend.read(2 * BLOCK, 8 * BLOCK) == payload


def test_only_lus_of_this_target_are_reachable(scsi: Harness) -> None:
    """An LU shown by another target (another initiator's view) is not a copy target."""
    stranger = make_lu()
    data = parameters(
        [target_descriptor(scsi.lu), target_descriptor(stranger)], [segment(0, 1, 1, 0, 0)]
    )
    scsi.check(xcopy(data), UNREACHABLE, data)


def test_parameter_list_lengths(scsi: Harness) -> None:
    """libiscsi ExtendedCopy.ParamHdr."""
    data = parameters([target_descriptor(scsi.lu)], [segment(0, 0, 1, 0, 1)])
    scsi.check(xcopy(data, 16 + 31), PARAM_LENGTH, data[: 16 + 31])
    scsi.check(xcopy(data, len(data) - 1), PARAM_LENGTH, data[:-1])
    scsi.good(xcopy(b""))
    scsi.check(xcopy(data), PARAM_LENGTH, data[:20])  # fewer bytes than announced


def test_descriptor_limits(scsi: Harness) -> None:
    """libiscsi ExtendedCopy.DescrLimits."""
    one_target = [target_descriptor(scsi.lu)]
    data = parameters(one_target * (MAX_TARGET_DESCRIPTORS + 1), [segment(0, 0, 1, 0, 1)])
    scsi.check(xcopy(data), TOO_MANY_TARGETS, data)
    data = parameters(one_target, [segment(0, 0, 1, 0, 1)] * (MAX_SEGMENT_DESCRIPTORS + 1))
    scsi.check(xcopy(data), TOO_MANY_SEGMENTS, data)
    data = parameters(
        one_target * (MAX_TARGET_DESCRIPTORS + 1),
        [segment(0, 0, 1, 0, 1)] * (MAX_SEGMENT_DESCRIPTORS + 1),
    )
    scsi.check(xcopy(data), PARAM_LENGTH, data)  # over MAXIMUM DESCRIPTOR LIST LENGTH


def test_descriptor_types(scsi: Harness) -> None:
    """libiscsi ExtendedCopy.DescrType: Fibre Channel N_Port_Name target descriptor,
    stream-to-stream segment descriptor."""
    data = parameters([target_descriptor(scsi.lu, kind=0xE0)], [segment(0, 0, 1, 0, 1)])
    response = scsi.check(xcopy(data), UNSUPPORTED_TARGET, data)
    assert response.sense[15:18] == bytes.fromhex("800010")  # the descriptor, in the list
    stream = struct.pack(">BBHHH12s", 0x03, 0, 0x10, 0, 0, b"")
    data = parameters([target_descriptor(scsi.lu)], [stream])
    scsi.check(xcopy(data), UNSUPPORTED_SEGMENT, data)


def test_target_descriptor_fields(scsi: Harness) -> None:
    """libiscsi ExtendedCopy.ValidTgtDescr: LU ID TYPE (SPC-3) is ignored; NUL and
    another peripheral type are not copy targets."""
    data = parameters([target_descriptor(scsi.lu, flags=0xC0)], [segment(0, 0, 1, 0, 1)])
    scsi.good(xcopy(data), data)
    data = parameters([target_descriptor(scsi.lu, flags=0x20)], [segment(0, 0, 1, 0, 1)])
    scsi.check(xcopy(data), UNREACHABLE, data)  # NUL
    data = parameters([target_descriptor(scsi.lu, flags=0x01)], [segment(0, 0, 1, 0, 1)])
    scsi.check(xcopy(data), INVALID_PARAM, data)  # a sequential-access device


def test_segment_descriptor_fields(scsi: Harness) -> None:
    """libiscsi ExtendedCopy.ValidSegDescr."""
    data = parameters([target_descriptor(scsi.lu)], [segment(0, 1, 8, 0, 0)])
    scsi.check(xcopy(data), UNREACHABLE, data)  # no target descriptor 1
    data = parameters([target_descriptor(scsi.lu)], [segment(0, 0, 8, 0, 2047)])
    scsi.check(xcopy(data), NOT_REACHABLE, data)  # beyond the end


def test_list_id_usage(scsi: Harness) -> None:
    data = parameters([target_descriptor(scsi.lu)], [segment(0, 0, 1, 0, 1)], usage=0b01)
    scsi.check(xcopy(data), INVALID_PARAM, data)  # reserved
    data = parameters([target_descriptor(scsi.lu)], [segment(0, 0, 1, 0, 1)], 5, usage=0b11)
    scsi.check(xcopy(data), INVALID_PARAM, data)  # "no list id" needs LIST IDENTIFIER 0
    data = parameters([target_descriptor(scsi.lu)], [segment(0, 0, 1, 0, 1)], 0, usage=0b11)
    scsi.good(xcopy(data), data)


def test_copy_to_a_write_protected_lu(scsi: Harness) -> None:
    locked = make_lu(read_only=True)
    scsi.target = ScsiTarget({0: scsi.lu, 1: locked})
    scsi.target.nexus_added(scsi.nexus)
    scsi.run(bytes(6))
    data = parameters(
        [target_descriptor(scsi.lu), target_descriptor(locked)], [segment(0, 1, 1, 0, 0)]
    )
    scsi.check(xcopy(data), WRITE_PROTECTED, data)


def test_copy_status(scsi: Harness) -> None:
    """libiscsi ReceiveCopyResults.CopyStatus."""
    scsi.check(copy_results(0x00, 1), INVALID_FIELD)  # no copy with that list id yet
    data = parameters([target_descriptor(scsi.lu)], [segment(0, 0, 16, 0, 100)] * 2)
    scsi.good(xcopy(data), data)
    status = scsi.good(copy_results(0x00, 1))
    assert status == struct.pack(">IBHBI", 8, 0x01, 2, 0x00, 2 * 16 * BLOCK)
    other = scsi.make_nexus("iqn.2024-01.test:other")
    scsi.target.nexus_added(other)
    scsi.run(bytes(6), nexus=other)
    scsi.check(copy_results(0x00, 1), INVALID_FIELD, nexus=other)  # per I_T nexus
    scsi.target.nexus_removed(scsi.nexus)
    scsi.target.nexus_added(scsi.nexus)
    scsi.run(bytes(6))
    scsi.check(copy_results(0x00, 1), INVALID_FIELD)  # forgotten with the nexus


def test_operating_parameters(scsi: Harness) -> None:
    data = scsi.good(copy_results(0x03))
    assert struct.unpack(">I", data[:4])[0] == len(data) - 4
    assert data[4] == 0x01  # SNLID
    assert struct.unpack(">HH", data[8:12]) == (MAX_TARGET_DESCRIPTORS, MAX_SEGMENT_DESCRIPTORS)
    assert struct.unpack(">I", data[12:16])[0] == 4 * 32 + 64 * 28
    assert struct.unpack(">I", data[16:20])[0] == 0xFFFF * BLOCK
    assert data[37] == 9  # DATA SEGMENT GRANULARITY: 2**9 bytes
    assert data[43] == 2 and data[44:46] == bytes([0x02, 0xE4])


def test_third_party_copy_vpd_page(scsi: Harness) -> None:
    assert 0x8F in scsi.good(bytes([0x12, 1, 0, 0, 255, 0]))[4:]
    page = scsi.good(bytes([0x12, 1, 0x8F, 0, 255, 0]))
    assert page == bytes.fromhex(
        "008f000c"  # page header
        "0001 0008"  # SUPPORTED COMMANDS descriptor, 8 bytes
        "07 83 01 00 84 02 00 03"  # list length; 83h: SA 00h; 84h: SAs 00h 03h
    )


def test_standard_inquiry_sets_3pc(scsi: Harness) -> None:
    assert scsi.good(bytes([0x12, 0, 0, 0, 96, 0]))[5] & 0x08
