"""iSCSI PDU codec (RFC 7143 §11): one dataclass per PDU type, encode and decode.

Pure: bytes in, dataclasses out and back. Framing (AHS, padding, digests) lives in
:mod:`.framing`; this module turns one Basic Header Segment (48 bytes, §11.2.1) plus
its AHS and data segment into a typed PDU and back.

Each PDU type is declared as data: ``BITS`` names the flag fields of byte 1 and
``FIELDS`` names the other BHS fields by byte offset and width, straight from the
RFC's figures. One generic encoder/decoder (a precompiled :class:`struct.Struct` per
type) serves them all. The codec serves both roles: our target and our own initiator.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar

from ..errors import IscsiVmtargetError

BHS_LEN = 48
RESERVED_TAG = 0xFFFFFFFF

Payload = bytes | bytearray | memoryview


class Opcode(IntEnum):
    """RFC 7143 §11.2.1.2 opcodes."""

    NOP_OUT = 0x00
    SCSI_COMMAND = 0x01
    TASK_MGMT_REQUEST = 0x02
    LOGIN_REQUEST = 0x03
    TEXT_REQUEST = 0x04
    DATA_OUT = 0x05
    LOGOUT_REQUEST = 0x06
    SNACK_REQUEST = 0x10
    NOP_IN = 0x20
    SCSI_RESPONSE = 0x21
    TASK_MGMT_RESPONSE = 0x22
    LOGIN_RESPONSE = 0x23
    TEXT_RESPONSE = 0x24
    DATA_IN = 0x25
    LOGOUT_RESPONSE = 0x26
    R2T = 0x31
    ASYNC_MESSAGE = 0x32
    REJECT = 0x3F


class RejectReason(IntEnum):
    """RFC 7143 §11.17.1 Reject reasons."""

    DATA_DIGEST_ERROR = 0x02
    SNACK_REJECT = 0x03
    PROTOCOL_ERROR = 0x04
    COMMAND_NOT_SUPPORTED = 0x05
    IMMEDIATE_COMMAND_REJECT = 0x06
    TASK_IN_PROGRESS = 0x07
    INVALID_DATA_ACK = 0x08
    INVALID_PDU_FIELD = 0x09
    LONG_OP_REJECT = 0x0A
    DEPRECATED = 0x0B
    WAITING_FOR_LOGOUT = 0x0C


class TmfCode(IntEnum):
    """Task Management Function codes (RFC 7143 §11.5.1), on the wire."""

    ABORT_TASK = 1
    ABORT_TASK_SET = 2
    CLEAR_ACA = 3
    CLEAR_TASK_SET = 4
    LOGICAL_UNIT_RESET = 5
    TARGET_WARM_RESET = 6
    TARGET_COLD_RESET = 7
    TASK_REASSIGN = 8


class TmfResponse(IntEnum):
    """Task Management Function Response codes (RFC 7143 §11.6.1), on the wire."""

    COMPLETE = 0
    TASK_DOES_NOT_EXIST = 1
    LUN_DOES_NOT_EXIST = 2
    TASK_STILL_ALLEGIANT = 3
    REASSIGN_NOT_SUPPORTED = 4
    NOT_SUPPORTED = 5
    AUTHORIZATION_FAILED = 6
    REJECTED = 255


class PduFormatError(IscsiVmtargetError, ValueError):
    """A PDU that cannot be decoded; ``reason`` is what a Reject should say."""

    def __init__(self, message: str, reason: RejectReason = RejectReason.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.reason = reason


# Field widths: struct codes for the BHS layout.
U8, U16, U32, LUN, ISID, CDB = "B", "H", "I", "8s", "6s", "16s"
_WIDTH = {U8: 1, U16: 2, U32: 4, LUN: 8, ISID: 6, CDB: 16}

# Bytes every BHS has (§11.2.1): 0 = I bit + opcode, 1 = flags, 4 = TotalAHSLength,
# 5-7 = DataSegmentLength (as a byte and a 16-bit word), 16-19 = Initiator Task Tag.
_COMMON = (("_b0", 0, U8), ("_b1", 1, U8), ("_ahs", 4, U8), ("_dhi", 5, U8),
           ("_dlo", 6, U16), ("itt", 16, U32))  # fmt: skip


def _layout(fields: tuple[tuple[str, int, str], ...]) -> tuple[struct.Struct, tuple[str, ...]]:
    """Compile (name, offset, width) rows into one 48-byte struct, reserved bytes padded."""
    fmt, names, pos = ">", [], 0
    for name, offset, width in sorted(_COMMON + fields, key=lambda f: f[1]):
        if offset < pos:
            raise ValueError(f"BHS field {name} overlaps at byte {offset}")
        fmt += f"{offset - pos}x" if offset > pos else ""
        fmt += width
        names.append(name)
        pos = offset + _WIDTH[width]
    fmt += f"{BHS_LEN - pos}x" if pos < BHS_LEN else ""
    packer = struct.Struct(fmt)
    assert packer.size == BHS_LEN
    return packer, tuple(names)


@dataclass(slots=True)
class Pdu:
    """Base of every PDU type.

    Subclasses set ``OPCODE``, ``BITS`` ((field, mask) pairs of byte 1; a one-bit
    mask is a bool, a wider one an int), ``ALWAYS`` (byte-1 bits that are always
    set, like F on single-PDU types) and ``FIELDS`` ((field, byte offset, width)).
    """

    OPCODE: ClassVar[Opcode]
    BITS: ClassVar[tuple[tuple[str, int], ...]] = ()
    ALWAYS: ClassVar[int] = 0x80
    FIELDS: ClassVar[tuple[tuple[str, int, str], ...]] = ()

    immediate: bool = False
    itt: int = RESERVED_TAG
    data: Payload = b""
    ahs: bytes = b""

    def encode_bhs(self) -> bytes:
        """The 48-byte BHS (RFC 7143 §11.2.1) with this PDU's AHS/data lengths."""
        raise NotImplementedError  # compiled per PDU type by _compile()

    @classmethod
    def from_bhs(cls, bhs: bytes | memoryview, ahs: bytes, data: Payload) -> Pdu:
        """Decode a BHS of this type (the opcode is already known)."""
        return cls._decode_bhs(bhs, ahs, data)

    @classmethod
    def _decode_bhs(cls, bhs: bytes | memoryview, ahs: bytes, data: Payload) -> Pdu:
        raise NotImplementedError  # compiled per PDU type by _compile()

    def __init_subclass__(cls) -> None:
        # No super() call: slots=True rebuilds classes, which breaks its __class__ cell.
        if "FIELDS" in cls.__dict__:
            _compile(cls)


