"""The two PDUs that end almost every SCSI command, packed straight into wire bytes.

A 4 KiB READ ends with one SCSI Data-In that carries the status (phase collapse,
RFC 7143 §11.7.4) and a 4 KiB WRITE with one SCSI Response with GOOD status and no
sense (§11.4). They are most of what the target sends, so they skip the generic
codec (a :class:`~.pdu.DataIn` / :class:`~.pdu.ScsiResponsePdu` dataclass, then
:func:`~.framing.encode_pdu`): one ``struct`` call each, with the byte layout of the
RFC figures below. ``tests/iscsi/test_completion.py`` checks every flag and field
against the generic encoder, with and without digests.
"""

from __future__ import annotations

import struct
from typing import Protocol

from .framing import frame
from .pdu import Opcode, Payload

# SCSI Data-In (§11.7): opcode, flags, reserved, status, TotalAHSLength,
# DataSegmentLength (byte + 16-bit word), LUN, ITT, TTT, StatSN, ExpCmdSN, MaxCmdSN,
# DataSN, Buffer Offset, Residual Count.
_DATA_IN = struct.Struct(">BBxBBBH8sIIIIIIII").pack
# SCSI Response (§11.4): opcode, flags, response, status, TotalAHSLength,
# DataSegmentLength, reserved, ITT, SNACK Tag, StatSN, ExpCmdSN, MaxCmdSN, ExpDataSN,
# Bidirectional Read Residual Count, Residual Count.
_RESPONSE = struct.Struct(">BBBBBBH8xIIIIIIII").pack

_DATA_IN_OPCODE = int(Opcode.DATA_IN)
_RESPONSE_OPCODE = int(Opcode.SCSI_RESPONSE)
_FINAL = 0x80
_OVERFLOW = 0x04  # O (§11.4.5.1, §11.7.5)
_UNDERFLOW = 0x02  # U
_STATUS = 0x01  # S: the Data-In carries the status (§11.7.1)
_NO_LUN = bytes(8)
_RESERVED_TAG = 0xFFFFFFFF


class CommandResult(Protocol):
    """What the connection reads of a command's completion (SAM-5 §5.1 Execute Command
    output): status, Data-In, sense, and how many Data-Out bytes the CDB described."""

    @property
    def status(self) -> int: ...
    @property
    def data_in(self) -> bytes | bytearray | memoryview: ...
    @property
    def sense(self) -> bytes: ...
    @property
    def data_out_length(self) -> int: ...


def residual_flags(overflow: bool, underflow: bool) -> int:
    """The O and U bits of byte 1 (§11.4.5.1)."""
    return (_OVERFLOW if overflow else 0) | (_UNDERFLOW if underflow else 0)


def command_end(
    itt: int,
    status: int,
    flags: int,
    residual: int,
    statsn: int,
    expcmdsn: int,
    maxcmdsn: int,
    data: Payload,
    expdatasn: int,
    header_digest: bool,
    data_digest: bool,
) -> list[Payload]:
    """The PDU that ends a command without sense; ``flags`` from :func:`residual_flags`.

    With ``data``: its only Data-In, F and S set, DataSN 0, Buffer Offset 0, the LUN
    field reserved (§11.7). Without: a SCSI Response, response 0 (Command Completed at
    Target), no data segment, ``expdatasn`` in ExpDataSN (§11.4).
    """
    n = len(data)
    if n:
        head = _DATA_IN(
            _DATA_IN_OPCODE, _FINAL | _STATUS | flags, status, 0, n >> 16, n & 0xFFFF,
            _NO_LUN, itt, _RESERVED_TAG, statsn, expcmdsn, maxcmdsn, 0, 0, residual,
        )  # fmt: skip
    else:
        head = _RESPONSE(
            _RESPONSE_OPCODE, _FINAL | flags, 0, status, 0, 0, 0,
            itt, 0, statsn, expcmdsn, maxcmdsn, expdatasn, 0, residual,
        )  # fmt: skip
    return frame(head, data, header_digest, data_digest)
