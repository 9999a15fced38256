"""ScsiTarget: dispatch from the opcode table, unit attentions (SAM-5 §5.14),
REQUEST SENSE, REPORT LUNS, unknown LUNs and task management."""

from __future__ import annotations

import struct
import uuid
from typing import TYPE_CHECKING

import pytest

from iscsi_vmtarget.scsi import (
    OPCODE_TABLE,
    DataDirection,
    LogicalUnit,
    OpcodeRow,
    Reason,
    ScsiTarget,
    Status,
    TmfFunction,
    TmfResult,
    UnitIdentity,
    encode_lun,
)
from iscsi_vmtarget.scsi.alua import AccessState, PortGroups
from iscsi_vmtarget.storage import MemoryBackend

if TYPE_CHECKING:
    from tests.scsi.conftest import Harness

TUR = bytes(6)
POWER_ON = (0x6, 0x29, 0x00)
LU_RESET = (0x6, 0x29, 0x03)
LU_NOT_SUPPORTED = (0x5, 0x25, 0x00)
INVALID_OPCODE = (0x5, 0x20, 0x00)
INVALID_FIELD = (0x5, 0x24, 0x00)


def request_sense(desc: int = 0, alloc: int = 252) -> bytes:
    return bytes([0x03, desc, 0, 0, alloc, 0])


def report_luns(select: int = 0, alloc: int = 4096) -> bytes:
    return struct.pack(">BBBBBBIBB", 0xA0, 0, select, 0, 0, 0, alloc, 0, 0)


def new_lu() -> LogicalUnit:
    return LogicalUnit(MemoryBackend(64 * 512), UnitIdentity.from_uuid(uuid.uuid4()))


@pytest.fixture
def multi(scsi: Harness) -> Harness:
    """LUNs 0, 5 and 300 on one target, the nexus registered, attentions pending."""
    scsi.target.nexus_removed(scsi.nexus)
    target = ScsiTarget({0: scsi.lu, 5: new_lu(), 300: new_lu()})
    scsi.target = target
    target.nexus_added(scsi.nexus)
    return scsi


# -- unit attention --------------------------------------------------------------------------


def test_attention_once_per_nexus_per_lu(multi: Harness) -> None:
    for lun in (0, 5, 300):
        multi.check(TUR, POWER_ON, lun=lun)
        multi.good(TUR, lun=lun)


def test_inquiry_and_report_luns_do_not_clear_attention(multi: Harness) -> None:
    multi.good(bytes([0x12, 0, 0, 0, 96, 0]))
    multi.good(report_luns())
    multi.check(TUR, POWER_ON)


def test_request_sense_returns_and_clears_attention(multi: Harness) -> None:
    data = multi.good(request_sense())
    assert (data[2], data[12], data[13]) == POWER_ON
    data = multi.good(request_sense())
    assert data == bytes.fromhex("70 00 00 00000000 0a 00000000 00 00 00 000000")
    assert multi.good(request_sense(desc=1)) == bytes.fromhex("7200000000000000")


def test_request_sense_allocation_length(scsi: Harness) -> None:
    assert scsi.good(request_sense(alloc=8)) == bytes.fromhex("70 00 00 00000000 0a")


def test_attention_comes_before_invalid_opcode(multi: Harness) -> None:
    multi.check(bytes([0xC7, 0, 0, 0, 0, 0]), POWER_ON)
    multi.check(bytes([0xC7, 0, 0, 0, 0, 0]), INVALID_OPCODE)


def test_nexus_added_twice_is_one_attention(scsi: Harness) -> None:
    scsi.target.nexus_added(scsi.nexus)
    scsi.good(TUR)


def test_new_nexus_after_removal_gets_attention_again(scsi: Harness) -> None:
    scsi.target.nexus_removed(scsi.nexus)
    scsi.good(TUR)  # not registered: nothing pending
    scsi.target.nexus_added(scsi.nexus)
    scsi.check(TUR, POWER_ON)


def test_resets_have_precedence(scsi: Harness) -> None:
    scsi.lu.establish_attention(Reason.MODE_PARAMETERS_CHANGED)
    scsi.target.task_management(scsi.nexus, TmfFunction.LOGICAL_UNIT_RESET, 0)
    scsi.check(TUR, LU_RESET)
    scsi.check(TUR, (0x6, 0x2A, 0x01))
    scsi.good(TUR)


# -- task management ---------------------------------------------------------------------


def test_lun_reset_reaches_every_nexus_of_that_lu(multi: Harness) -> None:
    other = multi.make_nexus("iqn.2024-01.test:other")
    multi.target.nexus_added(other)
    for nexus in (multi.nexus, other):
        for lun in (0, 5, 300):
            multi.run(TUR, lun=lun, nexus=nexus)
    result = multi.target.task_management(other, TmfFunction.LOGICAL_UNIT_RESET, 5)
    assert result is TmfResult.FUNCTION_COMPLETE
    for nexus in (multi.nexus, other):
        multi.check(TUR, LU_RESET, lun=5, nexus=nexus)
        multi.good(TUR, lun=0, nexus=nexus)