def _compile(cls: type[Pdu]) -> None:
    """Generate ``encode_bhs`` and ``from_bhs`` for one PDU type from its tables.

    Generated, like :func:`collections.namedtuple`, so the per-PDU cost is one
    struct call and one constructor call: this runs for every PDU on the data path.
    """
    packer, names = _layout(cls.FIELDS)
    flag_terms = [str(cls.ALWAYS)]
    decode_bits = []
    for name, mask in cls.BITS:
        if mask & (mask - 1) == 0:  # a one-bit flag is a bool
            flag_terms.append(f"({mask} if self.{name} else 0)")
            decode_bits.append(f"{name}=bool(b1 & {mask})")
        else:
            shift = _shift(mask)
            flag_terms.append(f"((self.{name} << {shift}) & {mask})")
            decode_bits.append(f"{name}=(b1 & {mask}) >> {shift}")
    special = {
        "_b0": "(64 if self.immediate else 0) | OPCODE",
        "_b1": " | ".join(flag_terms),
        "_ahs": "len(ahs) >> 2",
        "_dhi": "dlen >> 16",
        "_dlo": "dlen & 65535",
    }
    pack_args = ", ".join(special.get(n, f"self.{n}") for n in names)
    unpacked = ", ".join(
        n if n not in special else ("b0" if n == "_b0" else "b1" if n == "_b1" else "_")
        for n in names
    )
    fields = [n for n in names if n not in special]
    init_args = ", ".join([f"{n}={n}" for n in fields] + decode_bits)
    source = f"""
def encode_bhs(self):
    ahs = self.ahs
    dlen = len(self.data)
    if len(ahs) % 4:
        raise ValueError("AHS length must be a multiple of 4")
    if dlen >= 16777216:
        raise ValueError("data segment too long")
    return pack({pack_args})

def from_bhs(cls, bhs, ahs, data):
    {unpacked}, = unpack_from(bhs)
    return cls(immediate=bool(b0 & 64), data=data, ahs=ahs, {init_args})
"""
    namespace: dict[str, Any] = {
        "pack": packer.pack,
        "unpack_from": packer.unpack_from,
        "OPCODE": int(cls.OPCODE),
    }
    exec(source, namespace)
    cls.encode_bhs = namespace["encode_bhs"]  # type: ignore[method-assign]
    cls._decode_bhs = classmethod(namespace["from_bhs"])  # type: ignore[method-assign,assignment]


