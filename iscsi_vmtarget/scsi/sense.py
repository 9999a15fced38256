"""Sense data: one table of reasons, one builder (SPC-4 §4.5).

Handlers never write sense bytes. They raise :class:`ScsiError` with a
:class:`Reason` (and, where it helps the initiator, a field pointer or an
INFORMATION value); the dispatcher turns it into fixed (0x70) or descriptor
(0x72) sense data with :func:`build_sense`, following D_SENSE in the control
mode page (SPC-4 §7.5.8) or the DESC bit of REQUEST SENSE (SPC-4 §6.39).
This mirrors LIO's ``sense_detail_table``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum, IntEnum, auto
from typing import Final

from ..errors import IscsiVmtargetError


class SenseKey(IntEnum):
    """Sense keys (SPC-4 §4.5.6, table 27)."""

    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    BLANK_CHECK = 0x8
    VENDOR_SPECIFIC = 0x9
    COPY_ABORTED = 0xA
    ABORTED_COMMAND = 0xB
    VOLUME_OVERFLOW = 0xD
    MISCOMPARE = 0xE


class Reason(Enum):
    """Why a command did not complete with GOOD status (names follow SPC-4 table 28)."""

    NO_SENSE = auto()
    # ILLEGAL REQUEST
    INVALID_COMMAND_OPERATION_CODE = auto()
    LBA_OUT_OF_RANGE = auto()
    INVALID_FIELD_IN_CDB = auto()
    LOGICAL_UNIT_NOT_SUPPORTED = auto()
    INVALID_FIELD_IN_PARAMETER_LIST = auto()
    PARAMETER_LIST_LENGTH_ERROR = auto()
    SAVING_PARAMETERS_NOT_SUPPORTED = auto()
    INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT = auto()
    PARAMETER_VALUE_INVALID = auto()
    INVALID_RELEASE_OF_PERSISTENT_RESERVATION = auto()
    TOO_MANY_TARGET_DESCRIPTORS = auto()
    UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE = auto()
    TOO_MANY_SEGMENT_DESCRIPTORS = auto()
    UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE = auto()
    INSUFFICIENT_REGISTRATION_RESOURCES = auto()
    OPERATION_IN_PROGRESS = auto()
    # DATA PROTECT
    WRITE_PROTECTED = auto()
    SOFTWARE_WRITE_PROTECTED = auto()
    # MISCOMPARE
    MISCOMPARE_DURING_VERIFY = auto()
    # NOT READY
    LOGICAL_UNIT_NOT_READY = auto()
    MEDIUM_NOT_PRESENT = auto()
    SANITIZE_IN_PROGRESS = auto()
    ASYMMETRIC_ACCESS_STATE_TRANSITION = auto()
    TARGET_PORT_IN_STANDBY_STATE = auto()
    # COPY ABORTED
    UNREACHABLE_COPY_TARGET = auto()
    COPY_TARGET_DEVICE_NOT_REACHABLE = auto()
    # MEDIUM / HARDWARE ERROR
    UNRECOVERED_READ_ERROR = auto()
    WRITE_ERROR = auto()
    INTERNAL_TARGET_FAILURE = auto()
    SANITIZE_COMMAND_FAILED = auto()
    # UNIT ATTENTION
    POWER_ON_RESET = auto()
    POWER_ON_OCCURRED = auto()
    BUS_DEVICE_RESET = auto()
    I_T_NEXUS_LOSS = auto()
    MODE_PARAMETERS_CHANGED = auto()
    CAPACITY_DATA_CHANGED = auto()
    ASYMMETRIC_ACCESS_STATE_CHANGED = auto()
    RESERVATIONS_PREEMPTED = auto()
    RESERVATIONS_RELEASED = auto()
    REGISTRATIONS_PREEMPTED = auto()
    REPORTED_LUNS_DATA_CHANGED = auto()
    COMMANDS_CLEARED_BY_ANOTHER_INITIATOR = auto()
    # ABORTED COMMAND (raised by the transport, e.g. a Data-Out sequence error)
    DATA_PHASE_ERROR = auto()


@dataclass(frozen=True)
class SenseCode:
    """Sense key plus additional sense code and qualifier."""

    key: SenseKey
    asc: int
    ascq: int


#: The one table from reason to key/ASC/ASCQ (SPC-4 §4.5.6 tables 27 and 28).
SENSE_TABLE: Final[dict[Reason, SenseCode]] = {
    Reason.NO_SENSE: SenseCode(SenseKey.NO_SENSE, 0x00, 0x00),
    Reason.DATA_PHASE_ERROR: SenseCode(SenseKey.ABORTED_COMMAND, 0x4B, 0x00),
    Reason.INVALID_COMMAND_OPERATION_CODE: SenseCode(SenseKey.ILLEGAL_REQUEST, 0x20, 0x00),
    Reason.LBA_OUT_OF_RANGE: SenseCode(SenseKey.ILLEGAL_REQUEST, 0x21, 0x00),
    Reason.INVALID_FIELD_IN_CDB: SenseCode(SenseKey.ILLEGAL_REQUEST, 0x24, 0x00),
    Reason.LOGICAL_UNIT_NOT_SUPPORTED: SenseCode(SenseKey.ILLEGAL_REQUEST, 0x25, 0x00),
    Reason.INVALID_FIELD_IN_PARAMETER_LIST: SenseCode(SenseKey.ILLEGAL_REQUEST, 0x26, 0x00),
    Reason.PARAMETER_LIST_LENGTH_ERROR: SenseCode(SenseKey.ILLEGAL_REQUEST, 0x1A, 0x00),
    Reason.SAVING_PARAMETERS_NOT_SUPPORTED: SenseCode(SenseKey.ILLEGAL_REQUEST, 0x39, 0x00),
    Reason.INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT: SenseCode(
        SenseKey.ILLEGAL_REQUEST, 0x0E, 0x03
    ),
    Reason.PARAMETER_VALUE_INVALID: SenseCode(SenseKey.ILLEGAL_REQUEST, 0x26, 0x02),
    Reason.INVALID_RELEASE_OF_PERSISTENT_RESERVATION: SenseCode(
        SenseKey.ILLEGAL_REQUEST, 0x26, 0x04
    ),
    Reason.TOO_MANY_TARGET_DESCRIPTORS: SenseCode(SenseKey.ILLEGAL_REQUEST, 0x26, 0x06),
    Reason.UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE: SenseCode(SenseKey.ILLEGAL_REQUEST, 0x26, 0x07),
    Reason.TOO_MANY_SEGMENT_DESCRIPTORS: SenseCode(SenseKey.ILLEGAL_REQUEST, 0x26, 0x08),
    Reason.UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE: SenseCode(
        SenseKey.ILLEGAL_REQUEST, 0x26, 0x09
    ),
    Reason.INSUFFICIENT_REGISTRATION_RESOURCES: SenseCode(SenseKey.ILLEGAL_REQUEST, 0x55, 0x04),
    Reason.OPERATION_IN_PROGRESS: SenseCode(SenseKey.ILLEGAL_REQUEST, 0x00, 0x16),
    Reason.WRITE_PROTECTED: SenseCode(SenseKey.DATA_PROTECT, 0x27, 0x00),
    Reason.SOFTWARE_WRITE_PROTECTED: SenseCode(SenseKey.DATA_PROTECT, 0x27, 0x02),
    Reason.MISCOMPARE_DURING_VERIFY: SenseCode(SenseKey.MISCOMPARE, 0x1D, 0x00),
    Reason.LOGICAL_UNIT_NOT_READY: SenseCode(SenseKey.NOT_READY, 0x04, 0x00),
    Reason.MEDIUM_NOT_PRESENT: SenseCode(SenseKey.NOT_READY, 0x3A, 0x00),
    Reason.SANITIZE_IN_PROGRESS: SenseCode(SenseKey.NOT_READY, 0x04, 0x1B),
    Reason.ASYMMETRIC_ACCESS_STATE_TRANSITION: SenseCode(SenseKey.NOT_READY, 0x04, 0x0A),
    Reason.TARGET_PORT_IN_STANDBY_STATE: SenseCode(SenseKey.NOT_READY, 0x04, 0x0B),
    Reason.UNREACHABLE_COPY_TARGET: SenseCode(SenseKey.COPY_ABORTED, 0x08, 0x04),
    Reason.COPY_TARGET_DEVICE_NOT_REACHABLE: SenseCode(SenseKey.COPY_ABORTED, 0x0D, 0x02),
    Reason.UNRECOVERED_READ_ERROR: SenseCode(SenseKey.MEDIUM_ERROR, 0x11, 0x00),
    Reason.WRITE_ERROR: SenseCode(SenseKey.MEDIUM_ERROR, 0x0C, 0x00),
    Reason.INTERNAL_TARGET_FAILURE: SenseCode(SenseKey.HARDWARE_ERROR, 0x44, 0x00),
    Reason.SANITIZE_COMMAND_FAILED: SenseCode(SenseKey.MEDIUM_ERROR, 0x31, 0x03),
    Reason.POWER_ON_RESET: SenseCode(SenseKey.UNIT_ATTENTION, 0x29, 0x00),
    Reason.POWER_ON_OCCURRED: SenseCode(SenseKey.UNIT_ATTENTION, 0x29, 0x01),
    Reason.BUS_DEVICE_RESET: SenseCode(SenseKey.UNIT_ATTENTION, 0x29, 0x03),
    Reason.I_T_NEXUS_LOSS: SenseCode(SenseKey.UNIT_ATTENTION, 0x29, 0x07),
    Reason.MODE_PARAMETERS_CHANGED: SenseCode(SenseKey.UNIT_ATTENTION, 0x2A, 0x01),
    Reason.CAPACITY_DATA_CHANGED: SenseCode(SenseKey.UNIT_ATTENTION, 0x2A, 0x09),
    Reason.ASYMMETRIC_ACCESS_STATE_CHANGED: SenseCode(SenseKey.UNIT_ATTENTION, 0x2A, 0x06),
    Reason.RESERVATIONS_PREEMPTED: SenseCode(SenseKey.UNIT_ATTENTION, 0x2A, 0x03),
    Reason.RESERVATIONS_RELEASED: SenseCode(SenseKey.UNIT_ATTENTION, 0x2A, 0x04),
    Reason.REGISTRATIONS_PREEMPTED: SenseCode(SenseKey.UNIT_ATTENTION, 0x2A, 0x05),
    Reason.REPORTED_LUNS_DATA_CHANGED: SenseCode(SenseKey.UNIT_ATTENTION, 0x3F, 0x0E),
    Reason.COMMANDS_CLEARED_BY_ANOTHER_INITIATOR: SenseCode(SenseKey.UNIT_ATTENTION, 0x2F, 0x00),
}


@dataclass(frozen=True)
class FieldPointer:
    """Sense-key specific field pointer (SPC-4 §4.5.2.4.2).

    ``in_cdb`` is the C/D bit (True: the error is in the CDB, False: in the
    parameter list); ``byte`` is the FIELD POINTER; ``bit`` the BIT POINTER
    (None when BPV is zero).
    """

    byte: int
    bit: int | None = None
    in_cdb: bool = True

    def encode(self) -> bytes:
        """The three sense-key specific bytes, SKSV set (SPC-4 §4.5.2.4.2, table 31)."""
        first = 0x80  # SKSV
        if self.in_cdb:
            first |= 0x40  # C/D
        if self.bit is not None:
            first |= 0x08 | (self.bit & 0x07)  # BPV, BIT POINTER
        return struct.pack(">BH", first, self.byte & 0xFFFF)  # FIELD POINTER


@dataclass(frozen=True)
class Progress:
    """Sense-key specific progress indication (SPC-4 §4.5.2.4.4), e.g. for
    NOT READY / SANITIZE IN PROGRESS: ``done`` of ``total`` as a fraction of 65536."""

    done: int
    total: int

    def encode(self) -> bytes:
        fraction = 0 if self.total <= 0 else min(0xFFFF, self.done * 0x10000 // self.total)
        return struct.pack(
            ">BH",
            0x80,  # SKSV
            fraction,  # PROGRESS INDICATION
        )


SenseKeySpecific = FieldPointer | Progress


def cdb_field(byte: int, bit: int | None = None) -> FieldPointer:
    """Pointer into the CDB."""
    return FieldPointer(byte, bit, True)


def param_field(byte: int, bit: int | None = None) -> FieldPointer:
    """Pointer into the parameter list (Data-Out)."""
    return FieldPointer(byte, bit, False)


class ScsiError(IscsiVmtargetError):
    """A command ends with CHECK CONDITION for ``reason``.

    ``information`` fills the INFORMATION field (e.g. the miscompare offset for
    VERIFY, SBC-3 §5.27); ``field`` the sense-key specific field pointer.
    """

    def __init__(
        self,
        reason: Reason,
        *,
        field: SenseKeySpecific | None = None,
        information: int | None = None,
    ) -> None:
        super().__init__(reason.name)
        self.reason = reason
        self.field = field
        self.information = information


class ReservationConflict(IscsiVmtargetError):
    """A command ends with RESERVATION CONFLICT status and no sense data
    (SAM-5 §5.3.1, SPC-4 §5.13.1): an SPC-2 reservation or a persistent
    reservation held through another I_T nexus forbids it."""


def build_sense(
    reason: Reason,
    *,
    descriptor: bool = False,
    field: SenseKeySpecific | None = None,
    information: int | None = None,
) -> bytes:
    """Build current-error sense data for ``reason``.

    Fixed format (response code 0x70) per SPC-4 §4.5.3, descriptor format
    (0x72) per SPC-4 §4.5.2 with an information descriptor (§4.5.2.2) and a
    sense-key specific descriptor (§4.5.2.3) when those apply.
    """
    code = SENSE_TABLE[reason]
    sks = field.encode() if field is not None else None
    if descriptor:
        descriptors = bytearray()
        if information is not None:
            descriptors += struct.pack(
                ">BBBBQ",
                0x00,  # DESCRIPTOR TYPE: information
                0x0A,  # ADDITIONAL LENGTH
                0x80,  # VALID
                0x00,  # reserved
                information & 0xFFFFFFFFFFFFFFFF,  # INFORMATION
            )
        if sks is not None:
            descriptors += struct.pack(
                ">BBH3sB",
                0x02,  # DESCRIPTOR TYPE: sense key specific
                0x06,  # ADDITIONAL LENGTH
                0x0000,  # reserved
                sks,  # SKSV + sense key specific information
                0x00,  # reserved
            )
        header = struct.pack(
            ">BBBBBBBB",
            0x72,  # RESPONSE CODE: current, descriptor format
            code.key,  # SENSE KEY
            code.asc,  # ADDITIONAL SENSE CODE
            code.ascq,  # ADDITIONAL SENSE CODE QUALIFIER
            0x00,  # SDAT_OVFL + reserved
            0x00,  # reserved
            0x00,  # reserved
            len(descriptors),  # ADDITIONAL SENSE LENGTH
        )
        return header + bytes(descriptors)
    valid = information is not None and 0 <= information <= 0xFFFFFFFF
    return struct.pack(
        ">BBBIBIBBB3s",
        0x70 | (0x80 if valid else 0),  # VALID + RESPONSE CODE: current, fixed format
        0x00,  # obsolete
        code.key,  # FILEMARK, EOM, ILI, SDAT_OVFL = 0; SENSE KEY
        information if valid else 0,  # INFORMATION
        10,  # ADDITIONAL SENSE LENGTH (bytes 8..17)
        0,  # COMMAND-SPECIFIC INFORMATION
        code.asc,  # ADDITIONAL SENSE CODE
        code.ascq,  # ADDITIONAL SENSE CODE QUALIFIER
        0x00,  # FIELD REPLACEABLE UNIT CODE
        sks if sks is not None else b"\x00\x00\x00",  # SKSV + SENSE KEY SPECIFIC
    )


def parse_sense(sense: bytes | bytearray | memoryview) -> tuple[int, int, int]:
    """(sense key, ASC, ASCQ) of fixed (0x70/0x71, SPC-4 §4.5.3) or descriptor
    (0x72/0x73, §4.5.2) sense data; (0, 0, 0) for none. The reader of build_sense."""
    if len(sense) < 4:
        return (0, 0, 0)
    if sense[0] & 0x7F in (0x72, 0x73):
        return (sense[1] & 0x0F, sense[2], sense[3])
    if len(sense) < 14:
        return (sense[2] & 0x0F, 0, 0)
    return (sense[2] & 0x0F, sense[12], sense[13])