def test_target_reset_reaches_every_lu(multi: Harness) -> None:
    for lun in (0, 5, 300):
        multi.run(TUR, lun=lun)
    result = multi.target.task_management(multi.nexus, TmfFunction.TARGET_RESET, 0)
    assert result is TmfResult.FUNCTION_COMPLETE
    for lun in (0, 5, 300):
        multi.check(TUR, POWER_ON, lun=lun)


@pytest.mark.parametrize(
    ("function", "lun", "expected"),
    [
        (TmfFunction.ABORT_TASK, 0, TmfResult.FUNCTION_COMPLETE),
        (TmfFunction.ABORT_TASK_SET, 0, TmfResult.FUNCTION_COMPLETE),
        (TmfFunction.CLEAR_TASK_SET, 0, TmfResult.FUNCTION_COMPLETE),
        (TmfFunction.CLEAR_ACA, 0, TmfResult.FUNCTION_REJECTED),  # NACA is not supported
        (TmfFunction.ABORT_TASK_SET, 9, TmfResult.INCORRECT_LOGICAL_UNIT_NUMBER),
        (TmfFunction.LOGICAL_UNIT_RESET, 9, TmfResult.INCORRECT_LOGICAL_UNIT_NUMBER),
    ],
)
def test_task_management_results(
    scsi: Harness, function: TmfFunction, lun: int, expected: TmfResult
) -> None:
    assert scsi.target.task_management(scsi.nexus, function, lun) is expected
    scsi.good(TUR)  # none of these sets a unit attention


# -- REPORT LUNS and unknown LUNs ---------------------------------------------------------


def test_report_luns(multi: Harness) -> None:
    data = multi.good(report_luns())
    assert data == struct.pack(">II", 24, 0) + encode_lun(0) + encode_lun(5) + encode_lun(300)
    for select in (0x02, 0x11):  # all LUs; administrative + non-conglomerate ones
        assert multi.good(report_luns(select=select)) == data
    for select in (0x01, 0x10, 0x12):  # well-known, administrative, subsidiary: none
        assert multi.good(report_luns(select=select)) == bytes(8)
    assert multi.good(report_luns(alloc=16)) == data[:16]
    assert multi.good(report_luns(), lun=77) == data


@pytest.mark.parametrize("select", [0x03, 0x0F, 0x13, 0x80, 0xF8, 0xFF])
def test_report_luns_bad_select(scsi: Harness, select: int) -> None:
    """Reserved and vendor-specific SELECT REPORT values (SPC-4 §6.33)."""
    response = scsi.check(report_luns(select=select), INVALID_FIELD)
    assert response.sense[15:18] == bytes.fromhex("c00002")  # SKSV, C/D, byte 2


def test_unknown_lun(scsi: Harness) -> None:
    scsi.check(TUR, LU_NOT_SUPPORTED, lun=3)
    scsi.check(scsi.cdb10(0x28, 0, 1), LU_NOT_SUPPORTED, lun=3)
    scsi.check(bytes([0xC7, 0, 0, 0, 0, 0]), LU_NOT_SUPPORTED, lun=3)
    data = scsi.good(request_sense(), lun=3)
    assert (data[2], data[12], data[13]) == LU_NOT_SUPPORTED


# -- CDB checks derived from the table ----------------------------------------------------------


def test_unknown_opcodes(scsi: Harness) -> None:
    scsi.check(bytes([0xC7, 0, 0, 0, 0, 0]), INVALID_OPCODE)
    scsi.check(bytes([0xC8]) + bytes(9), INVALID_OPCODE)
    scsi.check(b"", INVALID_OPCODE)


def test_unknown_service_action_points_at_it(scsi: Harness) -> None:
    """An unknown service action of a service-action opcode (here REPORT TARGET PORT
    GROUPS under MAINTENANCE IN) is INVALID FIELD IN CDB at byte 1 bit 4 (SPC-4 §4.2.2.2)."""
    response = scsi.check(bytes([0xA3, 0x0A]) + bytes(10), INVALID_FIELD)
    assert response.sense[15:18] == bytes.fromhex("cc0001")


def test_unsupported_on_this_lu_is_an_unknown_opcode(scsi: Harness) -> None:
    """UNMAP exists only on thin LUs: a fully provisioned LU refuses it as unknown."""
    scsi.check(bytes([0x42]) + bytes(9), INVALID_OPCODE)


def test_cdb_padded_to_16_bytes(scsi: Harness) -> None:
    assert scsi.good(bytes([0x12, 0, 0, 0, 36, 0]) + bytes(10))[:1] == b"\x00"
    scsi.good(scsi.cdb10(0x28, 0, 1) + bytes(6))


def test_short_cdb_refused(scsi: Harness) -> None:
    response = scsi.check(bytes([0x28, 0, 0, 0]), INVALID_FIELD)
    assert response.sense[15:18] == bytes.fromhex("c00004")


def test_naca_refused(scsi: Harness) -> None:
    response = scsi.check(bytes([0, 0, 0, 0, 0, 0x04]), INVALID_FIELD)
    assert response.sense[15:18] == bytes.fromhex("ca0005")


