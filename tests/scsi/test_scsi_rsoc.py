"""REPORT SUPPORTED OPERATION CODES and REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS
(SPC-4 §6.35, §6.36), generated from the opcode and TMF tables; READ DEFECT DATA,
PREVENT ALLOW MEDIUM REMOVAL and CAPACITY DATA HAS CHANGED."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import pytest

from iscsi_vmtarget.scsi import OPCODE_TABLE, TmfFunction, TmfResult

if TYPE_CHECKING:
    from tests.scsi.conftest import Harness

INVALID_FIELD = (0x5, 0x24, 0x00)
CAPACITY_CHANGED = (0x6, 0x2A, 0x09)


def rsoc(options: int = 0, opcode: int = 0, action: int = 0, rctd: bool = False) -> bytes:
    return struct.pack(
        ">BBBBHIBB", 0xA3, 0x0C, (0x80 if rctd else 0) | options, opcode, action, 65535, 0, 0
    )


def parse_all(data: bytes) -> list[tuple[int, int, int, int, bytes]]:
    length = struct.unpack(">I", data[:4])[0]
    assert length == len(data) - 4
    out = []
    at = 4
    while at < len(data):
        opcode, action, flags, cdb_length = struct.unpack(">BxHxBH", data[at : at + 8])
        timeouts = data[at + 8 : at + 20] if flags & 0x02 else b""
        out.append((opcode, action, flags, cdb_length, timeouts))
        at += 20 if flags & 0x02 else 8
    return out


def test_all_commands_list_every_row_the_lu_offers(scsi: Harness, thin: Harness) -> None:
    rows = parse_all(scsi.good(rsoc()))
    offered = {(r.opcode, r.service_action or 0) for r in OPCODE_TABLE if r.supported(scsi.lu)}
    assert {(op, sa) for op, sa, *_ in rows} == offered
    assert (0x42, 0) not in offered  # UNMAP: not on a fully provisioned LU
    assert (0x48, 0x02) not in offered  # nor SANITIZE BLOCK ERASE
    thin_rows = {(op, sa) for op, sa, *_ in parse_all(thin.good(rsoc()))}
    assert {(0x42, 0), (0x48, 0x02)} <= thin_rows
    assert (0x48, 0x03) not in thin_rows  # CRYPTO ERASE: no encryption
    for opcode, action, flags, cdb_length, timeouts in rows:
        row = next(
            r for r in OPCODE_TABLE if r.opcode == opcode and (r.service_action or 0) == action
        )
        assert flags == (0x01 if row.service_action is not None else 0x00)  # SERVACTV
        assert cdb_length == row.cdb_length and timeouts == b""


def test_all_commands_with_timeouts_descriptors(scsi: Harness) -> None:
    rows = parse_all(scsi.good(rsoc(rctd=True)))
    assert rows and all(flags & 0x02 for _, _, flags, _, _ in rows)  # CTDP
    assert {t for *_, t in rows} == {bytes.fromhex("000a 00 00 00000000 00000000")}


def test_one_command(scsi: Harness) -> None:
    data = scsi.good(rsoc(0b001, 0x28))
    assert data == bytes.fromhex("00 03 000a") + bytes.fromhex("28 18 ffffffff 1f ffff 00")
    data = scsi.good(rsoc(0b010, 0x9E, 0x10))
    assert data[:4] == bytes.fromhex("00 03 0010") and data[4:6] == b"\x9e\x1f"
    data = scsi.good(rsoc(0b001, 0x89, rctd=True))
    assert data[1] == 0x83  # CTDP, SUPPORT=011b
    assert data[4 + 16 :] == bytes.fromhex("000a 00 00 00000000 00000000")
    assert data[5] & 0x18 == 0x18  # DPO and FUA are used by COMPARE AND WRITE


def test_one_command_not_supported(scsi: Harness) -> None:
    assert scsi.good(rsoc(0b001, 0xC7)) == bytes.fromhex("00 01 0000")
    assert scsi.good(rsoc(0b010, 0xA3, 0x0A)) == bytes.fromhex("00 01 0000")
    assert scsi.good(rsoc(0b001, 0x42)) == bytes.fromhex("00 01 0000")  # UNMAP, thick LU


@pytest.mark.parametrize(
    ("options", "opcode", "action"),
    [(0b001, 0x9E, 0x10), (0b010, 0x28, 0), (0b100, 0x28, 0), (0b111, 0, 0)],
)
def test_one_command_option_errors(scsi: Harness, options: int, opcode: int, action: int) -> None:
    """Options 001b on an opcode with service actions, 010b on one without, and
    reserved options are INVALID FIELD IN CDB pointing at REPORTING OPTIONS."""
    response = scsi.check(rsoc(options, opcode, action), INVALID_FIELD)
    assert response.sense[15:18] == bytes.fromhex("ca0002")


def test_options_011_takes_a_service_action_when_there_is_one(scsi: Harness) -> None:
    assert scsi.good(rsoc(0b011, 0x28, 0x1234))[1] == 0x03
    assert scsi.good(rsoc(0b011, 0x5F, 0x01))[:4] == bytes.fromhex("00 03 000a")


def test_report_supported_tmfs(scsi: Harness) -> None:
    data = scsi.good(bytes.fromhex("a3 0d 00 000000 00000004 00 00"))
    assert data == bytes.fromhex("da 00 00 00")  # ATS ATSS CTSS LURS TRS
    data = scsi.good(bytes.fromhex("a3 0d 80 000000 00000010 00 00"))
    assert data == bytes.fromhex("da 00 00 0c") + bytes(12)  # REPD: extended format


def test_tmf_table_drives_task_management(scsi: Harness) -> None:
    target = scsi.target
    assert (
        target.task_management(scsi.nexus, TmfFunction.CLEAR_ACA, 0) is TmfResult.FUNCTION_REJECTED
    )
    assert (
        target.task_management(scsi.nexus, TmfFunction.CLEAR_TASK_SET, 0)
        is TmfResult.FUNCTION_COMPLETE
    )


def test_read_defect_data(scsi: Harness) -> None:
    assert scsi.good(bytes.fromhex("37 00 18 00 00 00 00 0004 00")) == bytes.fromhex("00180000")
    assert scsi.good(bytes.fromhex("37 00 05 00 00 00 00 0004 00")) == bytes.fromhex("00050000")
    data = scsi.good(bytes.fromhex("b7 0d 00000000 00000008 00 00"))
    assert data == bytes.fromhex("000d 0000 00000000")
    response = scsi.check(bytes.fromhex("37 00 07 00 00 00 00 0004 00"), INVALID_FIELD)
    assert response.sense[15:18] == bytes.fromhex("ca0002")


def test_prevent_allow_medium_removal(scsi: Harness) -> None:
    for prevent in range(4):
        scsi.good(bytes([0x1E, 0, 0, 0, prevent, 0]))
    scsi.check(bytes([0x1E, 0, 0, 0, 4, 0]), INVALID_FIELD)


def test_capacity_data_changed_after_growth(scsi: Harness) -> None:
    other = scsi.make_nexus("iqn.2024-01.test:other")
    scsi.target.nexus_added(other)
    scsi.run(bytes(6), nexus=other)
    scsi.backend.resize(scsi.backend.size + 64 * 512)
    scsi.check(bytes(6), CAPACITY_CHANGED)
    scsi.good(bytes(6))
    scsi.check(bytes(6), CAPACITY_CHANGED, nexus=other)  # once for every I_T nexus
    data = scsi.good(bytes.fromhex("25 00 00000000 0000 00 00"))
    assert struct.unpack(">I", data[:4])[0] == 2048 + 64 - 1
