"""VERIFY (SBC-3 §5.27-5.29) and WRITE AND VERIFY (SBC-3 §5.36-5.38)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest

from iscsi_vmtarget.scsi import Status

if TYPE_CHECKING:
    from tests.scsi.conftest import Harness

BLOCK = 512
MISCOMPARE = (0xE, 0x1D, 0x00)
LBA_OOB = (0x5, 0x21, 0x00)
INVALID_FIELD = (0x5, 0x24, 0x00)
VERIFY = {10: 0x2F, 12: 0xAF, 16: 0x8F}
WRITE_AND_VERIFY = {10: 0x2E, 12: 0xAE, 16: 0x8E}


def cdb(scsi: Harness, size: int, opcode: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return {10: scsi.cdb10, 12: scsi.cdb12, 16: scsi.cdb16}[size](opcode, lba, blocks, flags)


@pytest.fixture
def filled(scsi: Harness) -> Harness:
    scsi.backend.write(0, os.urandom(16 * BLOCK))
    return scsi


@pytest.mark.parametrize("size", [10, 12, 16])
def test_bytchk_match(filled: Harness, size: int) -> None:
    data = filled.backend.read(2 * BLOCK, 4 * BLOCK)
    response = filled.run(cdb(filled, size, VERIFY[size], 2, 4, 0x02), data)
    assert response.status == Status.GOOD
    assert response.data_out_length == 4 * BLOCK


@pytest.mark.parametrize("size", [10, 12, 16])
@pytest.mark.parametrize("offset", [0, 1, 511, 512, 2047])
def test_bytchk_mismatch_reports_offset(filled: Harness, size: int, offset: int) -> None:
    data = bytearray(filled.backend.read(2 * BLOCK, 4 * BLOCK))
    data[offset] ^= ord("X")
    response = filled.check(cdb(filled, size, VERIFY[size], 2, 4, 0x02), MISCOMPARE, data)
    assert response.sense[0] == 0xF0  # VALID
    assert int.from_bytes(response.sense[3:7], "big") == offset


def test_bytchk_zero_ignores_data(filled: Harness) -> None:
    response = filled.run(filled.cdb10(0x2F, 0, 4, 0x00), b"garbage")
    assert response.status == Status.GOOD
    assert response.data_out_length == 0


def test_bytchk_11_compares_one_block_with_each(scsi: Harness) -> None:
    pattern = bytes(range(256)) * 2
    scsi.backend.write(BLOCK, pattern * 3)
    response = scsi.run(scsi.cdb10(0x2F, 1, 3, 0x06), pattern)
    assert response.status == Status.GOOD and response.data_out_length == BLOCK
    scsi.backend.write(3 * BLOCK + 10, b"\xee")
    response = scsi.check(scsi.cdb10(0x2F, 1, 3, 0x06), MISCOMPARE, pattern)
    assert int.from_bytes(response.sense[3:7], "big") == 2 * BLOCK + 10


def test_bytchk_10_is_reserved(scsi: Harness) -> None:
    response = scsi.check(scsi.cdb10(0x2F, 0, 1, 0x04), INVALID_FIELD, bytes(BLOCK))
    assert response.sense[15:18] == bytes.fromhex("ca0001")


@pytest.mark.parametrize("vrprotect", range(1, 8))
def test_vrprotect_refused(scsi: Harness, vrprotect: int) -> None:
    scsi.check(scsi.cdb10(0x2F, 0, 1, vrprotect << 5 | 0x02), INVALID_FIELD, bytes(BLOCK))


def test_dpo_accepted(filled: Harness) -> None:
    data = filled.backend.read(0, BLOCK)
    filled.good(filled.cdb10(0x2F, 0, 1, 0x10 | 0x02), data)


def test_verify_range(scsi: Harness) -> None:
    n = scsi.lu.num_blocks
    scsi.good(scsi.cdb10(0x2F, 0, 0, 0x02))
    for lba, blocks in ((n + 1, 0), (0x80000000, 1), (0xFFFFFFFF, 1), (n - 1, 2)):
        scsi.check(scsi.cdb10(0x2F, lba, blocks, 0x02), LBA_OOB, bytes(blocks * BLOCK))


def test_verify_with_short_data_compares_what_arrived(filled: Harness) -> None:
    data = filled.backend.read(0, 2 * BLOCK)
    filled.good(filled.cdb10(0x2F, 0, 2, 0x02), data[:700])


@pytest.mark.parametrize("size", [10, 12, 16])
def test_write_and_verify(scsi: Harness, size: int) -> None:
    data = os.urandom(3 * BLOCK)
    for bytchk in (0, 0x02):
        response = scsi.run(cdb(scsi, size, WRITE_AND_VERIFY[size], 5, 3, bytchk), data)
        assert response.status == Status.GOOD
        assert response.data_out_length == 3 * BLOCK
        assert scsi.backend.read(5 * BLOCK, 3 * BLOCK) == data
    assert scsi.backend.flushes == 2
    assert scsi.target.may_block(cdb(scsi, size, WRITE_AND_VERIFY[size], 5, 3))


def test_write_and_verify_dpo_and_bytchk_bits(scsi: Harness) -> None:
    scsi.good(scsi.cdb10(0x2E, 0, 1, 0x10), bytes(BLOCK))
    scsi.check(scsi.cdb10(0x2E, 0, 1, 0x04), INVALID_FIELD, bytes(BLOCK))  # reserved bit 2
    scsi.check(scsi.cdb10(0x2E, 0, 1, 0x08), INVALID_FIELD, bytes(BLOCK))  # no FUA here


def test_write_and_verify_residuals(scsi: Harness) -> None:
    scsi.backend.write(0, b"a" * 2 * BLOCK)
    response = scsi.run(scsi.cdb10(0x2E, 0, 1), None)
    assert response.status == Status.GOOD and response.data_out_length == BLOCK
    response = scsi.run(scsi.cdb10(0x2E, 0, 2), b"b" * BLOCK)
    assert response.status == Status.GOOD and response.data_out_length == 2 * BLOCK
    assert scsi.backend.read(0, 2 * BLOCK) == b"b" * BLOCK + b"a" * BLOCK
    response = scsi.run(scsi.cdb10(0x2E, 0, 1), b"c" * 200)
    assert response.status == Status.GOOD
    assert scsi.backend.read(0, BLOCK) == b"c" * 200 + b"b" * (BLOCK - 200)


def test_write_and_verify_beyond_end(scsi: Harness) -> None:
    n = scsi.lu.num_blocks
    scsi.check(scsi.cdb16(0x8E, n, 1), LBA_OOB, bytes(BLOCK))
    scsi.check(scsi.cdb16(0x8E, 2**64 - 1, 1), LBA_OOB, bytes(BLOCK))
