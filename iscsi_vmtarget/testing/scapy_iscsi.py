"""An iSCSI layer for scapy (RFC 7143 §11), written from the RFC's figures.

It is deliberately a second, independent description of the wire format: our codec
(:mod:`iscsi_vmtarget.iscsi.pdu`) declares its layouts one way, this module the scapy
way, and a test checks that they agree for every opcode. Tests use it to craft PDUs
that our codec would refuse to build (lying length fields, reserved bits set, AHS
garbage, any opcode) and to dissect what the target sends.

* :class:`ISCSI` - decoding ``ISCSI(raw)`` picks the class of the opcode in byte 0;
  unknown opcodes stay :class:`ISCSI` (a generic BHS). Bytes after one PDU dissect as
  the next PDU, so a TCP payload carrying several PDUs shows them all.
* ``TotalAHSLength`` and ``DataSegmentLength`` are computed when left ``None`` and the
  data segment is padded to 4 bytes (§11.2.3) unless ``padding`` is given.
* Digests (§13.1) are not part of a packet: :func:`frame` appends CRC32C header and
  data digests (or wrong ones), :func:`dissect_stream` strips them.
* Bound to TCP port 3260 in both directions.
"""

from __future__ import annotations

from typing import Any

import crc32c
from scapy.fields import (
    BitEnumField,
    BitField,
    ByteEnumField,
    ByteField,
    Field,
    IntField,
    ShortField,
    StrLenField,
    ThreeBytesField,
    XIntField,
    XStrFixedLenField,
)
from scapy.layers.inet import TCP
from scapy.packet import Packet, Raw, bind_layers

ISCSI_PORT = 3260
BHS_LEN = 48

OPCODES = {
    0x00: "NOP-Out", 0x01: "SCSI-Command", 0x02: "Task-Mgmt-Request", 0x03: "Login-Request",
    0x04: "Text-Request", 0x05: "Data-Out", 0x06: "Logout-Request", 0x10: "SNACK-Request",
    0x1C: "Vendor-1C", 0x1D: "Vendor-1D", 0x1E: "Vendor-1E",
    0x20: "NOP-In", 0x21: "SCSI-Response", 0x22: "Task-Mgmt-Response", 0x23: "Login-Response",
    0x24: "Text-Response", 0x25: "Data-In", 0x26: "Logout-Response", 0x31: "R2T",
    0x32: "Async-Message", 0x3C: "Vendor-3C", 0x3D: "Vendor-3D", 0x3E: "Vendor-3E",
    0x3F: "Reject",
}  # fmt: skip
REJECT_REASONS = {
    0x02: "data-digest-error", 0x03: "snack-reject", 0x04: "protocol-error",
    0x05: "command-not-supported", 0x06: "immediate-command-reject", 0x07: "task-in-progress",
    0x08: "invalid-data-ack", 0x09: "invalid-pdu-field", 0x0A: "long-op-reject",
    0x0B: "deprecated", 0x0C: "waiting-for-logout",
}  # fmt: skip
STAGES = {0: "security", 1: "operational", 3: "full-feature"}


# -- field groups shared by the figures ---------------------------------------------------
def _byte0(opcode: int) -> list[Field[Any, Any]]:
    """Byte 0 (§11.2.1.1-2): reserved bit, I (immediate delivery), opcode."""
    return [
        BitField("reserved0", 0, 1),
        BitField("immediate", 0, 1),
        BitEnumField("opcode", opcode, 6, OPCODES),
    ]


def _final_only() -> list[Field[Any, Any]]:
    """Byte 1 of PDUs whose F bit is always 1 and the rest reserved."""
    return [BitField("final", 1, 1), BitField("reserved1", 0, 7)]


def _lengths() -> list[Field[Any, Any]]:
    """Byte 4 TotalAHSLength (in words, §11.2.1.5), 5-7 DataSegmentLength (§11.2.1.6)."""
    return [ByteField("total_ahs_length", None), ThreeBytesField("data_segment_length", None)]


def _reserved(name: str, n: int) -> Field[Any, Any]:
    return XStrFixedLenField(name, bytes(n), n)


def _lun() -> Field[Any, Any]:
    return XStrFixedLenField("lun", bytes(8), 8)  # bytes 8-15 (§11.2.1.8, SAM-5 §4.7)


