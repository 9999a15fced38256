"""iSCSI PDU codec (RFC 7143 §11): one dataclass per PDU type, encode and decode.

Pure: bytes in, dataclasses out and back. Framing (AHS, padding, digests) lives in
:mod:`.framing`; this module turns one Basic Header Segment (48 bytes, §11.2.1) plus
its AHS and data segment into a typed PDU and back.

Every PDU carries ``immediate`` (byte 0 bit 6), ``itt`` (bytes 16-19) and ``data``.
The codec works for both roles, so the same module serves our target and our own
initiator code (tests, replication).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import ClassVar

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


class PduFormatError(ValueError):
    """A PDU that cannot be decoded; ``reason`` is what a Reject should say."""

    def __init__(self, message: str, reason: RejectReason = RejectReason.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.reason = reason


# The 48-byte BHS as one struct per layout; "x" pads reserved bytes.
# Common head: byte 0 (I + opcode), byte 1 (flags), bytes 2-3, TotalAHSLength,
# DataSegmentLength (24 bits as 1 + 2 bytes), bytes 8-15, ITT.
_HEAD = ">BB2sBBH8sI"
_HEAD_LEN = struct.calcsize(_HEAD)  # 20


def _u32(buf: bytes | memoryview, off: int) -> int:
    return int.from_bytes(buf[off : off + 4], "big")


@dataclass(slots=True)
class Pdu:
    """Base of every PDU type; subclasses define OPCODE and their own fields."""

    OPCODE: ClassVar[Opcode]
    immediate: bool = False
    itt: int = RESERVED_TAG
    data: Payload = b""
    ahs: bytes = b""

    # -- to be provided by subclasses ------------------------------------------------
    def _flags(self) -> int:  # byte 1
        return 0x80

    def _bytes2_3(self) -> bytes:
        return b"\x00\x00"

    def _bytes8_15(self) -> bytes:
        return bytes(8)

    def _tail(self) -> bytes:  # bytes 20-47
        return bytes(28)

    @classmethod
    def _from_fields(
        cls, flags: int, b23: bytes, b815: bytes, tail: memoryview, common: dict[str, object]
    ) -> Pdu:
        raise NotImplementedError

    # -- generic ----------------------------------------------------------------------
    def encode_bhs(self) -> bytes:
        """The 48-byte BHS (RFC 7143 §11.2.1) with this PDU's AHS/data lengths."""
        if len(self.ahs) % 4:
            raise ValueError("AHS length must be a multiple of 4")
        dlen = len(self.data)
        if dlen >= 1 << 24:
            raise ValueError("data segment too long")
        head = struct.pack(
            _HEAD,
            (0x40 if self.immediate else 0) | int(self.OPCODE),
            self._flags(),
            self._bytes2_3(),
            len(self.ahs) // 4,
            dlen >> 16,
            dlen & 0xFFFF,
            self._bytes8_15(),
            self.itt,
        )
        tail = self._tail()
        assert len(tail) == 28, type(self).__name__
        return head + tail


def _pack_tail(fmt: str, *values: int) -> bytes:
    out = struct.pack(">" + fmt, *values)
    return out + bytes(28 - len(out))


# ---------------------------------------------------------------------------------------
# Initiator -> target PDUs
# ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class NopOut(Pdu):
    """NOP-Out (RFC 7143 §11.18)."""

    OPCODE: ClassVar[Opcode] = Opcode.NOP_OUT
    lun: bytes = bytes(8)
    ttt: int = RESERVED_TAG
    cmdsn: int = 0
    expstatsn: int = 0

    def _bytes8_15(self) -> bytes:
        return self.lun

    def _tail(self) -> bytes:
        return _pack_tail("III", self.ttt, self.cmdsn, self.expstatsn)

    @classmethod
    def _from_fields(cls, flags, b23, b815, tail, common):  # type: ignore[no-untyped-def]
        ttt, cmdsn, expstatsn = struct.unpack_from(">III", tail)
        return cls(lun=bytes(b815), ttt=ttt, cmdsn=cmdsn, expstatsn=expstatsn, **common)


