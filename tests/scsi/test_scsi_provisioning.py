"""Logical block provisioning (SBC-3 §4.7): WRITE SAME 10/16, UNMAP, GET LBA STATUS,
the thin-provisioning bits of READ CAPACITY(16) and the Block Limits and Logical
Block Provisioning VPD pages."""

from __future__ import annotations

import os
import struct
import uuid
from typing import TYPE_CHECKING

import pytest

from iscsi_vmtarget.scsi import LogicalUnit, ScsiTarget, Status, UnitIdentity
from iscsi_vmtarget.scsi.provisioning import MAX_WRITE_SAME_BLOCKS, coalesce
from iscsi_vmtarget.storage import FileBackend
from tests.scsi.conftest import Harness, make_nexus

if TYPE_CHECKING:
    from pathlib import Path

BLOCK = 512
INVALID_FIELD = (0x5, 0x24, 0x00)
INVALID_OPCODE = (0x5, 0x20, 0x00)
LBA_OOB = (0x5, 0x21, 0x00)
PARAM_LENGTH = (0x5, 0x1A, 0x00)
INVALID_PARAM = (0x5, 0x26, 0x00)
WRITE_PROTECTED = (0x7, 0x27, 0x00)
MAPPED, DEALLOCATED, ANCHORED = 0, 1, 2