def _shift(mask: int) -> int:
    return (mask & -mask).bit_length() - 1


# The byte positions below are those of the RFC 7143 §11 figures.
_LUN8 = ("lun", 8, LUN)
_SN_TRIPLE_24 = (("statsn", 24, U32), ("expcmdsn", 28, U32), ("maxcmdsn", 32, U32))


# ---------------------------------------------------------------------------------------
# Initiator -> target PDUs
# ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class NopOut(Pdu):
    """NOP-Out (RFC 7143 §11.18)."""

    OPCODE: ClassVar[Opcode] = Opcode.NOP_OUT
    FIELDS = (_LUN8, ("ttt", 20, U32), ("cmdsn", 24, U32), ("expstatsn", 28, U32))
    lun: bytes = bytes(8)
    ttt: int = RESERVED_TAG
    cmdsn: int = 0
    expstatsn: int = 0


@dataclass(slots=True)
class ScsiCommand(Pdu):
    """SCSI Command (RFC 7143 §11.3). ``cdb`` includes any extended CDB AHS bytes."""

    OPCODE: ClassVar[Opcode] = Opcode.SCSI_COMMAND
    BITS = (("final", 0x80), ("read", 0x40), ("write", 0x20), ("attr", 0x07))
    ALWAYS = 0
    FIELDS = (
        _LUN8,
        ("expected_length", 20, U32),  # Expected Data Transfer Length (§11.3.6)
        ("cmdsn", 24, U32),
        ("expstatsn", 28, U32),
        # The first 16 CDB bytes (struct pads a shorter CDB with zeros); the rest
        # travels in an Extended CDB AHS (§11.2.2.3).
        ("cdb", 32, CDB),
    )
    final: bool = True
    read: bool = False
    write: bool = False
    attr: int = 1  # simple
    lun: bytes = bytes(8)
    expected_length: int = 0
    cmdsn: int = 0
    expstatsn: int = 0
    cdb: bytes = bytes(16)

    @classmethod
    def from_bhs(cls, bhs: bytes | memoryview, ahs: bytes, data: Payload) -> Pdu:
        pdu = cls._decode_bhs(bhs, ahs, data)
        if ahs:
            pdu.cdb += _extended_cdb(ahs)
        return pdu


def _extended_cdb(ahs: bytes) -> bytes:
    """Walk the AHS list (§11.2.2) and return the Extended CDB bytes (type 1), if any."""
    pos = 0
    out = b""
    while pos + 4 <= len(ahs):
        length = int.from_bytes(ahs[pos : pos + 2], "big")
        ahs_type = ahs[pos + 2]
        body = ahs[pos + 4 : pos + 3 + length]  # length counts the reserved byte
        if pos + 3 + length > len(ahs):
            raise PduFormatError(
                "AHS length runs past TotalAHSLength", RejectReason.INVALID_PDU_FIELD
            )
        if ahs_type == 1:
            out += body
        elif ahs_type != 2:  # 2 = bidirectional read length
            raise PduFormatError(f"unknown AHS type {ahs_type}", RejectReason.INVALID_PDU_FIELD)
        pos += (3 + length + 3) & ~3
    return out