def _sn_triple() -> list[Field[Any, Any]]:
    """Bytes 24-35 of target PDUs: StatSN, ExpCmdSN, MaxCmdSN."""
    return [IntField("statsn", 0), IntField("expcmdsn", 0), IntField("maxcmdsn", 0)]


def _segments() -> list[Field[Any, Any]]:
    """AHS (§11.2.2), data segment and its padding (§11.2.3)."""
    return [
        StrLenField("ahs", b"", length_from=lambda p: (p.total_ahs_length or 0) * 4),
        StrLenField("data", b"", length_from=lambda p: p.data_segment_length or 0),
        StrLenField("padding", None, length_from=lambda p: -(p.data_segment_length or 0) & 3),
    ]


class ISCSI(Packet):
    """A PDU with an opcode we have no figure for: the generic BHS (§11.2.1)."""

    name = "iSCSI"
    fields_desc = [
        *_byte0(0x1D),
        ByteField("flags", 0x80),
        XStrFixedLenField("opcode_specific_2", bytes(2), 2),
        *_lengths(),
        _lun(),
        XIntField("itt", 0xFFFFFFFF),
        XStrFixedLenField("opcode_specific_20", bytes(28), 28),
        *_segments(),
    ]

    @classmethod
    def dispatch_hook(cls, _pkt: bytes | None = None, *args: Any, **kargs: Any) -> type[Packet]:
        if cls is ISCSI and _pkt and len(_pkt) >= 1:
            return BY_OPCODE.get(_pkt[0] & 0x3F, ISCSI)
        return cls

    def post_build(self, pkt: bytes, pay: bytes) -> bytes:
        if self.total_ahs_length is None:
            pkt = pkt[:4] + bytes([len(self.ahs or b"") // 4 & 0xFF]) + pkt[5:]
        dlen = len(self.data or b"")
        if self.data_segment_length is None:
            pkt = pkt[:5] + (dlen & 0xFFFFFF).to_bytes(3, "big") + pkt[8:]
        if self.padding is None:
            pkt += bytes(-dlen & 3)
        return pkt + pay

    def guess_payload_class(self, payload: bytes) -> type[Packet]:
        return ISCSI if len(payload) >= BHS_LEN else Raw

    def mysummary(self) -> str:
        return self.sprintf("iSCSI %opcode% itt=%itt%")


# -- initiator -> target (§11.3, 11.5, 11.7, 11.10, 11.12, 11.14, 11.16, 11.18) --------------
class NopOut(ISCSI):
    name = "iSCSI NOP-Out"
    fields_desc = [
        *_byte0(0x00), *_final_only(), _reserved("reserved2", 2), *_lengths(), _lun(),
        XIntField("itt", 0xFFFFFFFF), XIntField("ttt", 0xFFFFFFFF), IntField("cmdsn", 0),
        IntField("expstatsn", 0), _reserved("reserved32", 16), *_segments(),
    ]  # fmt: skip


class ScsiCommand(ISCSI):
    name = "iSCSI SCSI Command"
    fields_desc = [
        *_byte0(0x01),
        BitField("final", 1, 1), BitField("read", 0, 1), BitField("write", 0, 1),
        BitField("reserved1", 0, 2),
        BitEnumField("attr", 1, 3, {0: "untagged", 1: "simple", 2: "ordered", 3: "head", 4: "aca"}),
        _reserved("reserved2", 2), *_lengths(), _lun(), XIntField("itt", 0),
        IntField("expected_length", 0), IntField("cmdsn", 0), IntField("expstatsn", 0),
        XStrFixedLenField("cdb", bytes(16), 16), *_segments(),
    ]  # fmt: skip


class TaskMgmtRequest(ISCSI):
    name = "iSCSI Task Management Request"
    fields_desc = [
        *_byte0(0x02), BitField("final", 1, 1),
        BitEnumField("function", 1, 7, {
            1: "abort-task", 2: "abort-task-set", 3: "clear-aca", 4: "clear-task-set",
            5: "lun-reset", 6: "target-warm-reset", 7: "target-cold-reset", 8: "task-reassign",
        }),
        _reserved("reserved2", 2), *_lengths(), _lun(), XIntField("itt", 0),
        XIntField("referenced_task_tag", 0xFFFFFFFF), IntField("cmdsn", 0),
        IntField("expstatsn", 0), IntField("refcmdsn", 0), IntField("expdatasn", 0),
        _reserved("reserved40", 8), *_segments(),
    ]  # fmt: skip


def _login_flags() -> list[Field[Any, Any]]:
    """Byte 1 of Login PDUs (§11.12.1-3): T, C, reserved, CSG, NSG."""
    return [
        BitField("transit", 0, 1), BitField("cont", 0, 1), BitField("reserved1", 0, 2),
        BitEnumField("csg", 0, 2, STAGES), BitEnumField("nsg", 0, 2, STAGES),
    ]  # fmt: skip


class LoginRequest(ISCSI):
    name = "iSCSI Login Request"
    fields_desc = [
        *_byte0(0x03), *_login_flags(), ByteField("version_max", 0), ByteField("version_min", 0),
        *_lengths(), XStrFixedLenField("isid", bytes.fromhex("400001370000"), 6),
        ShortField("tsih", 0), XIntField("itt", 0), ShortField("cid", 0),
        _reserved("reserved22", 2), IntField("cmdsn", 0), IntField("expstatsn", 0),
        _reserved("reserved32", 16), *_segments(),
    ]  # fmt: skip

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if not args and not kwargs.get("_pkt"):  # building, not dissecting
            kwargs.setdefault("immediate", 1)  # §11.12: the I bit is always 1
        super().__init__(*args, **kwargs)


class TextRequest(ISCSI):
    name = "iSCSI Text Request"
    fields_desc = [
        *_byte0(0x04), BitField("final", 1, 1), BitField("cont", 0, 1),
        BitField("reserved1", 0, 6), _reserved("reserved2", 2), *_lengths(), _lun(),
        XIntField("itt", 0), XIntField("ttt", 0xFFFFFFFF), IntField("cmdsn", 0),
        IntField("expstatsn", 0), _reserved("reserved32", 16), *_segments(),
    ]  # fmt: skip


class DataOut(ISCSI):
    name = "iSCSI Data-Out"
    fields_desc = [
        *_byte0(0x05), BitField("final", 0, 1), BitField("reserved1", 0, 7),
        _reserved("reserved2", 2), *_lengths(), _lun(), XIntField("itt", 0),
        XIntField("ttt", 0xFFFFFFFF), _reserved("reserved24", 4), IntField("expstatsn", 0),
        _reserved("reserved32", 4), IntField("datasn", 0), IntField("buffer_offset", 0),
        _reserved("reserved44", 4), *_segments(),
    ]  # fmt: skip


class LogoutRequest(ISCSI):
    name = "iSCSI Logout Request"
    fields_desc = [
        *_byte0(0x06), BitField("final", 1, 1),
        BitEnumField("reason", 0, 7, {0: "close-session", 1: "close-connection", 2: "recovery"}),
        _reserved("reserved2", 2), *_lengths(), _reserved("reserved8", 8), XIntField("itt", 0),
        ShortField("cid", 0), _reserved("reserved22", 2), IntField("cmdsn", 0),
        IntField("expstatsn", 0), _reserved("reserved32", 16), *_segments(),
    ]  # fmt: skip


class SnackRequest(ISCSI):
    name = "iSCSI SNACK Request"
    fields_desc = [
        *_byte0(0x10), BitField("final", 1, 1), BitField("reserved1", 0, 3),
        BitEnumField("snack_type", 0, 4, {0: "data-r2t", 1: "status", 2: "data-ack", 3: "rdata"}),
        _reserved("reserved2", 2), *_lengths(), _lun(), XIntField("itt", 0xFFFFFFFF),
        XIntField("ttt", 0xFFFFFFFF), _reserved("reserved24", 4), IntField("expstatsn", 0),
        _reserved("reserved32", 8), IntField("begrun", 0), IntField("runlength", 0),
        *_segments(),
    ]  # fmt: skip


# -- target -> initiator (§11.4, 11.6, 11.7, 11.8, 11.9, 11.11, 11.13, 11.15, 11.17, 11.19) --
class NopIn(ISCSI):
    name = "iSCSI NOP-In"
    fields_desc = [
        *_byte0(0x20), *_final_only(), _reserved("reserved2", 2), *_lengths(), _lun(),
        XIntField("itt", 0xFFFFFFFF), XIntField("ttt", 0xFFFFFFFF), *_sn_triple(),
        _reserved("reserved36", 12), *_segments(),
    ]  # fmt: skip


class ScsiResponse(ISCSI):
    name = "iSCSI SCSI Response"
    fields_desc = [
        *_byte0(0x21), BitField("final", 1, 1), BitField("reserved1", 0, 2),
        BitField("bidi_overflow", 0, 1), BitField("bidi_underflow", 0, 1),
        BitField("overflow", 0, 1), BitField("underflow", 0, 1), BitField("reserved1b", 0, 1),
        ByteEnumField("response", 0, {0: "completed", 1: "target-failure"}),
        ByteEnumField("status", 0, {0: "GOOD", 2: "CHECK CONDITION", 8: "BUSY",
                                    0x18: "RESERVATION CONFLICT", 0x28: "TASK SET FULL"}),
        *_lengths(), _reserved("reserved8", 8), XIntField("itt", 0), XIntField("snack_tag", 0),
        *_sn_triple(), IntField("expdatasn", 0), IntField("bidi_residual", 0),
        IntField("residual", 0), *_segments(),
    ]  # fmt: skip

    @property
    def sense(self) -> bytes:
        """Sense data without its SenseLength prefix (§11.4.7.2)."""
        data = bytes(self.data or b"")
        return data[2 : 2 + int.from_bytes(data[:2], "big")] if len(data) >= 2 else b""


class TaskMgmtResponse(ISCSI):
    name = "iSCSI Task Management Response"
    fields_desc = [
        *_byte0(0x22), *_final_only(), ByteField("response", 0), _reserved("reserved3", 1),
        *_lengths(), _reserved("reserved8", 8), XIntField("itt", 0), _reserved("reserved20", 4),
        *_sn_triple(), _reserved("reserved36", 12), *_segments(),
    ]  # fmt: skip


class LoginResponse(ISCSI):
    name = "iSCSI Login Response"
    fields_desc = [
        *_byte0(0x23), *_login_flags(), ByteField("version_max", 0),
        ByteField("version_active", 0), *_lengths(), XStrFixedLenField("isid", bytes(6), 6),
        ShortField("tsih", 0), XIntField("itt", 0), _reserved("reserved20", 4), *_sn_triple(),
        ByteField("status_class", 0), ByteField("status_detail", 0),
        _reserved("reserved38", 10), *_segments(),
    ]  # fmt: skip


class TextResponse(ISCSI):
    name = "iSCSI Text Response"
    fields_desc = [
        *_byte0(0x24), BitField("final", 1, 1), BitField("cont", 0, 1),
        BitField("reserved1", 0, 6), _reserved("reserved2", 2), *_lengths(), _lun(),
        XIntField("itt", 0), XIntField("ttt", 0xFFFFFFFF), *_sn_triple(),
        _reserved("reserved36", 12), *_segments(),
    ]  # fmt: skip


class DataIn(ISCSI):
    name = "iSCSI Data-In"
    fields_desc = [
        *_byte0(0x25), BitField("final", 0, 1), BitField("ack", 0, 1),
        BitField("reserved1", 0, 3), BitField("overflow", 0, 1), BitField("underflow", 0, 1),
        BitField("status_present", 0, 1), _reserved("reserved2", 1), ByteField("status", 0),
        *_lengths(), _lun(), XIntField("itt", 0), XIntField("ttt", 0xFFFFFFFF), *_sn_triple(),
        IntField("datasn", 0), IntField("buffer_offset", 0), IntField("residual", 0),
        *_segments(),
    ]  # fmt: skip


class LogoutResponse(ISCSI):
    name = "iSCSI Logout Response"
    fields_desc = [
        *_byte0(0x26), *_final_only(), ByteField("response", 0), _reserved("reserved3", 1),
        *_lengths(), _reserved("reserved8", 8), XIntField("itt", 0), _reserved("reserved20", 4),
        *_sn_triple(), _reserved("reserved36", 4), ShortField("time2wait", 0),
        ShortField("time2retain", 0), _reserved("reserved44", 4), *_segments(),
    ]  # fmt: skip


class R2T(ISCSI):
    name = "iSCSI R2T"
    fields_desc = [
        *_byte0(0x31), *_final_only(), _reserved("reserved2", 2), *_lengths(), _lun(),
        XIntField("itt", 0), XIntField("ttt", 0), *_sn_triple(), IntField("r2tsn", 0),
        IntField("buffer_offset", 0), IntField("desired_length", 0), *_segments(),
    ]  # fmt: skip


class AsyncMessage(ISCSI):
    name = "iSCSI Asynchronous Message"
    fields_desc = [
        *_byte0(0x32), *_final_only(), _reserved("reserved2", 2), *_lengths(), _lun(),
        XIntField("itt", 0xFFFFFFFF), _reserved("reserved20", 4), *_sn_triple(),
        ByteField("event", 0), ByteField("vcode", 0), ShortField("parameter1", 0),
        ShortField("parameter2", 0), ShortField("parameter3", 0), _reserved("reserved44", 4),
        *_segments(),
    ]  # fmt: skip


class Reject(ISCSI):
    name = "iSCSI Reject"
    fields_desc = [
        *_byte0(0x3F), *_final_only(), ByteEnumField("reason", 0x04, REJECT_REASONS),
        _reserved("reserved3", 1), *_lengths(), _reserved("reserved8", 8),
        XIntField("itt", 0xFFFFFFFF), _reserved("reserved20", 4), *_sn_triple(),
        IntField("datasn", 0), _reserved("reserved40", 8), *_segments(),
    ]  # fmt: skip


BY_OPCODE: dict[int, type[ISCSI]] = {
    cls.fields_desc[2].default: cls
    for cls in (
        NopOut, ScsiCommand, TaskMgmtRequest, LoginRequest, TextRequest, DataOut,
        LogoutRequest, SnackRequest, NopIn, ScsiResponse, TaskMgmtResponse, LoginResponse,
        TextResponse, DataIn, LogoutResponse, R2T, AsyncMessage, Reject,
    )
}  # fmt: skip

bind_layers(TCP, ISCSI, dport=ISCSI_PORT)
bind_layers(TCP, ISCSI, sport=ISCSI_PORT)


# -- digests and streams --------------------------------------------------------------------
def digest(data: bytes) -> bytes:
    """CRC32C, least significant byte first (RFC 7143 §13.1)."""
    return crc32c.crc32c(data).to_bytes(4, "little")


def frame(
    pkt: Packet,
    header_digest: bool = False,
    data_digest: bool = False,
    corrupt_header_digest: bool = False,
    corrupt_data_digest: bool = False,
) -> bytes:
    """One PDU's wire bytes with the digests a session negotiated (or wrong ones)."""
    raw = bytes(pkt)
    if not (header_digest or data_digest):
        return raw
    head_len = BHS_LEN + len(pkt.ahs or b"")
    head, segment = raw[:head_len], raw[head_len:]
    out = head
    if header_digest:
        hd = digest(head)
        out += bytes([hd[0] ^ 0xFF]) + hd[1:] if corrupt_header_digest else hd
    out += segment
    if data_digest and segment:
        dd = digest(segment)
        out += bytes([dd[0] ^ 0xFF]) + dd[1:] if corrupt_data_digest else dd
    return out


def dissect_stream(
    data: bytes, header_digest: bool = False, data_digest: bool = False
) -> tuple[list[ISCSI], bytes]:
    """Cut a received byte stream into PDUs by their declared lengths; digests are
    dropped. Returns the PDUs and the bytes of an incomplete last PDU."""
    pdus: list[ISCSI] = []
    pos = 0
    while len(data) - pos >= BHS_LEN:
        ahs = data[pos + 4] * 4
        dlen = int.from_bytes(data[pos + 5 : pos + 8], "big")
        hd = 4 if header_digest else 0
        dd = 4 if data_digest and dlen else 0
        total = BHS_LEN + ahs + hd + dlen + (-dlen & 3) + dd
        if len(data) - pos < total:
            break
        head = data[pos : pos + BHS_LEN + ahs]
        body = data[pos + BHS_LEN + ahs + hd : pos + total - dd]
        pkt = ISCSI(head + body)
        pkt.remove_payload()
        pdus.append(pkt)
        pos += total
    return pdus, data[pos:]