@dataclass(slots=True)
class ScsiCommand(Pdu):
    """SCSI Command (RFC 7143 §11.3). ``cdb`` includes any extended CDB AHS bytes."""

    OPCODE: ClassVar[Opcode] = Opcode.SCSI_COMMAND
    final: bool = True
    read: bool = False
    write: bool = False
    attr: int = 1  # simple
    lun: bytes = bytes(8)
    expected_length: int = 0
    cmdsn: int = 0
    expstatsn: int = 0
    cdb: bytes = bytes(16)

    def _flags(self) -> int:
        return (
            (0x80 if self.final else 0)
            | (0x40 if self.read else 0)
            | (0x20 if self.write else 0)
            | (self.attr & 0x07)
        )

    def _bytes8_15(self) -> bytes:
        return self.lun

    def _tail(self) -> bytes:
        cdb = self.cdb[:16].ljust(16, b"\x00")
        return struct.pack(">III", self.expected_length, self.cmdsn, self.expstatsn) + cdb

    @classmethod
    def _from_fields(cls, flags, b23, b815, tail, common):  # type: ignore[no-untyped-def]
        edtl, cmdsn, expstatsn = struct.unpack_from(">III", tail)
        cdb = bytes(tail[12:28])
        ahs = common["ahs"]
        if ahs:
            cdb += _extended_cdb(ahs)  # type: ignore[arg-type]
        return cls(
            final=bool(flags & 0x80),
            read=bool(flags & 0x40),
            write=bool(flags & 0x20),
            attr=flags & 0x07,
            lun=bytes(b815),
            expected_length=edtl,
            cmdsn=cmdsn,
            expstatsn=expstatsn,
            cdb=cdb,
            **common,
        )


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
    function: int = 1
    lun: bytes = bytes(8)
    referenced_task_tag: int = RESERVED_TAG
    cmdsn: int = 0
    expstatsn: int = 0
    refcmdsn: int = 0
    expdatasn: int = 0

    def _flags(self) -> int:
        return 0x80 | (self.function & 0x7F)

    def _bytes8_15(self) -> bytes:
        return self.lun

    def _tail(self) -> bytes:
        return _pack_tail(
            "IIIII",
            self.referenced_task_tag,
            self.cmdsn,
            self.expstatsn,
            self.refcmdsn,
            self.expdatasn,
        )

    @classmethod
    def _from_fields(cls, flags, b23, b815, tail, common):  # type: ignore[no-untyped-def]
        rtt, cmdsn, expstatsn, refcmdsn, expdatasn = struct.unpack_from(">IIIII", tail)
        return cls(
            function=flags & 0x7F,
            lun=bytes(b815),
            referenced_task_tag=rtt,
            cmdsn=cmdsn,
            expstatsn=expstatsn,
            refcmdsn=refcmdsn,
            expdatasn=expdatasn,
            **common,
        )


@dataclass(slots=True)
class LoginRequest(Pdu):
    """Login Request (RFC 7143 §11.12). The I bit is always 1 on the wire."""

    OPCODE: ClassVar[Opcode] = Opcode.LOGIN_REQUEST
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

    def _flags(self) -> int:
        return (
            (0x80 if self.transit else 0)
            | (0x40 if self.cont else 0)
            | ((self.csg & 3) << 2)
            | (self.nsg & 3)
        )

    def _bytes2_3(self) -> bytes:
        return bytes((self.version_max, self.version_min))

    def _bytes8_15(self) -> bytes:
        return self.isid + self.tsih.to_bytes(2, "big")

    def _tail(self) -> bytes:
        return _pack_tail("HxxII", self.cid, self.cmdsn, self.expstatsn)

    @classmethod
    def _from_fields(cls, flags, b23, b815, tail, common):  # type: ignore[no-untyped-def]
        cid, cmdsn, expstatsn = struct.unpack_from(">HxxII", tail)
        return cls(
            transit=bool(flags & 0x80),
            cont=bool(flags & 0x40),
            csg=(flags >> 2) & 3,
            nsg=flags & 3,
            version_max=b23[0],
            version_min=b23[1],
            isid=bytes(b815[:6]),
            tsih=int.from_bytes(b815[6:8], "big"),
            cid=cid,
            cmdsn=cmdsn,
            expstatsn=expstatsn,
            **common,
        )


