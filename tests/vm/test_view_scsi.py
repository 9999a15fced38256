"""Guest isolation through the device server: every data opcode x every concealment mode
x the boundary cases, via ScsiTarget.execute on a LogicalUnit over a GuestView.

The unit's hidden bytes are all 0xA5 and its guest bytes start as zeros, so a test can
tell any leak (0xA5 in a Data-In) or any stray write (a hidden byte changed) apart.
Expected sense is exact: LOGICAL BLOCK ADDRESS OUT OF RANGE is ILLEGAL REQUEST, 21h/00h
(SBC-3 §4.5). Opcodes this SCSI layer does not implement yet are skipped.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iscsi_vmtarget.scsi import Status
from iscsi_vmtarget.scsi.opcodes import find_row
from iscsi_vmtarget.vm.format.header import Mode
from tests.vm.helpers import (
    BLOCK,
    HIDDEN_BYTE,
    LBA_OOB,
    ScsiOnView,
    cdb6,
    cdb10,
    cdb12,
    cdb16,
    sense_triplet,
)

DISK = 4 << 20
N = DISK // BLOCK  # guest blocks
PATTERN = 0x5A

Build = Callable[[int, int], tuple[bytes, bytes | None]]


def _data(blocks: int) -> bytes:
    return bytes([PATTERN]) * (blocks * BLOCK)


def _rw(size: int, opcode: int, flags: int = 0, data: bool = False) -> Build:
    def build(lba: int, blocks: int) -> tuple[bytes, bytes | None]:
        if size == 6:
            cdb = cdb6(opcode, lba, blocks)
        else:
            cdb = {10: cdb10, 12: cdb12, 16: cdb16}[size](opcode, lba, blocks, flags)
        payload = _data(min(blocks, 64)) if data else None
        return cdb, payload

    return build


def _write_same(size: int, unmap: bool) -> Build:
    flags = 0x08 if unmap else 0

    def build(lba: int, blocks: int) -> tuple[bytes, bytes | None]:
        cdb = (cdb10 if size == 10 else cdb16)(0x41 if size == 10 else 0x93, lba, blocks, flags)
        return cdb, bytes(BLOCK) if unmap else _data(1)

    return build


def _unmap(lba: int, blocks: int) -> tuple[bytes, bytes | None]:
    params = struct.pack(">HH4sQI4s", 22, 16, b"", lba, blocks, b"")  # SBC-3 §5.28.2
    cdb = struct.pack(">BB4sBHB", 0x42, 0, b"", 0, len(params), 0)
    return cdb, params


def _compare_and_write(lba: int, blocks: int) -> tuple[bytes, bytes | None]:
    cdb = struct.pack(">BBQ3sBBB", 0x89, 0, lba, b"", blocks & 0xFF, 0, 0)
    return cdb, bytes(blocks * BLOCK) + _data(blocks)  # compare with zeros, write pattern


def _write_atomic(lba: int, blocks: int) -> tuple[bytes, bytes | None]:
    cdb = struct.pack(">BBQHHBB", 0x9C, 0, lba, 0, blocks & 0xFFFF, 0, 0)
    return cdb, _data(min(blocks, 64))


def _get_lba_status(lba: int, blocks: int) -> tuple[bytes, bytes | None]:
    return struct.pack(">BBQIBB", 0x9E, 0x12, lba, 4096, 0, 0), None


@dataclass(frozen=True)
class Op:
    name: str
    build: Build
    granule: int = 1  # blocks per access (WRITE ATOMIC: one 4 KiB allocation unit)
    max_lba: int = (1 << 64) - 1
    max_blocks: int = 0xFFFFFFFF
    has_length: bool = True


OPS = [
    Op("READ(6)", _rw(6, 0x08), max_lba=0x1FFFFF, max_blocks=256),
    Op("READ(10)", _rw(10, 0x28), max_lba=0xFFFFFFFF, max_blocks=0xFFFF),
    Op("READ(12)", _rw(12, 0xA8), max_lba=0xFFFFFFFF),
    Op("READ(16)", _rw(16, 0x88)),
    Op("WRITE(6)", _rw(6, 0x0A, data=True), max_lba=0x1FFFFF, max_blocks=256),
    Op("WRITE(10)", _rw(10, 0x2A, data=True), max_lba=0xFFFFFFFF, max_blocks=0xFFFF),
    Op("WRITE(12)", _rw(12, 0xAA, data=True), max_lba=0xFFFFFFFF),
    Op("WRITE(16)", _rw(16, 0x8A, data=True)),
    Op("WRITE AND VERIFY(10)", _rw(10, 0x2E, 0x02, True), max_lba=0xFFFFFFFF, max_blocks=0xFFFF),
    Op("WRITE AND VERIFY(12)", _rw(12, 0xAE, 0x02, True), max_lba=0xFFFFFFFF),
    Op("WRITE AND VERIFY(16)", _rw(16, 0x8E, 0x02, True)),
    Op("VERIFY(10)", _rw(10, 0x2F), max_lba=0xFFFFFFFF, max_blocks=0xFFFF),
    Op("VERIFY(12)", _rw(12, 0xAF), max_lba=0xFFFFFFFF),
    Op("VERIFY(16)", _rw(16, 0x8F)),
    Op("PRE-FETCH(10)", _rw(10, 0x34), max_lba=0xFFFFFFFF, max_blocks=0xFFFF),
    Op("PRE-FETCH(16)", _rw(16, 0x90)),
    Op("SYNCHRONIZE CACHE(10)", _rw(10, 0x35), max_lba=0xFFFFFFFF, max_blocks=0xFFFF),
    Op("SYNCHRONIZE CACHE(16)", _rw(16, 0x91)),
    Op("WRITE SAME(10)", _write_same(10, False), max_lba=0xFFFFFFFF, max_blocks=0xFFFF),
    Op("WRITE SAME(10) UNMAP", _write_same(10, True), max_lba=0xFFFFFFFF, max_blocks=0xFFFF),
    Op("WRITE SAME(16)", _write_same(16, False)),
    Op("WRITE SAME(16) UNMAP", _write_same(16, True)),
    Op("UNMAP", _unmap),
    Op("COMPARE AND WRITE", _compare_and_write, max_blocks=255),
    Op("ORWRITE(16)", _rw(16, 0x8B, data=True)),
    Op("WRITE ATOMIC(16)", _write_atomic, granule=8, max_blocks=0xFFF8),
    Op("GET LBA STATUS", _get_lba_status, has_length=False),
]

MODES = list(Mode)


def _cases(op: Op) -> list[tuple[str, int, int, bool]]:
    """(case, lba, blocks, in range) at the end of the disk."""
    g = op.granule
    cases = [
        ("last_block", N - g, g, True),
        ("first_hidden_block", N, g, False),
        ("lba_max", op.max_lba // g * g, g, False),
    ]
    if op.has_length:
        cases += [
            ("straddle", N - g, 2 * g, False),
            (
                "length_overflows",
                max(0, N - op.max_blocks // 2) // g * g,
                op.max_blocks // g * g,
                False,
            ),
        ]
    return cases


def _harness(mode: Mode) -> ScsiOnView:
    return ScsiOnView.create(mode, DISK)


def _skip_unless_implemented(harness: ScsiOnView, cdb: bytes) -> None:
    row = find_row(cdb)
    if row is None:
        pytest.skip("opcode not implemented by this SCSI layer")
    if cdb[0] == 0x42 and not getattr(harness.lu, "thin_provisioning", False):
        pytest.skip("UNMAP needs a thin-provisioned LU")


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name.lower())
@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_boundaries(mode: Mode, op: Op) -> None:
    harness = _harness(mode)
    for case, lba, blocks, in_range in _cases(op):
        cdb, data = op.build(lba, blocks)
        _skip_unless_implemented(harness, cdb)
        response = harness.run(cdb, data)
        if in_range:
            assert response.status == Status.GOOD, (case, sense_triplet(response))
        else:
            assert response.status == Status.CHECK_CONDITION, case
            assert sense_triplet(response) == LBA_OOB, case
        assert HIDDEN_BYTE not in bytes(response.data_in), case
    assert harness.unit.hidden_intact()


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name.lower())
def test_capacity_is_the_disk(mode: Mode) -> None:
    harness = _harness(mode)
    rc10 = harness.good(bytes([0x25]) + bytes(9))
    assert struct.unpack(">II", rc10) == (N - 1, BLOCK)  # SBC-3 §5.15
    rc16 = harness.good(struct.pack(">BBQIBB", 0x9E, 0x10, 0, 32, 0, 0))
    assert struct.unpack_from(">QI", rc16) == (N - 1, BLOCK)  # SBC-3 §5.16


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name.lower())
def test_whole_disk_reads_never_show_hidden_bytes(mode: Mode) -> None:
    harness = _harness(mode)
    harness.good(cdb16(0x8A, 0, 64), _data(64))
    harness.good(cdb16(0x8A, N - 64, 64), _data(64))
    for lba in range(0, N, 2048):
        data = harness.good(cdb16(0x88, lba, 2048))
        assert HIDDEN_BYTE not in data
    assert harness.unit.hidden_intact()


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name.lower())
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lba=st.one_of(st.integers(0, N + 64), st.integers(0, (1 << 64) - 1)),
    blocks=st.one_of(st.integers(0, 128), st.integers(0, 0xFFFFFFFF)),
    write=st.booleans(),
)
def test_generated_ranges(mode: Mode, lba: int, blocks: int, write: bool) -> None:
    if mode not in _HARNESSES:
        _HARNESSES[mode] = _harness(mode)
    harness = _HARNESSES[mode]
    opcode = 0x8A if write else 0x88
    data = _data(blocks) if write and blocks <= 128 else None
    response = harness.run(cdb16(opcode, lba, blocks), data)
    in_range = lba < N and blocks <= N - lba
    if not in_range:
        assert response.status == Status.CHECK_CONDITION
        assert sense_triplet(response) == LBA_OOB
    elif blocks <= 128:
        assert response.status == Status.GOOD, sense_triplet(response)
    assert HIDDEN_BYTE not in bytes(response.data_in)
    if write:
        assert harness.unit.hidden_intact()


_HARNESSES: dict[Mode, ScsiOnView] = {}


def _xcopy(naa: bytes, blocks: int, src_lba: int, dst_lba: int) -> tuple[bytes, bytes]:
    """EXTENDED COPY (LID1) of one block-to-block segment within one LU (SPC-4 §6.4)."""
    ident = struct.pack(">BBBB16s4s", 0x01, 0x03, 0, 16, naa, b"")  # NAA designator
    target = struct.pack(">BBH24sB3s", 0xE4, 0x00, 0, ident, 0, (BLOCK).to_bytes(3, "big"))
    segment = struct.pack(">BBHHHHHQQ", 0x02, 0, 24, 0, 0, 0, blocks, src_lba, dst_lba)
    # LIST IDENTIFIER 0 with LIST ID USAGE 11b, the two list lengths, no inline data
    header = struct.pack(">BBH4sII", 0, 0x18, len(target), b"", len(segment), 0)
    params = header + target + segment
    cdb = struct.pack(">BB8sIBB", 0x83, 0x00, b"", len(params), 0, 0)
    return cdb, params


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name.lower())
def test_extended_copy_ranges_stay_on_the_disk(mode: Mode) -> None:
    harness = _harness(mode)
    naa = harness.lu.identity.naa
    cdb, params = _xcopy(naa, 1, 0, N - 1)
    if find_row(cdb) is None:
        pytest.skip("EXTENDED COPY not implemented by this SCSI layer")
    harness.good(cdb16(0x8A, 0, 1), _data(1))
    harness.good(cdb, params)  # last block: copied
    assert harness.good(cdb16(0x88, N - 1, 1)) == _data(1)
    for blocks, src, dst in [(1, N, 0), (1, 0, N), (2, N - 1, 0), (2, 0, N - 1), (1, 2**63, 0)]:
        response = harness.run(*_xcopy(naa, blocks, src, dst))
        assert response.status == Status.CHECK_CONDITION
        # COPY ABORTED, COPY TARGET DEVICE NOT REACHABLE (SPC-4 §6.4.3.4)
        assert sense_triplet(response) == (0xA, 0x0D, 0x02)
    assert harness.unit.hidden_intact()


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name.lower())
@pytest.mark.parametrize("action", ["overwrite", "block erase"])
def test_sanitize_erases_the_disk_and_nothing_else(mode: Mode, action: str) -> None:
    """SANITIZE (SBC-3 §5.18) covers the whole medium: through a guest view that is the
    disk, never the hidden regions."""
    harness = _harness(mode)
    if action == "overwrite":
        params = struct.pack(">BBH", 0x01, 0, 4) + b"\x11\x22\x33\x44"  # one pass
        cdb = struct.pack(">BB5sHB", 0x48, 0x01, b"", len(params), 0)
    else:
        params = None
        cdb = struct.pack(">BB5sHB", 0x48, 0x02, b"", 0, 0)
    if find_row(cdb) is None:
        pytest.skip("SANITIZE not implemented by this SCSI layer")
    harness.good(cdb16(0x8A, N - 8, 8), _data(8))
    harness.good(cdb, params)
    expected = b"\x11\x22\x33\x44" * (4 * BLOCK // 4) if action == "overwrite" else None
    for lba in (0, N - 4):
        data = harness.good(cdb16(0x88, lba, 4))
        assert data == (expected or bytes(4 * BLOCK))
    assert harness.unit.hidden_intact()