@dataclass(slots=True)
class TaskMgmtRequest(Pdu):
    """Task Management Function Request (RFC 7143 §11.5)."""

    OPCODE: ClassVar[Opcode] = Opcode.TASK_MGMT_REQUEST
    BITS = (("function", 0x7F),)
    FIELDS = (
        _LUN8,
        ("referenced_task_tag", 20, U32),
        ("cmdsn", 24, U32),
        ("expstatsn", 28, U32),
        ("refcmdsn", 32, U32),
        ("expdatasn", 36, U32),
    )
    function: int = 1
    lun: bytes = bytes(8)
    referenced_task_tag: int = RESERVED_TAG
    cmdsn: int = 0
    expstatsn: int = 0
    refcmdsn: int = 0
    expdatasn: int = 0


_LOGIN_BITS = (("transit", 0x80), ("cont", 0x40), ("csg", 0x0C), ("nsg", 0x03))


@dataclass(slots=True)
class LoginRequest(Pdu):
    """Login Request (RFC 7143 §11.12). The I bit is always 1 on the wire."""

    OPCODE: ClassVar[Opcode] = Opcode.LOGIN_REQUEST
    BITS = _LOGIN_BITS
    ALWAYS = 0
    FIELDS = (
        ("version_max", 2, U8),
        ("version_min", 3, U8),
        ("isid", 8, ISID),
        ("tsih", 14, U16),
        ("cid", 20, U16),
        ("cmdsn", 24, U32),
        ("expstatsn", 28, U32),
    )
    transit: bool = False
    cont: bool = False
    csg: int = 0
    nsg: int = 0
    version_max: int = 0
    version_min: int = 0
    isid: bytes = bytes(6)
    tsih: int = 0
    cid: int = 0
    cmdsn: int = 0
    expstatsn: int = 0

    def __post_init__(self) -> None:
        self.immediate = True


@dataclass(slots=True)
class TextRequest(Pdu):
    """Text Request (RFC 7143 §11.10)."""

    OPCODE: ClassVar[Opcode] = Opcode.TEXT_REQUEST
    BITS = (("final", 0x80), ("cont", 0x40))
    ALWAYS = 0
    FIELDS = (_LUN8, ("ttt", 20, U32), ("cmdsn", 24, U32), ("expstatsn", 28, U32))
    final: bool = True
    cont: bool = False
    lun: bytes = bytes(8)
    ttt: int = RESERVED_TAG
    cmdsn: int = 0
    expstatsn: int = 0


@dataclass(slots=True)
class DataOut(Pdu):
    """SCSI Data-Out (RFC 7143 §11.7)."""

    OPCODE: ClassVar[Opcode] = Opcode.DATA_OUT
    BITS = (("final", 0x80),)
    ALWAYS = 0
    FIELDS = (
        _LUN8,
        ("ttt", 20, U32),
        ("expstatsn", 28, U32),
        ("datasn", 36, U32),
        ("buffer_offset", 40, U32),
    )
    final: bool = False
    lun: bytes = bytes(8)
    ttt: int = RESERVED_TAG
    expstatsn: int = 0
    datasn: int = 0
    buffer_offset: int = 0


@dataclass(slots=True)
class LogoutRequest(Pdu):
    """Logout Request (RFC 7143 §11.14). reason 0 = close session, 1 = connection."""

    OPCODE: ClassVar[Opcode] = Opcode.LOGOUT_REQUEST
    BITS = (("reason", 0x7F),)
    FIELDS = (("cid", 20, U16), ("cmdsn", 24, U32), ("expstatsn", 28, U32))
    reason: int = 0
    cid: int = 0
    cmdsn: int = 0
    expstatsn: int = 0


@dataclass(slots=True)
class SnackRequest(Pdu):
    """SNACK Request (RFC 7143 §11.16); only meaningful at ErrorRecoveryLevel > 0."""

    OPCODE: ClassVar[Opcode] = Opcode.SNACK_REQUEST
    BITS = (("snack_type", 0x0F),)
    FIELDS = (
        _LUN8,
        ("ttt", 20, U32),
        ("expstatsn", 28, U32),
        ("begrun", 40, U32),
        ("runlength", 44, U32),
    )
    snack_type: int = 0
    lun: bytes = bytes(8)
    ttt: int = RESERVED_TAG
    expstatsn: int = 0
    begrun: int = 0
    runlength: int = 0