@dataclass(slots=True)
class TextRequest(Pdu):
    """Text Request (RFC 7143 §11.10)."""

    OPCODE: ClassVar[Opcode] = Opcode.TEXT_REQUEST
    final: bool = True
    cont: bool = False
    lun: bytes = bytes(8)
    ttt: int = RESERVED_TAG
    cmdsn: int = 0
    expstatsn: int = 0

    def _flags(self) -> int:
        return (0x80 if self.final else 0) | (0x40 if self.cont else 0)

    def _bytes8_15(self) -> bytes:
        return self.lun

    def _tail(self) -> bytes:
        return _pack_tail("III", self.ttt, self.cmdsn, self.expstatsn)

    @classmethod
    def _from_fields(cls, flags, b23, b815, tail, common):  # type: ignore[no-untyped-def]
        ttt, cmdsn, expstatsn = struct.unpack_from(">III", tail)
        return cls(
            final=bool(flags & 0x80),
            cont=bool(flags & 0x40),
            lun=bytes(b815),
            ttt=ttt,
            cmdsn=cmdsn,
            expstatsn=expstatsn,
            **common,
        )


@dataclass(slots=True)
class DataOut(Pdu):
    """SCSI Data-Out (RFC 7143 §11.7)."""

    OPCODE: ClassVar[Opcode] = Opcode.DATA_OUT
    final: bool = False
    lun: bytes = bytes(8)
    ttt: int = RESERVED_TAG
    expstatsn: int = 0
    datasn: int = 0
    buffer_offset: int = 0

    def _flags(self) -> int:
        return 0x80 if self.final else 0

    def _bytes8_15(self) -> bytes:
        return self.lun

    def _tail(self) -> bytes:
        return _pack_tail("I4xI4xII", self.ttt, self.expstatsn, self.datasn, self.buffer_offset)

    @classmethod
    def _from_fields(cls, flags, b23, b815, tail, common):  # type: ignore[no-untyped-def]
        ttt, expstatsn, datasn, offset = struct.unpack_from(">I4xI4xII", tail)
        return cls(
            final=bool(flags & 0x80),
            lun=bytes(b815),
            ttt=ttt,
            expstatsn=expstatsn,
            datasn=datasn,
            buffer_offset=offset,
            **common,
        )


@dataclass(slots=True)
class LogoutRequest(Pdu):
    """Logout Request (RFC 7143 §11.14). reason 0 = close session, 1 = connection."""

    OPCODE: ClassVar[Opcode] = Opcode.LOGOUT_REQUEST
    reason: int = 0
    cid: int = 0
    cmdsn: int = 0
    expstatsn: int = 0

    def _flags(self) -> int:
        return 0x80 | (self.reason & 0x7F)

    def _tail(self) -> bytes:
        return _pack_tail("HxxII", self.cid, self.cmdsn, self.expstatsn)

    @classmethod
    def _from_fields(cls, flags, b23, b815, tail, common):  # type: ignore[no-untyped-def]
        cid, cmdsn, expstatsn = struct.unpack_from(">HxxII", tail)
        return cls(reason=flags & 0x7F, cid=cid, cmdsn=cmdsn, expstatsn=expstatsn, **common)


@dataclass(slots=True)
class SnackRequest(Pdu):
    """SNACK Request (RFC 7143 §11.16); only meaningful at ErrorRecoveryLevel > 0."""

    OPCODE: ClassVar[Opcode] = Opcode.SNACK_REQUEST
    snack_type: int = 0
    lun: bytes = bytes(8)
    ttt: int = RESERVED_TAG
    expstatsn: int = 0
    begrun: int = 0
    runlength: int = 0

    def _flags(self) -> int:
        return 0x80 | (self.snack_type & 0x0F)

    def _bytes8_15(self) -> bytes:
        return self.lun

    def _tail(self) -> bytes:
        return _pack_tail("I4xI8xII", self.ttt, self.expstatsn, self.begrun, self.runlength)

    @classmethod
    def _from_fields(cls, flags, b23, b815, tail, common):  # type: ignore[no-untyped-def]
        ttt, expstatsn, begrun, runlength = struct.unpack_from(">I4xI8xII", tail)
        return cls(
            snack_type=flags & 0x0F,
            lun=bytes(b815),
            ttt=ttt,
            expstatsn=expstatsn,
            begrun=begrun,
            runlength=runlength,
            **common,
        )


