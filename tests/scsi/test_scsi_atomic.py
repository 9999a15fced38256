"""COMPARE AND WRITE (SBC-3 §5.2), ORWRITE(16) (SBC-3 §5.9) and WRITE ATOMIC(16)
(SBC-4 §5.48), and the range lock that makes them atomic against other commands."""

from __future__ import annotations

import struct
import threading
import time
from typing import TYPE_CHECKING

from iscsi_vmtarget.scsi import Status
from iscsi_vmtarget.scsi.logical_unit import RangeLock

if TYPE_CHECKING:
    from tests.scsi.conftest import Harness

BLOCK = 512
INVALID_FIELD = (0x5, 0x24, 0x00)
LBA_OOB = (0x5, 0x21, 0x00)
MISCOMPARE = (0xE, 0x1D, 0x00)
WRITE_PROTECTED = (0x7, 0x27, 0x00)


def caw(lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQ3sBBB", 0x89, flags, lba, b"", blocks, 0, 0)


def orwrite(lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", 0x8B, flags, lba, blocks, 0, 0)


def write_atomic(lba: int, blocks: int, boundary: int = 0, flags: int = 0) -> bytes:
    return struct.pack(">BBQHHBB", 0x9C, flags, lba, boundary, blocks, 0, 0)


# -- COMPARE AND WRITE -----------------------------------------------------------------------


def test_compare_and_write_writes_when_equal(scsi: Harness) -> None:
    scsi.backend.write(4 * BLOCK, b"A" * 2 * BLOCK)
    response = scsi.run(caw(4, 2), b"A" * 2 * BLOCK + b"B" * 2 * BLOCK)
    assert response.status == Status.GOOD and response.data_out_length == 4 * BLOCK
    assert scsi.backend.read(4 * BLOCK, 2 * BLOCK) == b"B" * 2 * BLOCK


def test_compare_and_write_miscompare_reports_the_offset(scsi: Harness) -> None:
    """MISCOMPARE DURING VERIFY OPERATION with INFORMATION = offset of the first
    differing byte in the verify data; nothing is written."""
    scsi.backend.write(0, b"A" * 3 * BLOCK)
    verify = bytearray(b"A" * 3 * BLOCK)
    verify[3 * BLOCK - 27] = ord("C")
    response = scsi.check(caw(0, 3), MISCOMPARE, bytes(verify) + b"B" * 3 * BLOCK)
    assert response.sense[0] == 0xF0  # VALID
    assert struct.unpack(">I", response.sense[3:7])[0] == 3 * BLOCK - 27
    assert scsi.backend.read(0, 3 * BLOCK) == b"A" * 3 * BLOCK


def test_compare_and_write_miscompare_in_descriptor_format(scsi: Harness) -> None:
    scsi.lu.mode.apply({0x0A: scsi.lu.mode.page(0x0A)[:2] + b"\x06" + scsi.lu.mode.page(0x0A)[3:]})
    response = scsi.check(caw(0, 1), MISCOMPARE, b"\x01" * BLOCK + bytes(BLOCK))
    assert response.sense == bytes.fromhex("720e1d00 0000000c 000a8000 0000000000000000")


def test_compare_and_write_zero_blocks_is_a_no_op(scsi: Harness) -> None:
    scsi.good(caw(0, 0), b"")
    scsi.good(caw(2047, 0), b"")


def test_compare_and_write_data_out_must_match_the_cdb(scsi: Harness) -> None:
    """libiscsi CompareAndWrite.InvalidDataOutSize: too small or too large a Data-Out."""
    scsi.check(caw(0, 1), INVALID_FIELD, bytes(4 * BLOCK))
    scsi.check(caw(0, 3), INVALID_FIELD, bytes(4 * BLOCK))
    scsi.check(caw(0, 0), INVALID_FIELD, bytes(BLOCK))


def test_compare_and_write_limits(scsi: Harness) -> None:
    scsi.check(caw(2047, 2), LBA_OOB, bytes(4 * BLOCK))
    scsi.check(caw(2**64 - 1, 1), LBA_OOB, bytes(2 * BLOCK))
    response = scsi.check(caw(0, 1, 0x20), INVALID_FIELD, bytes(2 * BLOCK))  # WRPROTECT
    assert response.sense[15:18] == bytes.fromhex("cd0001")
    scsi.good(caw(0, 255), bytes(2 * 255 * BLOCK))  # MAXIMUM COMPARE AND WRITE LENGTH


def test_compare_and_write_dpo_fua(scsi: Harness) -> None:
    scsi.good(caw(0, 1, 0x18), bytes(2 * BLOCK))
    assert scsi.backend.flushes == 1  # FUA


def test_compare_and_write_read_only(scsi_ro: Harness) -> None:
    scsi_ro.check(caw(0, 1), WRITE_PROTECTED, bytes(2 * BLOCK))


def test_compare_and_write_is_atomic_against_other_writes(scsi: Harness) -> None:
    """While COMPARE AND WRITE holds its blocks, a WRITE to them waits."""
    lu = scsi.lu
    order: list[str] = []
    with lu.ranges.hold(10, 1):
        writer = threading.Thread(
            target=lambda: (scsi.good(scsi.cdb10(0x2A, 10, 1), b"W" * BLOCK), order.append("w"))
        )
        writer.start()
        time.sleep(0.05)
        order.append("caw")
        assert writer.is_alive()
    writer.join(5)
    assert order == ["caw", "w"]
    assert scsi.backend.read(10 * BLOCK, BLOCK) == b"W" * BLOCK


def test_range_lock_lets_disjoint_ranges_through() -> None:
    lock = RangeLock()
    with lock.hold(0, 8):
        done = threading.Event()
        thread = threading.Thread(target=lambda: (lock.hold(8, 8).__enter__(), done.set()))
        thread.start()
        assert done.wait(2)


# -- ORWRITE ---------------------------------------------------------------------------------


def test_orwrite_ors_into_the_medium(scsi: Harness) -> None:
    scsi.backend.write(BLOCK, b"\x0f" * BLOCK + b"\x00" * BLOCK)
    scsi.good(orwrite(1, 2), b"\xf0" * BLOCK + b"\x81" * BLOCK)
    assert scsi.backend.read(BLOCK, 2 * BLOCK) == b"\xff" * BLOCK + b"\x81" * BLOCK


def test_orwrite_checks(scsi: Harness) -> None:
    scsi.good(orwrite(2047, 0), b"")
    scsi.check(orwrite(2048, 0), LBA_OOB)
    scsi.check(orwrite(2047, 2), LBA_OOB, bytes(2 * BLOCK))
    response = scsi.check(orwrite(0, 1, 0x20), INVALID_FIELD, bytes(BLOCK))  # ORPROTECT
    assert response.sense[15:18] == bytes.fromhex("cd0001")


def test_orwrite_read_only(scsi_ro: Harness) -> None:
    scsi_ro.check(orwrite(0, 1), WRITE_PROTECTED, bytes(BLOCK))


# -- WRITE ATOMIC ----------------------------------------------------------------------------


def test_write_atomic_writes_aligned_granules(scsi: Harness) -> None:
    response = scsi.run(write_atomic(8, 16), b"\x77" * 16 * BLOCK)
    assert response.status == Status.GOOD and response.data_out_length == 16 * BLOCK
    assert scsi.backend.read(8 * BLOCK, 16 * BLOCK) == b"\x77" * 16 * BLOCK


def test_write_atomic_alignment_granularity_and_boundary(scsi: Harness) -> None:
    response = scsi.check(write_atomic(1, 8), INVALID_FIELD, bytes(8 * BLOCK))
    assert response.sense[15:18] == bytes.fromhex("c00002")  # ATOMIC ALIGNMENT
    response = scsi.check(write_atomic(0, 1), INVALID_FIELD, bytes(BLOCK))
    assert response.sense[15:18] == bytes.fromhex("c0000c")  # ATOMIC TRANSFER LENGTH GRANULARITY
    response = scsi.check(write_atomic(0, 8, boundary=8), INVALID_FIELD, bytes(8 * BLOCK))
    assert response.sense[15:18] == bytes.fromhex("c0000a")  # ATOMIC BOUNDARY


def test_write_atomic_maximum_transfer(harness_factory: type[Harness]) -> None:
    big = harness_factory.create(blocks=4096)
    big.good(write_atomic(0, 2048), bytes(2048 * BLOCK))  # MAXIMUM ATOMIC TRANSFER LENGTH
    big.check(write_atomic(0, 2056), INVALID_FIELD, bytes(2056 * BLOCK))


def test_write_atomic_range_is_checked_first(scsi: Harness) -> None:
    scsi.check(write_atomic(2049, 8), LBA_OOB, bytes(8 * BLOCK))
    scsi.good(write_atomic(2040, 0), b"")


def test_write_atomic_fua_flushes(scsi: Harness) -> None:
    scsi.good(write_atomic(0, 8, flags=0x08), bytes(8 * BLOCK))
    assert scsi.backend.flushes == 1