# ---------------------------------------------------------------------------------------
# Target -> initiator PDUs
# ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class NopIn(Pdu):
    """NOP-In (RFC 7143 §11.19)."""

    OPCODE: ClassVar[Opcode] = Opcode.NOP_IN
    FIELDS = (_LUN8, ("ttt", 20, U32), *_SN_TRIPLE_24)
    lun: bytes = bytes(8)
    ttt: int = RESERVED_TAG
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0


@dataclass(slots=True)
class ScsiResponsePdu(Pdu):
    """SCSI Response (RFC 7143 §11.4). ``data`` is SenseLength + sense (§11.4.7)."""

    OPCODE: ClassVar[Opcode] = Opcode.SCSI_RESPONSE
    BITS = (
        ("bidi_overflow", 0x10),
        ("bidi_underflow", 0x08),
        ("overflow", 0x04),
        ("underflow", 0x02),
    )
    FIELDS = (
        ("response", 2, U8),
        ("status", 3, U8),
        ("snack_tag", 20, U32),
        *_SN_TRIPLE_24,
        ("expdatasn", 36, U32),
        ("bidi_residual", 40, U32),
        ("residual", 44, U32),
    )
    bidi_overflow: bool = False
    bidi_underflow: bool = False
    overflow: bool = False
    underflow: bool = False
    response: int = 0
    status: int = 0
    snack_tag: int = 0
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    expdatasn: int = 0
    bidi_residual: int = 0
    residual: int = 0

    @property
    def sense(self) -> bytes:
        """The sense bytes of the data segment (§11.4.7.2), without SenseLength."""
        if len(self.data) < 2:
            return b""
        n = int.from_bytes(self.data[:2], "big")
        return bytes(self.data[2 : 2 + n])


@dataclass(slots=True)
class TaskMgmtResponse(Pdu):
    """Task Management Function Response (RFC 7143 §11.6)."""

    OPCODE: ClassVar[Opcode] = Opcode.TASK_MGMT_RESPONSE
    FIELDS = (("response", 2, U8), *_SN_TRIPLE_24)
    response: int = 0
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0


@dataclass(slots=True)
class LoginResponse(Pdu):
    """Login Response (RFC 7143 §11.13)."""

    OPCODE: ClassVar[Opcode] = Opcode.LOGIN_RESPONSE
    BITS = _LOGIN_BITS
    ALWAYS = 0
    FIELDS = (
        ("version_max", 2, U8),
        ("version_active", 3, U8),
        ("isid", 8, ISID),
        ("tsih", 14, U16),
        *_SN_TRIPLE_24,
        ("status_class", 36, U8),
        ("status_detail", 37, U8),
    )
    transit: bool = False
    cont: bool = False
    csg: int = 0
    nsg: int = 0
    version_max: int = 0
    version_active: int = 0
    isid: bytes = bytes(6)
    tsih: int = 0
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    status_class: int = 0
    status_detail: int = 0


@dataclass(slots=True)
class TextResponse(Pdu):
    """Text Response (RFC 7143 §11.11)."""

    OPCODE: ClassVar[Opcode] = Opcode.TEXT_RESPONSE
    BITS = (("final", 0x80), ("cont", 0x40))
    ALWAYS = 0
    FIELDS = (_LUN8, ("ttt", 20, U32), *_SN_TRIPLE_24)
    final: bool = True
    cont: bool = False
    lun: bytes = bytes(8)
    ttt: int = RESERVED_TAG
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0


@dataclass(slots=True)
class DataIn(Pdu):
    """SCSI Data-In (RFC 7143 §11.7); with ``status_present`` it also ends the task."""

    OPCODE: ClassVar[Opcode] = Opcode.DATA_IN
    BITS = (
        ("final", 0x80),
        ("ack", 0x40),
        ("overflow", 0x04),
        ("underflow", 0x02),
        ("status_present", 0x01),
    )
    ALWAYS = 0
    FIELDS = (
        ("status", 3, U8),
        _LUN8,
        ("ttt", 20, U32),
        *_SN_TRIPLE_24,
        ("datasn", 36, U32),
        ("buffer_offset", 40, U32),
        ("residual", 44, U32),
    )
    final: bool = False
    ack: bool = False
    overflow: bool = False
    underflow: bool = False
    status_present: bool = False
    status: int = 0
    lun: bytes = bytes(8)
    ttt: int = RESERVED_TAG
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    datasn: int = 0
    buffer_offset: int = 0
    residual: int = 0