# ---------------------------------------------------------------------------------------
# Target -> initiator PDUs
# ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class NopIn(Pdu):
    """NOP-In (RFC 7143 §11.19)."""

    OPCODE: ClassVar[Opcode] = Opcode.NOP_IN
    lun: bytes = bytes(8)
    ttt: int = RESERVED_TAG
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0

    def _bytes8_15(self) -> bytes:
        return self.lun

    def _tail(self) -> bytes:
        return _pack_tail("IIII", self.ttt, self.statsn, self.expcmdsn, self.maxcmdsn)

    @classmethod
    def _from_fields(cls, flags, b23, b815, tail, common):  # type: ignore[no-untyped-def]
        ttt, statsn, expcmdsn, maxcmdsn = struct.unpack_from(">IIII", tail)
        return cls(
            lun=bytes(b815), ttt=ttt, statsn=statsn, expcmdsn=expcmdsn, maxcmdsn=maxcmdsn, **common
        )


@dataclass(slots=True)
class ScsiResponsePdu(Pdu):
    """SCSI Response (RFC 7143 §11.4). ``data`` is SenseLength + sense (§11.4.7)."""

    OPCODE: ClassVar[Opcode] = Opcode.SCSI_RESPONSE
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

    def _flags(self) -> int:
        return (
            0x80
            | (0x10 if self.bidi_overflow else 0)
            | (0x08 if self.bidi_underflow else 0)
            | (0x04 if self.overflow else 0)
            | (0x02 if self.underflow else 0)
        )

    def _bytes2_3(self) -> bytes:
        return bytes((self.response, self.status))

    def _tail(self) -> bytes:
        return struct.pack(
            ">IIIIIII",
            self.snack_tag,
            self.statsn,
            self.expcmdsn,
            self.maxcmdsn,
            self.expdatasn,
            self.bidi_residual,
            self.residual,
        )

    @classmethod
    def _from_fields(cls, flags, b23, b815, tail, common):  # type: ignore[no-untyped-def]
        vals = struct.unpack_from(">IIIIIII", tail)
        return cls(
            bidi_overflow=bool(flags & 0x10),
            bidi_underflow=bool(flags & 0x08),
            overflow=bool(flags & 0x04),
            underflow=bool(flags & 0x02),
            response=b23[0],
            status=b23[1],
            snack_tag=vals[0],
            statsn=vals[1],
            expcmdsn=vals[2],
            maxcmdsn=vals[3],
            expdatasn=vals[4],
            bidi_residual=vals[5],
            residual=vals[6],
            **common,
        )

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
    response: int = 0
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0

    def _bytes2_3(self) -> bytes:
        return bytes((self.response, 0))

    def _tail(self) -> bytes:
        return _pack_tail("4xIII", self.statsn, self.expcmdsn, self.maxcmdsn)

    @classmethod
    def _from_fields(cls, flags, b23, b815, tail, common):  # type: ignore[no-untyped-def]
        statsn, expcmdsn, maxcmdsn = struct.unpack_from(">4xIII", tail)
        return cls(response=b23[0], statsn=statsn, expcmdsn=expcmdsn, maxcmdsn=maxcmdsn, **common)


@dataclass(slots=True)
class LoginResponse(Pdu):
    """Login Response (RFC 7143 §11.13)."""

    OPCODE: ClassVar[Opcode] = Opcode.LOGIN_RESPONSE
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

    def _flags(self) -> int:
        return (
            (0x80 if self.transit else 0)
            | (0x40 if self.cont else 0)
            | ((self.csg & 3) << 2)
            | (self.nsg & 3)
        )

    def _bytes2_3(self) -> bytes:
        return bytes((self.version_max, self.version_active))

    def _bytes8_15(self) -> bytes:
        return self.isid + self.tsih.to_bytes(2, "big")

    def _tail(self) -> bytes:
        return _pack_tail(
            "4xIIIBB",
            self.statsn,
            self.expcmdsn,
            self.maxcmdsn,
            self.status_class,
            self.status_detail,
        )

    @classmethod
    def _from_fields(cls, flags, b23, b815, tail, common):  # type: ignore[no-untyped-def]
        statsn, expcmdsn, maxcmdsn, scls, sdet = struct.unpack_from(">4xIIIBB", tail)
        return cls(
            transit=bool(flags & 0x80),
            cont=bool(flags & 0x40),
            csg=(flags >> 2) & 3,
            nsg=flags & 3,
            version_max=b23[0],
            version_active=b23[1],
            isid=bytes(b815[:6]),
            tsih=int.from_bytes(b815[6:8], "big"),
            statsn=statsn,
            expcmdsn=expcmdsn,
            maxcmdsn=maxcmdsn,
            status_class=scls,
            status_detail=sdet,
            **common,
        )


