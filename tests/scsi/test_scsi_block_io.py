"""Block commands (SBC-3 §5): READ/WRITE 6/10/12/16, capacity, cache, start/stop."""

from __future__ import annotations

import struct
import uuid
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iscsi_vmtarget.scsi import LogicalUnit, ScsiTarget, Status, UnitIdentity

if TYPE_CHECKING:
    from tests.scsi.conftest import Harness

LBA_OOB = (0x5, 0x21, 0x00)
INVALID_FIELD = (0x5, 0x24, 0x00)
WRITE_PROTECTED = (0x7, 0x27, 0x00)
BLOCK = 512

READS = {6: 0x08, 10: 0x28, 12: 0xA8, 16: 0x88}
WRITES = {6: 0x0A, 10: 0x2A, 12: 0xAA, 16: 0x8A}


def build(scsi: Harness, size: int, opcode: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    if size == 6:
        return scsi.cdb6(opcode, lba, blocks)
    return {10: scsi.cdb10, 12: scsi.cdb12, 16: scsi.cdb16}[size](opcode, lba, blocks, flags)


@pytest.mark.parametrize("size", [6, 10, 12, 16])
def test_write_then_read(scsi: Harness, size: int) -> None:
    data = bytes(range(256)) * 2 * 3
    response = scsi.run(build(scsi, size, WRITES[size], 7, 3), data)
    assert response.status == Status.GOOD
    assert response.data_out_length == 3 * BLOCK
    assert scsi.good(build(scsi, size, READS[size], 7, 3)) == data
    assert scsi.backend.read(7 * BLOCK, 3 * BLOCK) == data


def test_read_returns_one_buffer_of_the_transfer_size(scsi: Harness) -> None:
    response = scsi.run(scsi.cdb10(0x28, 0, 4))
    assert isinstance(response.data_in, bytearray)
    assert len(response.data_in) == 4 * BLOCK


def test_read6_zero_means_256_blocks(scsi: Harness) -> None:
    assert len(scsi.good(scsi.cdb6(0x08, 0, 0))) == 256 * BLOCK


def test_write6_zero_means_256_blocks(scsi: Harness) -> None:
    response = scsi.run(scsi.cdb6(0x0A, 0, 0), b"\x01" * 256 * BLOCK)
    assert response.status == Status.GOOD and response.data_out_length == 256 * BLOCK


@pytest.mark.parametrize("size", [10, 12, 16])
def test_zero_blocks_is_no_transfer_but_lba_checked(scsi: Harness, size: int) -> None:
    blocks = scsi.lu.num_blocks
    assert scsi.good(build(scsi, size, READS[size], 0, 0)) == b""
    response = scsi.run(build(scsi, size, WRITES[size], 0, 0))
    assert response.status == Status.GOOD and response.data_out_length == 0
    for lba in (blocks + 1, 0x80000000, 0xFFFFFFFF):
        scsi.check(build(scsi, size, READS[size], lba, 0), LBA_OOB)
        scsi.check(build(scsi, size, WRITES[size], lba, 0), LBA_OOB)


def test_read16_wrapping_lba_is_out_of_range(scsi: Harness) -> None:
    scsi.check(scsi.cdb16(0x88, 0xFFFFFFFFFFFFFFFF, 1), LBA_OOB)
    scsi.check(scsi.cdb16(0x88, 0xFFFFFFFFFFFFFFFF, 0), LBA_OOB)
    scsi.check(scsi.cdb16(0x88, 0xFFFFFFFFFFFFFFF0, 0x20), LBA_OOB)


def test_read_beyond_end(scsi: Harness) -> None:
    n = scsi.lu.num_blocks
    for blocks in (1, 2, 256):
        scsi.check(scsi.cdb10(0x28, n + 1 - blocks, blocks), LBA_OOB)
    scsi.check(scsi.cdb10(0x28, n - 1, 2), LBA_OOB)
    assert len(scsi.good(scsi.cdb10(0x28, n - 1, 1))) == BLOCK
    scsi.check(scsi.cdb6(0x08, 0x1FFFFF, 1), LBA_OOB)


_LBAS = st.one_of(
    st.integers(min_value=0, max_value=2**64 - 1),
    st.integers(min_value=0, max_value=2100),
    st.sampled_from([2**32 - 1, 2**63, 2**64 - 1, 2**64 - 256]),
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lba=_LBAS, blocks=st.integers(min_value=0, max_value=300))
def test_lba_range_boundaries(scsi: Harness, lba: int, blocks: int) -> None:
    n = scsi.lu.num_blocks
    in_range = lba < n and lba + blocks <= n
    commands = [
        (scsi.cdb16(0x88, lba, blocks), None),  # READ(16)
        (scsi.cdb16(0x8A, lba, blocks), bytes(blocks * BLOCK)),  # WRITE(16)
        (scsi.cdb16(0x8F, lba, blocks), None),  # VERIFY(16), BYTCHK 0
        (scsi.cdb16(0x91, lba, blocks), None),  # SYNCHRONIZE CACHE(16)
        (scsi.cdb16(0x90, lba, blocks), None),  # PRE-FETCH(16)
    ]
    for cdb, data in commands:
        response = scsi.run(cdb, data)
        if in_range:
            assert response.status == Status.GOOD
        else:
            assert scsi.sense(response) == LBA_OOB


@pytest.mark.parametrize("opcode", [0x28, 0xA8, 0x88, 0x2A, 0xAA, 0x8A])
@pytest.mark.parametrize("protect", range(1, 8))
def test_protect_field_refused(scsi: Harness, opcode: int, protect: int) -> None:
    size = {0x28: 10, 0x2A: 10, 0xA8: 12, 0xAA: 12, 0x88: 16, 0x8A: 16}[opcode]
    cdb = build(scsi, size, opcode, 0, 1, protect << 5)
    response = scsi.check(cdb, INVALID_FIELD, bytes(BLOCK))
    assert response.sense[15] == 0xC8 | (protect.bit_length() + 4)  # SKSV C/D BPV, bit
    assert response.sense[16:18] == b"\x00\x01"


@pytest.mark.parametrize("flags", [0x10, 0x08, 0x18])
def test_dpo_fua_accepted(scsi: Harness, flags: int) -> None:
    scsi.good(scsi.cdb10(0x28, 0, 1, flags))
    scsi.good(scsi.cdb10(0x2A, 0, 1, flags), bytes(BLOCK))


def test_fua_flushes(scsi: Harness) -> None:
    scsi.good(scsi.cdb10(0x2A, 0, 1), bytes(BLOCK))
    assert scsi.backend.flushes == 0
    scsi.good(scsi.cdb16(0x8A, 0, 1, 0x08), bytes(BLOCK))
    assert scsi.backend.flushes == 1
    assert scsi.target.may_block(scsi.cdb16(0x8A, 0, 1, 0x08))
    assert not scsi.target.may_block(scsi.cdb16(0x8A, 0, 1))
    assert not scsi.target.may_block(scsi.cdb16(0x88, 0, 1, 0x08))


# -- short and long Data-Out (libiscsi iSCSIResiduals) ------------------------------------


def test_write_without_data_writes_nothing(scsi: Harness) -> None:
    scsi.backend.write(0, b"a" * BLOCK)
    response = scsi.run(scsi.cdb10(0x2A, 0, 1), None)
    assert response.status == Status.GOOD
    assert response.data_out_length == BLOCK  # transport: overflow of one block
    assert scsi.backend.read(0, BLOCK) == b"a" * BLOCK


def test_write_with_more_data_writes_only_the_transfer_length(scsi: Harness) -> None:
    scsi.backend.write(0, b"a" * 2 * BLOCK)
    response = scsi.run(scsi.cdb10(0x2A, 0, 1), b"b" * 2 * BLOCK)
    assert response.status == Status.GOOD and response.data_out_length == BLOCK
    assert scsi.backend.read(0, 2 * BLOCK) == b"b" * BLOCK + b"a" * BLOCK


def test_write_with_less_data_writes_what_arrived(scsi: Harness) -> None:
    scsi.backend.write(0, b"a" * 2 * BLOCK)
    response = scsi.run(scsi.cdb10(0x2A, 0, 2), b"b" * BLOCK)
    assert response.status == Status.GOOD and response.data_out_length == 2 * BLOCK
    assert scsi.backend.read(0, 2 * BLOCK) == b"b" * BLOCK + b"a" * BLOCK


def test_write_with_partial_block_writes_the_bytes_received(scsi: Harness) -> None:
    scsi.backend.write(0, b"a" * BLOCK)
    response = scsi.run(scsi.cdb10(0x2A, 0, 1), b"b" * 200)
    assert response.status == Status.GOOD and response.data_out_length == BLOCK
    assert scsi.backend.read(0, BLOCK) == b"b" * 200 + b"a" * (BLOCK - 200)


def test_data_out_for_a_read_is_ignored(scsi: Harness) -> None:
    response = scsi.run(scsi.cdb10(0x28, 0, 1), b"x" * BLOCK)
    assert response.status == Status.GOOD and response.data_out_length == 0
    assert len(response.data_in) == BLOCK


# -- protection, limits, failures -------------------------------------------------------


@pytest.mark.parametrize("size", [6, 10, 12, 16])
def test_read_only_lu_refuses_writes(scsi_ro: Harness, size: int) -> None:
    scsi_ro.check(build(scsi_ro, size, WRITES[size], 0, 1), WRITE_PROTECTED, bytes(BLOCK))
    scsi_ro.good(build(scsi_ro, size, READS[size], 0, 1))
    scsi_ro.check(scsi_ro.cdb10(0x2E, 0, 1), WRITE_PROTECTED, bytes(BLOCK))


def test_transfer_above_maximum_is_refused(scsi: Harness) -> None:
    lu = LogicalUnit(scsi.backend, scsi.lu.identity, max_transfer_bytes=4 * BLOCK)
    target = ScsiTarget({0: lu})
    response = target.execute(scsi.nexus, 0, scsi.cdb10(0x28, 0, 5), None)
    assert scsi.sense(response) == INVALID_FIELD
    assert response.sense[15:18] == bytes.fromhex("c00007")
    assert target.execute(scsi.nexus, 0, scsi.cdb10(0x28, 0, 4), None).status == Status.GOOD


def test_backend_failures_are_medium_errors(scsi: Harness) -> None:
    scsi.backend.fail_reads = True
    scsi.check(scsi.cdb10(0x28, 0, 1), (0x3, 0x11, 0x00))
    scsi.backend.fail_writes = True
    scsi.check(scsi.cdb10(0x2A, 0, 1), (0x3, 0x0C, 0x00), bytes(BLOCK))


def test_unexpected_exception_is_internal_target_failure(
    scsi: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(offset: int, buf: memoryview) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(scsi.backend, "read_into", boom)
    scsi.check(scsi.cdb10(0x28, 0, 1), (0x4, 0x44, 0x00))


# -- capacity ----------------------------------------------------------------------------


def test_read_capacity10(scsi: Harness) -> None:
    data = scsi.good(bytes.fromhex("25000000000000000000"))
    assert data == struct.pack(">II", 2047, BLOCK)


def test_read_capacity16(scsi: Harness) -> None:
    data = scsi.good(bytes.fromhex("9e10 0000000000000000 00000020 00 00"))
    assert data == struct.pack(">QI", 2047, BLOCK) + bytes(20)


@pytest.mark.parametrize("alloc", range(0, 17))
def test_read_capacity16_short_allocation(scsi: Harness, alloc: int) -> None:
    data = scsi.good(bytes.fromhex("9e10 0000000000000000") + struct.pack(">IBB", alloc, 0, 0))
    assert data == (struct.pack(">QI", 2047, BLOCK) + bytes(20))[:alloc]


def test_service_action_in_unknown_action(scsi: Harness) -> None:
    response = scsi.check(bytes.fromhex("9e11") + bytes(14), INVALID_FIELD)
    assert response.sense[15:18] == bytes.fromhex("cc0001")


class _HugeBackend:
    """A 2 TiB + backend that is never read: only its size matters."""

    size = (2**32 + 10) * BLOCK
    read_only = False

    def flush(self) -> None: ...


def test_read_capacity10_of_a_huge_lu_is_all_ones(scsi: Harness) -> None:
    identity = UnitIdentity.from_uuid(uuid.UUID(int=1))
    lu = LogicalUnit(_HugeBackend(), identity)  # type: ignore[arg-type]
    target = ScsiTarget({0: lu})
    rc10 = target.execute(scsi.nexus, 0, bytes.fromhex("25000000000000000000"), None)
    assert bytes(rc10.data_in) == struct.pack(">II", 0xFFFFFFFF, BLOCK)
    rc16 = target.execute(scsi.nexus, 0, bytes.fromhex("9e10") + bytes(8) + b"\0\0\0\x20\0\0", None)
    assert bytes(rc16.data_in)[:8] == struct.pack(">Q", 2**32 + 9)


def test_block_size_4096(harness_factory: type[Harness]) -> None:
    h = harness_factory.create(blocks=64, block=4096)
    assert h.good(bytes.fromhex("25000000000000000000")) == struct.pack(">II", 63, 4096)
    h.good(h.cdb10(0x2A, 63, 1), b"z" * 4096)
    assert h.good(h.cdb10(0x28, 63, 1)) == b"z" * 4096
    h.check(h.cdb10(0x28, 63, 2), LBA_OOB)


# -- cache, pre-fetch, start/stop ----------------------------------------------------------


@pytest.mark.parametrize("cdb_hex", ["35 00 00000000 00 0000 00", "91 00" + "00" * 14])
def test_synchronize_cache_flushes(scsi: Harness, cdb_hex: str) -> None:
    cdb = bytes.fromhex(cdb_hex)
    scsi.good(cdb)
    assert scsi.backend.flushes == 1
    assert scsi.target.may_block(cdb)


def test_synchronize_cache_range_checked(scsi: Harness) -> None:
    scsi.check(scsi.cdb10(0x35, 2047, 2), LBA_OOB)
    scsi.good(scsi.cdb10(0x35, 2047, 1))
    scsi.good(scsi.cdb10(0x35, 2047, 0))
    scsi.check(scsi.cdb10(0x35, 2048, 0), LBA_OOB)


def test_pre_fetch(scsi: Harness) -> None:
    scsi.good(scsi.cdb10(0x34, 0, 256))
    scsi.good(scsi.cdb16(0x90, 2047, 1))
    scsi.check(scsi.cdb10(0x34, 2047, 2), LBA_OOB)


def start_stop(immed: int, power: int, no_flush: int, loej: int, start: int) -> bytes:
    return bytes([0x1B, immed, 0, 0, power << 4 | no_flush << 2 | loej << 1 | start, 0])


def test_start_stop_unit(scsi: Harness) -> None:
    scsi.good(start_stop(1, 0, 0, 0, 1))
    assert scsi.backend.flushes == 0
    scsi.good(start_stop(0, 0, 0, 0, 0))  # stop: flush first
    assert scsi.backend.flushes == 1
    assert scsi.target.may_block(start_stop(0, 0, 0, 0, 0))
    assert not scsi.target.may_block(start_stop(0, 0, 1, 0, 0))
    scsi.good(start_stop(0, 0, 1, 0, 0))
    assert scsi.backend.flushes == 1
    scsi.good(start_stop(1, 3, 0, 0, 0))  # STANDBY power condition
    scsi.good(bytes(6))  # still ready


def test_start_stop_unit_refuses_eject_of_fixed_medium(scsi: Harness) -> None:
    response = scsi.check(start_stop(1, 0, 0, 1, 0), INVALID_FIELD)
    assert response.sense[15:18] == bytes.fromhex("c90004")
    scsi.check(start_stop(0, 0, 0, 1, 1), INVALID_FIELD)


def test_start_stop_unit_reserved_power_condition(scsi: Harness) -> None:
    scsi.check(start_stop(0, 5, 0, 0, 1), INVALID_FIELD)