@dataclass(slots=True)
class LogoutResponse(Pdu):
    """Logout Response (RFC 7143 §11.15)."""

    OPCODE: ClassVar[Opcode] = Opcode.LOGOUT_RESPONSE
    FIELDS = (
        ("response", 2, U8),
        *_SN_TRIPLE_24,
        ("time2wait", 40, U16),
        ("time2retain", 42, U16),
    )
    response: int = 0
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    time2wait: int = 0
    time2retain: int = 0


@dataclass(slots=True)
class R2T(Pdu):
    """Ready To Transfer (RFC 7143 §11.8)."""

    OPCODE: ClassVar[Opcode] = Opcode.R2T
    FIELDS = (
        _LUN8,
        ("ttt", 20, U32),
        *_SN_TRIPLE_24,
        ("r2tsn", 36, U32),
        ("buffer_offset", 40, U32),
        ("desired_length", 44, U32),
    )
    lun: bytes = bytes(8)
    ttt: int = 0
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    r2tsn: int = 0
    buffer_offset: int = 0
    desired_length: int = 0


@dataclass(slots=True)
class AsyncMessage(Pdu):
    """Asynchronous Message (RFC 7143 §11.9)."""

    OPCODE: ClassVar[Opcode] = Opcode.ASYNC_MESSAGE
    FIELDS = (
        _LUN8,
        *_SN_TRIPLE_24,
        ("event", 36, U8),
        ("vcode", 37, U8),
        ("parameter1", 38, U16),
        ("parameter2", 40, U16),
        ("parameter3", 42, U16),
    )
    lun: bytes = bytes(8)
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    event: int = 0
    vcode: int = 0
    parameter1: int = 0
    parameter2: int = 0
    parameter3: int = 0


@dataclass(slots=True)
class Reject(Pdu):
    """Reject (RFC 7143 §11.17); ``data`` carries the rejected PDU's BHS."""

    OPCODE: ClassVar[Opcode] = Opcode.REJECT
    FIELDS = (("reason", 2, U8), *_SN_TRIPLE_24, ("datasn", 36, U32))
    reason: int = RejectReason.PROTOCOL_ERROR
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    datasn: int = 0


PDU_TYPES: dict[int, type[Pdu]] = {
    cls.OPCODE: cls
    for cls in (
        NopOut,
        ScsiCommand,
        TaskMgmtRequest,
        LoginRequest,
        TextRequest,
        DataOut,
        LogoutRequest,
        SnackRequest,
        NopIn,
        ScsiResponsePdu,
        TaskMgmtResponse,
        LoginResponse,
        TextResponse,
        DataIn,
        LogoutResponse,
        R2T,
        AsyncMessage,
        Reject,
    )
}


def decode(bhs: bytes | memoryview, ahs: bytes = b"", data: Payload = b"") -> Pdu:
    """Decode one PDU from its BHS, AHS and data segment (padding already removed)."""
    if len(bhs) != BHS_LEN:
        raise PduFormatError(f"BHS must be {BHS_LEN} bytes, got {len(bhs)}")
    cls = PDU_TYPES.get(bhs[0] & 0x3F)
    if cls is None:
        raise PduFormatError(
            f"unknown opcode 0x{bhs[0] & 0x3F:02x}", RejectReason.COMMAND_NOT_SUPPORTED
        )
    return cls.from_bhs(bhs, ahs, data)


def peek_lengths(bhs: bytes | memoryview) -> tuple[int, int]:
    """(TotalAHSLength in bytes, DataSegmentLength) of a BHS (RFC 7143 §11.2.1.5-6)."""
    return bhs[4] * 4, (bhs[5] << 16) | (bhs[6] << 8) | bhs[7]


def opcode_of(bhs: bytes | memoryview) -> int:
    return bhs[0] & 0x3F


@dataclass(slots=True)
class RawPdu:
    """A framed PDU before decoding: what :class:`.framing.PduReader` yields."""

    bhs: bytes
    ahs: bytes = b""
    data: Payload = b""
    digest_error: bool = field(default=False)

    def decode(self) -> Pdu:
        return decode(self.bhs, self.ahs, self.data)