@dataclass(slots=True)
class TextResponse(Pdu):
    """Text Response (RFC 7143 §11.11)."""

    OPCODE: ClassVar[Opcode] = Opcode.TEXT_RESPONSE
    final: bool = True
    cont: bool = False
    lun: bytes = bytes(8)
    ttt: int = RESERVED_TAG
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0

    def _flags(self) -> int:
        return (0x80 if self.final else 0) | (0x40 if self.cont else 0)

    def _bytes8_15(self) -> bytes:
        return self.lun

    def _tail(self) -> bytes:
        return _pack_tail("IIII", self.ttt, self.statsn, self.expcmdsn, self.maxcmdsn)

    @classmethod
    def _from_fields(cls, flags, b23, b815, tail, common):  # type: ignore[no-untyped-def]
        ttt, statsn, expcmdsn, maxcmdsn = struct.unpack_from(">IIII", tail)
        return cls(
            final=bool(flags & 0x80),
            cont=bool(flags & 0x40),
            lun=bytes(b815),
            ttt=ttt,
            statsn=statsn,
            expcmdsn=expcmdsn,
            maxcmdsn=maxcmdsn,
            **common,
        )


@dataclass(slots=True)
class DataIn(Pdu):
    """SCSI Data-In (RFC 7143 §11.7); with ``status_present`` it also ends the task."""

    OPCODE: ClassVar[Opcode] = Opcode.DATA_IN
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

    def _flags(self) -> int:
        return (
            (0x80 if self.final else 0)
            | (0x40 if self.ack else 0)
            | (0x04 if self.overflow else 0)
            | (0x02 if self.underflow else 0)
            | (0x01 if self.status_present else 0)
        )

    def _bytes2_3(self) -> bytes:
        return bytes((0, self.status))

    def _bytes8_15(self) -> bytes:
        return self.lun

    def _tail(self) -> bytes:
        return struct.pack(
            ">IIIIIII",
            self.ttt,
            self.statsn,
            self.expcmdsn,
            self.maxcmdsn,
            self.datasn,
            self.buffer_offset,
            self.residual,
        )

    @classmethod
    def _from_fields(cls, flags, b23, b815, tail, common):  # type: ignore[no-untyped-def]
        vals = struct.unpack_from(">IIIIIII", tail)
        return cls(
            final=bool(flags & 0x80),
            ack=bool(flags & 0x40),
            overflow=bool(flags & 0x04),
            underflow=bool(flags & 0x02),
            status_present=bool(flags & 0x01),
            status=b23[1],
            lun=bytes(b815),
            ttt=vals[0],
            statsn=vals[1],
            expcmdsn=vals[2],
            maxcmdsn=vals[3],
            datasn=vals[4],
            buffer_offset=vals[5],
            residual=vals[6],
            **common,
        )


@dataclass(slots=True)
class LogoutResponse(Pdu):
    """Logout Response (RFC 7143 §11.15)."""

    OPCODE: ClassVar[Opcode] = Opcode.LOGOUT_RESPONSE
    response: int = 0
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    time2wait: int = 0
    time2retain: int = 0

    def _bytes2_3(self) -> bytes:
        return bytes((self.response, 0))

    def _tail(self) -> bytes:
        return _pack_tail(
            "4xIII4xHH", self.statsn, self.expcmdsn, self.maxcmdsn, self.time2wait, self.time2retain
        )

    @classmethod
    def _from_fields(cls, flags, b23, b815, tail, common):  # type: ignore[no-untyped-def]
        statsn, expcmdsn, maxcmdsn, t2w, t2r = struct.unpack_from(">4xIII4xHH", tail)
        return cls(
            response=b23[0],
            statsn=statsn,
            expcmdsn=expcmdsn,
            maxcmdsn=maxcmdsn,
            time2wait=t2w,
            time2retain=t2r,
            **common,
        )