def ws10(lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", 0x41, flags, lba, 0, blocks, 0)


def ws16(lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", 0x93, flags, lba, blocks, 0, 0)


def unmap_cdb(length: int, anchor: int = 0) -> bytes:
    return struct.pack(">BBIBHB", 0x42, anchor, 0, 0, length, 0)


def unmap_list(*ranges: tuple[int, int]) -> bytes:
    body = b"".join(struct.pack(">QII", lba, n, 0) for lba, n in ranges)
    return struct.pack(">HHI", len(body) + 6, len(body), 0) + body


def get_lba_status(lba: int, alloc: int = 4096) -> bytes:
    return struct.pack(">BBQIBB", 0x9E, 0x12, lba, alloc, 0, 0)


def descriptors(data: bytes) -> list[tuple[int, int, int]]:
    length = struct.unpack(">I", data[:4])[0]
    assert length == len(data) - 4 and (length - 4) % 16 == 0
    return [struct.unpack(">QIB3x", data[at : at + 16]) for at in range(8, len(data), 16)]


def fill(harness: Harness, lba: int, blocks: int, byte: int = 0xAA) -> None:
    harness.good(harness.cdb10(0x2A, lba, blocks), bytes([byte]) * blocks * BLOCK)


# -- WRITE SAME ------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [ws10, ws16])
def test_write_same_replicates_one_block(scsi: Harness, build: object) -> None:
    pattern = bytes(range(256)) * 2
    response = scsi.run(build(5, 7), pattern)  # type: ignore[operator]
    assert response.status == Status.GOOD and response.data_out_length == BLOCK
    assert scsi.backend.read(5 * BLOCK, 7 * BLOCK) == pattern * 7
    assert scsi.backend.read(4 * BLOCK, BLOCK) == bytes(BLOCK)
    assert scsi.backend.read(12 * BLOCK, BLOCK) == bytes(BLOCK)


def test_write_same_zero_blocks_runs_to_the_end(scsi: Harness) -> None:
    """NUMBER OF LOGICAL BLOCKS 0 with WSNZ=0: from the LBA to the last block."""
    scsi.good(ws10(2040, 0), b"\x5a" * BLOCK)
    assert scsi.backend.read(2040 * BLOCK, 8 * BLOCK) == b"\x5a" * 8 * BLOCK
    assert scsi.backend.read(2039 * BLOCK, BLOCK) == bytes(BLOCK)


def test_write_same_range_checks(scsi: Harness) -> None:
    scsi.check(ws10(2047, 2), LBA_OOB, bytes(BLOCK))
    scsi.check(ws16(2048, 0), LBA_OOB, bytes(BLOCK))  # even for "to the end"
    scsi.check(ws16(2**64 - 1, 1), LBA_OOB, bytes(BLOCK))


def test_write_same_maximum_length(harness_factory: type[Harness]) -> None:
    big = harness_factory.create(blocks=MAX_WRITE_SAME_BLOCKS + 16)
    response = big.check(ws16(0, MAX_WRITE_SAME_BLOCKS + 1), INVALID_FIELD, bytes(BLOCK))
    assert response.sense[15:18] == bytes.fromhex("c0000a")  # NUMBER OF LOGICAL BLOCKS
    big.check(ws16(0, 0), INVALID_FIELD, bytes(BLOCK))  # "to the end" is too long too
    big.good(ws16(16, 0), bytes(BLOCK))  # exactly the maximum


def test_write_same_needs_exactly_one_block_of_data(scsi: Harness) -> None:
    scsi.check(ws10(0, 1), INVALID_FIELD, bytes(BLOCK // 2))
    scsi.check(ws10(0, 1), INVALID_FIELD, bytes(2 * BLOCK))


def test_write_same_refuses_anchor_and_protection(thin: Harness) -> None:
    response = thin.check(ws10(0, 1, 0x10 | 0x08), INVALID_FIELD, bytes(BLOCK))
    assert response.sense[15:18] == bytes.fromhex("cc0001")  # ANCHOR: byte 1 bit 4
    response = thin.check(ws16(0, 1, 0x20), INVALID_FIELD, bytes(BLOCK))
    assert response.sense[15:18] == bytes.fromhex("cd0001")  # WRPROTECT


def test_write_same_unmap_needs_thin_provisioning(scsi: Harness) -> None:
    response = scsi.check(ws10(0, 1, 0x08), INVALID_FIELD, bytes(BLOCK))
    assert response.sense[15:18] == bytes.fromhex("cb0001")  # UNMAP: byte 1 bit 3


@pytest.mark.parametrize("build", [ws10, ws16])
def test_write_same_unmap_deallocates_whatever_the_pattern(thin: Harness, build: object) -> None:
    fill(thin, 0, 32)
    thin.good(build(0, 16, 0x08), b"\xff" * BLOCK)  # type: ignore[operator]
    assert thin.backend.read(0, 16 * BLOCK) == bytes(16 * BLOCK)  # LBPRZ: zeros
    assert descriptors(thin.good(get_lba_status(0)))[:2] == [
        (0, 16, DEALLOCATED),
        (16, 16, MAPPED),
    ]


def test_write_same_ndob_writes_zeros_without_data(thin: Harness) -> None:
    fill(thin, 0, 8)
    response = thin.run(ws16(0, 8, 0x01))
    assert response.status == Status.GOOD and response.data_out_length == 0
    assert thin.backend.read(0, 8 * BLOCK) == bytes(8 * BLOCK)
    assert descriptors(thin.good(get_lba_status(0)))[0] == (0, 8, MAPPED)  # written, not freed


def test_write_same_on_a_read_only_lu(scsi_ro: Harness) -> None:
    scsi_ro.check(ws10(0, 1), WRITE_PROTECTED, bytes(BLOCK))


def test_write_same_flushes_without_write_cache(scsi: Harness) -> None:
    scsi.lu.mode.apply({0x08: scsi.lu.mode.page(0x08)[:2] + bytes(18)})  # WCE=0
    scsi.good(ws10(0, 4), bytes(BLOCK))
    assert scsi.backend.flushes == 1


# -- UNMAP -----------------------------------------------------------------------------------


def test_unmap_deallocates_each_range(thin: Harness) -> None:
    fill(thin, 0, 64)
    data = unmap_list((0, 8), (24, 16))
    thin.good(unmap_cdb(len(data)), data)
    assert thin.backend.read(0, 8 * BLOCK) == bytes(8 * BLOCK)
    assert thin.backend.read(8 * BLOCK, BLOCK) == b"\xaa" * BLOCK
    assert descriptors(thin.good(get_lba_status(0))) == [
        (0, 8, DEALLOCATED),
        (8, 16, MAPPED),
        (24, 16, DEALLOCATED),
        (40, 24, MAPPED),
        (64, 2048 - 64, DEALLOCATED),
    ]


def test_unmap_of_part_of_a_page_zeroes_but_keeps_it_mapped(thin: Harness) -> None:
    fill(thin, 0, 8)
    data = unmap_list((1, 3))
    thin.good(unmap_cdb(len(data)), data)
    assert thin.backend.read(0, 5 * BLOCK) == b"\xaa" * BLOCK + bytes(3 * BLOCK) + b"\xaa" * BLOCK
    assert descriptors(thin.good(get_lba_status(0)))[0] == (0, 8, MAPPED)


def test_unmap_zero_length_and_zero_block_descriptors(thin: Harness) -> None:
    thin.good(unmap_cdb(0))
    data = unmap_list((5, 0), (2048, 0))  # zero blocks: not even range checked
    thin.good(unmap_cdb(len(data)), data)
    data = unmap_list()
    thin.good(unmap_cdb(len(data)), data)


def test_unmap_checks_every_descriptor_before_unmapping_any(thin: Harness) -> None:
    fill(thin, 0, 8)
    data = unmap_list((0, 8), (2040, 9))
    thin.check(unmap_cdb(len(data)), LBA_OOB, data)
    assert thin.backend.read(0, BLOCK) == b"\xaa" * BLOCK


def test_unmap_parameter_list_errors(thin: Harness) -> None:
    thin.check(unmap_cdb(7), PARAM_LENGTH, bytes(7))
    data = unmap_list((0, 1))
    thin.check(unmap_cdb(len(data)), PARAM_LENGTH, data[:10])  # less than announced
    bad = struct.pack(">HHI", 100, 16, 0) + bytes(16)  # UNMAP DATA LENGTH too long
    thin.check(unmap_cdb(len(bad)), PARAM_LENGTH, bad)
    bad = struct.pack(">HHI", 22, 32, 0) + bytes(16)  # descriptor length too long
    thin.check(unmap_cdb(len(bad)), PARAM_LENGTH, bad)


def test_unmap_takes_as_many_descriptors_as_a_parameter_list_holds(
    harness_factory: type[Harness],
) -> None:
    thin = harness_factory.create(thin=True, blocks=8192)
    fill(thin, 0, 16)
    data = unmap_list(*[(2 * i, 1) for i in range(4095)])  # MAXIMUM UNMAP BLOCK DESCRIPTORS
    thin.good(unmap_cdb(len(data)), data)
    assert thin.backend.read(0, 2 * BLOCK) == bytes(BLOCK) + b"\xaa" * BLOCK


def test_unmap_anchor_is_refused(thin: Harness) -> None:
    response = thin.check(unmap_cdb(0, anchor=1), INVALID_FIELD)
    assert response.sense[15:18] == bytes.fromhex("c80001")


def test_unmap_is_not_a_command_of_a_thick_lu(scsi: Harness) -> None:
    data = unmap_list((0, 1))
    scsi.check(unmap_cdb(len(data)), INVALID_OPCODE, data)


def test_coalesce_merges_overlapping_and_touching_ranges() -> None:
    assert coalesce([(10, 5), (0, 3), (3, 2), (12, 10), (40, 1)]) == [(0, 5), (10, 12), (40, 1)]


# -- GET LBA STATUS ---------------------------------------------------------------------------


def test_get_lba_status_of_a_fresh_thin_lu(thin: Harness) -> None:
    assert descriptors(thin.good(get_lba_status(0))) == [(0, 2048, DEALLOCATED)]
    assert descriptors(thin.good(get_lba_status(2047))) == [(2047, 1, DEALLOCATED)]


def test_get_lba_status_first_descriptor_starts_at_the_requested_lba(thin: Harness) -> None:
    """SBC-4 §5.8.2.3: the first descriptor's LBA is the STARTING LBA of the CDB."""
    fill(thin, 0, 16)
    assert descriptors(thin.good(get_lba_status(9, 24))) == [(9, 7, MAPPED)]


def test_get_lba_status_is_cut_to_the_allocation_length(thin: Harness) -> None:
    fill(thin, 0, 8)
    fill(thin, 16, 8)
    data = thin.good(get_lba_status(0, 24))  # room for one descriptor: one is returned
    assert data == struct.pack(">II", 4 + 16, 0) + struct.pack(">QIB3x", 0, 8, MAPPED)
    assert len(descriptors(thin.good(get_lba_status(0, 40)))) == 2
    assert thin.good(get_lba_status(0, 8)) == struct.pack(">II", 20, 0)  # truncated by SPC-4


def test_get_lba_status_of_a_thick_lu_is_all_mapped(scsi: Harness) -> None:
    assert descriptors(scsi.good(get_lba_status(100))) == [(100, 1948, MAPPED)]


def test_get_lba_status_beyond_the_end(thin: Harness) -> None:
    thin.check(get_lba_status(2048), LBA_OOB)
    thin.check(get_lba_status(2**63), LBA_OOB)
    thin.check(get_lba_status(2**64 - 1), LBA_OOB)


def test_get_lba_status_of_a_sparse_file(tmp_path: Path) -> None:
    """Through a real sparse file: SEEK_DATA/SEEK_HOLE after a hole punch."""
    harness = _file_harness(tmp_path, thin_provisioning=True)
    fill(harness, 0, 256)
    data = unmap_list((8, 64))
    harness.good(unmap_cdb(len(data)), data)
    found = descriptors(harness.good(get_lba_status(0)))
    assert found[:3] == [(0, 8, MAPPED), (8, 64, DEALLOCATED), (72, 184, MAPPED)]
    assert found[3][2] == DEALLOCATED and found[3][0] == 256
    assert harness.good(harness.cdb10(0x28, 8, 64)) == bytes(64 * BLOCK)
    harness.backend.close()


def _file_harness(tmp_path: Path, **lu_options: bool) -> Harness:
    """A harness over a real 4 MiB file; resource-provisioned ones are preallocated."""
    path = tmp_path / "lun.img"
    with open(path, "wb") as fh:
        fh.truncate(4 << 20)
        if lu_options.get("resource_provisioning"):
            os.posix_fallocate(fh.fileno(), 0, 4 << 20)
    backend = FileBackend(str(path))
    lu = LogicalUnit(backend, UnitIdentity.from_uuid(uuid.uuid4()), **lu_options)
    target = ScsiTarget({0: lu})
    nexus = make_nexus()
    target.nexus_added(nexus)
    harness = Harness(backend, lu, target, nexus)  # type: ignore[arg-type]
    harness.run(bytes(6))  # consume the power-on unit attention
    return harness


def test_thick_lu_unmap_anchors_and_keeps_the_space(tmp_path: Path) -> None:
    """SBC-4 §4.7.2.2, resource provisioning: unmapped blocks read as zeros but keep
    their allocation (so later writes cannot fail for space), and GET LBA STATUS
    reports them anchored - also after they have been read."""
    harness = _file_harness(tmp_path, resource_provisioning=True)
    path = harness.backend.path  # type: ignore[attr-defined]
    allocated = os.stat(path).st_blocks
    assert descriptors(harness.good(get_lba_status(0))) == [(0, 8192, ANCHORED)]
    fill(harness, 0, 256)
    data = unmap_list((8, 64))
    harness.good(unmap_cdb(len(data)), data)
    assert harness.good(harness.cdb10(0x28, 0, 72)) == b"\xaa" * 8 * BLOCK + bytes(64 * BLOCK)
    assert descriptors(harness.good(get_lba_status(0))) == [
        (0, 8, MAPPED),
        (8, 64, ANCHORED),
        (72, 184, MAPPED),
        (256, 8192 - 256, ANCHORED),
    ]
    fill(harness, 256, 32)
    harness.good(ws16(256, 16, flags=0x08), b"\x55" * BLOCK)  # WRITE SAME with UNMAP
    assert descriptors(harness.good(get_lba_status(256, 40))) == [
        (256, 16, ANCHORED),
        (272, 16, MAPPED),
    ]
    assert os.stat(path).st_blocks >= allocated  # no space given back (+ extent tree)
    harness.backend.close()


def test_a_resource_provisioned_lu_needs_a_backend_that_zeroes_in_place() -> None:
    class Unzeroable:  # a backend without zero_range: UNMAP could only deallocate
        size = 1 << 20

    with pytest.raises(ValueError, match="zero_range"):
        LogicalUnit(Unzeroable(), UnitIdentity.from_uuid(uuid.uuid4()), resource_provisioning=True)  # type: ignore[arg-type]


def test_thick_lu_reports_resource_provisioning(tmp_path: Path) -> None:
    harness = _file_harness(tmp_path, resource_provisioning=True)
    capacity = harness.good(bytes.fromhex("9e10 0000000000000000 00000020 00 00"))
    assert capacity[14:16] == b"\xc0\x00"  # LBPME, LBPRZ
    page = harness.good(inquiry(0xB2))
    assert page[5] == 0xE4  # LBPU, LBPWS, LBPWS10, LBPRZ
    assert page[6] & 0x07 == 0x01  # PROVISIONING TYPE: resource provisioned
    assert struct.unpack(">I", harness.good(inquiry(0xB0))[20:24])[0] > 0  # MAX UNMAP LBA
    harness.backend.close()


def test_thick_lu_sanitize_block_erase_anchors_everything(tmp_path: Path) -> None:
    harness = _file_harness(tmp_path, resource_provisioning=True)
    fill(harness, 0, 256)
    harness.good(bytes([0x48, 0x02, 0, 0, 0, 0, 0, 0, 0, 0]))  # SANITIZE BLOCK ERASE
    assert harness.good(harness.cdb10(0x28, 0, 256)) == bytes(256 * BLOCK)
    assert descriptors(harness.good(get_lba_status(0))) == [(0, 8192, ANCHORED)]
    harness.backend.close()


# -- READ CAPACITY(16) and VPD ---------------------------------------------------------------


def test_read_capacity16_reports_thin_provisioning(thin: Harness) -> None:
    data = thin.good(bytes.fromhex("9e10 0000000000000000 00000020 00 00"))
    assert data[13] == 0x00  # LBPPBE: one logical block per physical block
    assert data[14:16] == b"\xc0\x00"  # LBPME, LBPRZ, LOWEST ALIGNED LBA 0


def test_read_capacity16_physical_block_exponent(harness_factory: type[Harness]) -> None:
    harness = harness_factory.create(physical_block_size=4096)
    data = harness.good(bytes.fromhex("9e10 0000000000000000 00000020 00 00"))
    assert data[13] == 3  # 2**3 logical blocks per physical block


def inquiry(page: int) -> bytes:
    return bytes([0x12, 1, page, 0, 255, 0])


def test_block_limits_of_a_thin_lu(thin: Harness) -> None:
    page = thin.good(inquiry(0xB0))
    assert page[:4] == bytes.fromhex("00b0003c")
    fields = struct.unpack(">BBHIIIIIIIQIIIII", page[4:])
    (
        wsnz,
        max_caw,
        opt_granularity,
        max_transfer,
        _opt_transfer,
        _max_prefetch,
        max_unmap,
        max_descriptors,
        unmap_granularity,
        alignment,
        max_write_same,
        max_atomic,
        atomic_alignment,
        atomic_granularity,
        _atomic_boundary_max,
        _boundary_size,
    ) = fields
    assert (wsnz, max_caw, opt_granularity) == (0, 255, 8)
    assert max_transfer == thin.lu.max_transfer_blocks
    assert (max_unmap, max_descriptors) == (0xFFFFFFFF, 4095)
    assert (unmap_granularity, alignment) == (8, 0x80000000)  # UGAVALID, alignment 0
    assert max_write_same == MAX_WRITE_SAME_BLOCKS
    assert (max_atomic, atomic_alignment, atomic_granularity) == (2048, 8, 8)


def test_block_limits_of_a_thick_lu_has_no_unmap_limits(scsi: Harness) -> None:
    page = scsi.good(inquiry(0xB0))
    assert page[20:36] == bytes(16)


def test_logical_block_provisioning_page(thin: Harness, scsi: Harness) -> None:
    assert thin.good(inquiry(0xB2)) == bytes.fromhex("00b20004 00 e4 02 00")
    assert scsi.good(inquiry(0xB2)) == bytes.fromhex("00b20004 00 00 00 00")


def test_block_device_characteristics_wabereq(thin: Harness, scsi: Harness) -> None:
    assert thin.good(inquiry(0xB1))[7] == 0x40  # WABEREQ=01b: BLOCK ERASE exists
    assert scsi.good(inquiry(0xB1))[7] == 0x00