def valid_cdb(row: OpcodeRow) -> bytes:
    """A CDB every row accepts: opcode, service action, and a page code for MODE SENSE."""
    cdb = bytearray(row.cdb_length)
    cdb[0] = row.opcode
    if row.service_action is not None:
        cdb[1] = row.service_action
    if row.name.startswith("MODE SENSE"):
        cdb[2] = 0x3F
    return bytes(cdb)


#: Rows whose all-zero CDB reaches the handler but cannot succeed, and what they answer.
_DISPATCH_OUTCOMES: dict[str, tuple[int, int, int] | Status] = {
    "SANITIZE OVERWRITE": INVALID_FIELD,  # needs an initialization pattern
    "PERSISTENT RESERVE OUT REGISTER": (0x5, 0x1A, 0x00),  # needs a parameter list
    "PERSISTENT RESERVE OUT RESERVE": INVALID_FIELD,  # TYPE 0 is not a type
    "PERSISTENT RESERVE OUT RELEASE": INVALID_FIELD,
    "PERSISTENT RESERVE OUT CLEAR": (0x5, 0x1A, 0x00),
    "PERSISTENT RESERVE OUT PREEMPT": INVALID_FIELD,
    "PERSISTENT RESERVE OUT PREEMPT AND ABORT": INVALID_FIELD,
    "PERSISTENT RESERVE OUT REGISTER AND IGNORE EXISTING KEY": (0x5, 0x1A, 0x00),
    "PERSISTENT RESERVE OUT REGISTER AND MOVE": (0x5, 0x1A, 0x00),
    "RECEIVE COPY RESULTS COPY STATUS": INVALID_FIELD,  # no copy with list identifier 0
}


@pytest.fixture
def every(harness_factory: type[Harness]) -> Harness:
    """A thin LU whose backend can also crypto-erase: every row of the table is offered."""
    harness = harness_factory.create(thin=True, crypto_erase=lambda: None)
    harness.lu.alua = PortGroups(1, AccessState.ACTIVE_OPTIMIZED)  # REPORT TARGET PORT GROUPS
    return harness


@pytest.mark.parametrize("row", OPCODE_TABLE, ids=lambda row: row.name)
def test_every_row_dispatches(every: Harness, row: OpcodeRow) -> None:
    thin = every
    cdb = valid_cdb(row)
    length = row.transfer_length(cdb, 512)
    data = bytes(length) if row.direction is DataDirection.OUT else None
    response = thin.run(cdb, data)
    expected = _DISPATCH_OUTCOMES.get(row.name, Status.GOOD)
    if isinstance(expected, Status):
        assert response.status == expected, thin.sense(response)
    else:
        assert response.status == Status.CHECK_CONDITION
        assert thin.sense(response) == expected
    assert len(response.data_in) <= (length if row.direction is DataDirection.IN else 0)
    assert response.data_out_length == (length if row.direction is DataDirection.OUT else 0)


@pytest.mark.parametrize("row", OPCODE_TABLE, ids=lambda row: row.name)
def test_every_bit_outside_the_usage_mask_is_refused(every: Harness, row: OpcodeRow) -> None:
    thin = every
    base = valid_cdb(row)
    for index in range(1, row.cdb_length):
        for bit in range(8):
            if row.usage[index] & (1 << bit):
                continue
            cdb = bytearray(base)
            cdb[index] |= 1 << bit
            response = thin.check(bytes(cdb), INVALID_FIELD)
            assert response.sense[15:18] == bytes([0xC8 | bit]) + index.to_bytes(2, "big")


def test_table_shape() -> None:
    keys = [(row.opcode, row.service_action) for row in OPCODE_TABLE]
    assert len(keys) == len(set(keys))
    for row in OPCODE_TABLE:
        assert row.cdb_length == {0: 6, 1: 10, 2: 10, 4: 16, 5: 12}[row.opcode >> 5]
        assert row.usage[-1] == 0x00  # CONTROL: no NACA, no LINK
        if row.writes_medium:
            assert row.direction is DataDirection.OUT


def test_may_block_edge_cases(scsi: Harness) -> None:
    assert not scsi.target.may_block(b"")
    assert not scsi.target.may_block(bytes([0xC7]))
    assert not scsi.target.may_block(bytes([0x2A, 0x08]))  # too short to be a WRITE(10)
    assert not scsi.target.may_block(bytes([0x28, 0x08]) + bytes(8))  # READ with FUA


class _RemoteBackend(MemoryBackend):
    remote_io = True  # as RBD's: every read waits on the network


def test_may_block_every_command_of_a_remote_lu() -> None:
    """Reads of an LU whose backend is remote (RBD) run in worker threads too: on the
    event loop one 64 KiB read would stall every session for a network round trip."""
    local = new_lu()
    remote = LogicalUnit(_RemoteBackend(64 * 512), UnitIdentity.from_uuid(uuid.uuid4()))
    target = ScsiTarget({0: local, 1: remote})
    read10 = struct.pack(">BBIBHB", 0x28, 0, 0, 0, 8, 0)
    assert not target.may_block(read10, 0)
    assert target.may_block(read10, 1)
    assert target.may_block(struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 8, 0), 1)
