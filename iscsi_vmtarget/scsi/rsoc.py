"""REPORT SUPPORTED OPERATION CODES and REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS
(SPC-4 §6.35, §6.36), both generated from tables: the opcode table (with each
row's CDB usage mask, filtered by what the addressed LU offers) and the task
management function table :data:`~.task.SUPPORTED_TMFS`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final

from .command import Command, be, require
from .logical_unit import LogicalUnit
from .opcode_row import SERVICE_ACTION_OPCODES, OpcodeRow
from .task import SUPPORTED_TMFS

OPTIONS_ALL: Final = 0b000
OPTIONS_OPCODE: Final = 0b001
OPTIONS_OPCODE_SA: Final = 0b010
OPTIONS_OPCODE_MAYBE_SA: Final = 0b011

SUPPORT_NOT_SUPPORTED: Final = 0b001
SUPPORT_STANDARD: Final = 0b011

#: Command timeouts descriptor (SPC-4 §6.35.4): no timeouts are reported (zero).
_TIMEOUTS: Final = struct.pack(
    ">HBBII",
    0x000A,  # DESCRIPTOR LENGTH
    0x00,  # reserved
    0x00,  # COMMAND SPECIFIC
    0,  # NOMINAL COMMAND PROCESSING TIMEOUT: not specified
    0,  # RECOMMENDED COMMAND TIMEOUT: not specified
)


def _rows(lu: LogicalUnit, table: Sequence[OpcodeRow]) -> list[OpcodeRow]:
    return [row for row in table if row.supported(lu)]


def report_supported_operation_codes(cmd: Command, table: Sequence[OpcodeRow]) -> bytes:
    """REPORT SUPPORTED OPERATION CODES (SPC-4 §6.35) over ``table`` (the opcode table,
    passed in by :mod:`.opcodes`, which owns it)."""
    lu = cmd.unit
    cdb = cmd.cdb
    rctd = bool(cdb[2] & 0x80)  # RCTD
    options = cdb[2] & 0x07  # REPORTING OPTIONS
    opcode = cdb[3]  # REQUESTED OPERATION CODE
    action = be(cdb, 4, 2)  # REQUESTED SERVICE ACTION
    rows = _rows(lu, table)
    if options == OPTIONS_ALL:
        return _all_commands(rows, rctd)
    has_actions = opcode in SERVICE_ACTION_OPCODES
    if options == OPTIONS_OPCODE:
        require(not has_actions, 2, 2)
        key: int | None = None
    elif options == OPTIONS_OPCODE_SA:
        require(has_actions, 2, 2)
        key = action
    else:
        require(options == OPTIONS_OPCODE_MAYBE_SA, 2, 2)
        key = action if has_actions else None
    row = next((r for r in rows if r.opcode == opcode and r.service_action == key), None)
    return _one_command(row, rctd)


def _all_commands(rows: list[OpcodeRow], rctd: bool) -> bytes:
    """All-commands parameter data (SPC-4 §6.35.2)."""
    body = bytearray()
    for row in rows:
        servactv = 0x01 if row.service_action is not None else 0
        body += struct.pack(
            ">BBHBBH",
            row.opcode,  # OPERATION CODE
            0x00,  # reserved
            row.service_action or 0,  # SERVICE ACTION
            0x00,  # reserved
            (0x02 if rctd else 0) | servactv,  # CTDP, SERVACTV
            row.cdb_length,  # CDB LENGTH
        )
        if rctd:
            body += _TIMEOUTS
    return struct.pack(">I", len(body)) + bytes(body)  # COMMAND DATA LENGTH


def _one_command(row: OpcodeRow | None, rctd: bool) -> bytes:
    """One-command parameter data (SPC-4 §6.35.3) with the row's CDB USAGE DATA."""
    if row is None:
        return struct.pack(">BBH", 0x00, SUPPORT_NOT_SUPPORTED, 0)
    data = struct.pack(
        ">BBH",
        0x00,  # reserved
        (0x80 if rctd else 0) | SUPPORT_STANDARD,  # CTDP, SUPPORT
        row.cdb_length,  # CDB SIZE
    )
    return data + row.usage + (_TIMEOUTS if rctd else b"")  # CDB USAGE DATA


def report_supported_tmfs(cmd: Command) -> bytes:
    """REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS (SPC-4 §6.36), from the TMF table."""
    repd = bool(cmd.cdb[2] & 0x80)  # REPD
    bits = [0, 0]
    for byte, bit in SUPPORTED_TMFS.values():
        bits[byte] |= 1 << bit
    data = struct.pack(
        ">BBBB",
        bits[0],  # ATS ATSS CACAS CTSS LURS QTS TRS WAKES
        bits[1],  # QAES QTSS ITNRS
        0x00,  # reserved
        0x0C if repd else 0x00,  # ADDITIONAL DATA LENGTH
    )
    if repd:
        data += bytes(12)  # extended parameter data: no TMF timeouts reported
    return data