@dataclass(slots=True)
class R2T(Pdu):
    """Ready To Transfer (RFC 7143 §11.8)."""

    OPCODE: ClassVar[Opcode] = Opcode.R2T
    lun: bytes = bytes(8)
    ttt: int = 0
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    r2tsn: int = 0
    buffer_offset: int = 0
    desired_length: int = 0

    def _bytes8_15(self) -> bytes:
        return self.lun

    def _tail(self) -> bytes:
        return struct.pack(
            ">IIIIIII",
            self.ttt,
            self.statsn,
            self.expcmdsn,
            self.maxcmdsn,
            self.r2tsn,
            self.buffer_offset,
            self.desired_length,
        )

    @classmethod
    def _from_fields(cls, flags, b23, b815, tail, common):  # type: ignore[no-untyped-def]
        vals = struct.unpack_from(">IIIIIII", tail)
        return cls(
            lun=bytes(b815),
            ttt=vals[0],
            statsn=vals[1],
            expcmdsn=vals[2],
            maxcmdsn=vals[3],
            r2tsn=vals[4],
            buffer_offset=vals[5],
            desired_length=vals[6],
            **common,
        )


@dataclass(slots=True)
class AsyncMessage(Pdu):
    """Asynchronous Message (RFC 7143 §11.9)."""

    OPCODE: ClassVar[Opcode] = Opcode.ASYNC_MESSAGE
    lun: bytes = bytes(8)
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    event: int = 0
    vcode: int = 0
    parameter1: int = 0
    parameter2: int = 0
    parameter3: int = 0

    def _bytes8_15(self) -> bytes:
        return self.lun

    def _tail(self) -> bytes:
        return _pack_tail(
            "4xIIIBBHHH",
            self.statsn,
            self.expcmdsn,
            self.maxcmdsn,
            self.event,
            self.vcode,
            self.parameter1,
            self.parameter2,
            self.parameter3,
        )

    @classmethod
    def _from_fields(cls, flags, b23, b815, tail, common):  # type: ignore[no-untyped-def]
        vals = struct.unpack_from(">4xIIIBBHHH", tail)
        return cls(
            lun=bytes(b815),
            statsn=vals[0],
            expcmdsn=vals[1],
            maxcmdsn=vals[2],
            event=vals[3],
            vcode=vals[4],
            parameter1=vals[5],
            parameter2=vals[6],
            parameter3=vals[7],
            **common,
        )


@dataclass(slots=True)
class Reject(Pdu):
    """Reject (RFC 7143 §11.17); ``data`` carries the rejected PDU's BHS."""

    OPCODE: ClassVar[Opcode] = Opcode.REJECT
    reason: int = RejectReason.PROTOCOL_ERROR
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    datasn: int = 0

    def _bytes2_3(self) -> bytes:
        return bytes((self.reason, 0))

    def _tail(self) -> bytes:
        return _pack_tail("4xIIII", self.statsn, self.expcmdsn, self.maxcmdsn, self.datasn)

    @classmethod
    def _from_fields(cls, flags, b23, b815, tail, common):  # type: ignore[no-untyped-def]
        statsn, expcmdsn, maxcmdsn, datasn = struct.unpack_from(">4xIIII", tail)
        return cls(
            reason=b23[0],
            statsn=statsn,
            expcmdsn=expcmdsn,
            maxcmdsn=maxcmdsn,
            datasn=datasn,
            **common,
        )


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
    view = memoryview(bhs)
    b0, flags, b23, _ahs_words, _dhi, _dlo, b815, itt = struct.unpack_from(_HEAD, view)
    opcode = b0 & 0x3F
    cls = PDU_TYPES.get(opcode)
    if cls is None:
        raise PduFormatError(f"unknown opcode 0x{opcode:02x}", RejectReason.COMMAND_NOT_SUPPORTED)
    common: dict[str, object] = {
        "immediate": bool(b0 & 0x40),
        "itt": itt,
        "data": data,
        "ahs": ahs,
    }
    return cls._from_fields(flags, b23, b815, view[_HEAD_LEN:], common)


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
