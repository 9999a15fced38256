"""PDU codec: every PDU type round-trips; framing, padding and digests."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iscsi_vmtarget.iscsi import pdu as P
from iscsi_vmtarget.iscsi.digest import crc32c, digest_bytes
from iscsi_vmtarget.iscsi.framing import FramingError, PduReader, encode_pdu

u32 = st.integers(0, 0xFFFFFFFF)
u16 = st.integers(0, 0xFFFF)
u8 = st.integers(0, 0xFF)


def _field_strategy(cls: type[P.Pdu], f: dataclasses.Field) -> st.SearchStrategy:  # type: ignore[type-arg]
    name = f.name
    if name == "data":
        return st.binary(max_size=64)
    if name == "ahs":
        return st.just(b"")
    if name in ("lun",):
        return st.binary(min_size=8, max_size=8)
    if name == "isid":
        return st.binary(min_size=6, max_size=6)
    if name == "cdb":
        return st.binary(min_size=16, max_size=16)
    if name == "immediate":
        return st.just(True) if cls is P.LoginRequest else st.booleans()
    if f.type in ("bool",):
        return st.booleans()
    limits = {
        "function": st.integers(0, 0x7F),
        "reason": st.integers(0, 0x7F) if cls is P.LogoutRequest else u8,
        "snack_type": st.integers(0, 0x0F),
        "attr": st.integers(0, 7),
        "csg": st.integers(0, 3),
        "nsg": st.integers(0, 3),
        "tsih": u16,
        "cid": u16,
        "time2wait": u16,
        "time2retain": u16,
        "parameter1": u16,
        "parameter2": u16,
        "parameter3": u16,
    }
    if name in limits:
        return limits[name]
    if name in (
        "version_max",
        "version_min",
        "version_active",
        "status",
        "response",
        "status_class",
        "status_detail",
        "event",
        "vcode",
    ):
        return u8
    return u32


def _pdu_strategy(cls: type[P.Pdu]) -> st.SearchStrategy[P.Pdu]:
    fields = {f.name: _field_strategy(cls, f) for f in dataclasses.fields(cls)}
    return st.builds(cls, **fields)


@pytest.mark.parametrize("cls", list(P.PDU_TYPES.values()), ids=lambda c: c.__name__)
@given(data=st.data())
def test_every_pdu_type_round_trips(cls: type[P.Pdu], data: st.DataObject) -> None:
    pdu = data.draw(_pdu_strategy(cls))
    bhs = pdu.encode_bhs()
    assert len(bhs) == P.BHS_LEN
    back = P.decode(bhs, pdu.ahs, pdu.data)
    assert back == pdu


def test_bhs_field_positions_of_a_scsi_command() -> None:
    """Byte offsets from RFC 7143 §11.3."""
    cmd = P.ScsiCommand(
        itt=0x01020304,
        read=True,
        lun=bytes([0, 5, 0, 0, 0, 0, 0, 0]),
        expected_length=0x1000,
        cmdsn=7,
        expstatsn=9,
        cdb=b"\x28" + bytes(15),
        data=b"abc",
    )
    bhs = cmd.encode_bhs()
    assert bhs[0] == 0x01
    assert bhs[1] == 0x80 | 0x40 | 0x01
    assert bhs[5:8] == b"\x00\x00\x03"
    assert bhs[8:16] == cmd.lun
    assert bhs[16:20] == b"\x01\x02\x03\x04"
    assert bhs[20:24] == (0x1000).to_bytes(4, "big")
    assert bhs[24:28] == (7).to_bytes(4, "big")
    assert bhs[32] == 0x28


def test_unknown_opcode_is_a_format_error_with_reject_reason() -> None:
    bhs = bytearray(48)
    bhs[0] = 0x1F
    with pytest.raises(P.PduFormatError) as info:
        P.decode(bytes(bhs))
    assert info.value.reason == P.RejectReason.COMMAND_NOT_SUPPORTED


def test_crc32c_rfc7143_vectors() -> None:
    """RFC 7143 Appendix B.4."""
    assert digest_bytes(bytes(32)) == bytes.fromhex("aa36918a")
    assert digest_bytes(b"\xff" * 32) == bytes.fromhex("43aba862")
    assert digest_bytes(bytes(range(32))) == bytes.fromhex("4e79dd46")
    assert digest_bytes(bytes(range(31, -1, -1))) == bytes.fromhex("5cdb3f11")
    assert crc32c(b"12345", crc32c(b"6789")) != crc32c(b"123456789")


@pytest.mark.parametrize("hd,dd", [(False, False), (True, False), (False, True), (True, True)])
@given(payload=st.binary(max_size=300), split=st.integers(1, 64))
def test_reader_reassembles_any_split(hd: bool, dd: bool, payload: bytes, split: int) -> None:
    pdus = [P.NopIn(itt=i, data=payload[: i * 7]) for i in range(4)]
    wire = b"".join(b"".join(bytes(b) for b in encode_pdu(p, hd, dd)) for p in pdus)
    assert len(wire) % 4 == 0
    reader = PduReader(max_data_length=1 << 16, header_digest=hd, data_digest=dd)
    got = []
    for i in range(0, len(wire), split):
        reader.feed(wire[i : i + split])
        while (raw := reader.next_pdu()) is not None:
            assert not raw.digest_error
            got.append(raw.decode())
    assert got == pdus


def test_header_digest_mismatch_is_fatal() -> None:
    wire = bytearray(b"".join(encode_pdu(P.NopIn(itt=1), True, False)))
    wire[48] ^= 1
    reader = PduReader(header_digest=True)
    reader.feed(wire)
    with pytest.raises(FramingError):
        reader.next_pdu()


def test_header_digest_covers_the_ahs() -> None:
    """§13.1: the header digest covers the BHS and every AHS (here an Extended CDB)."""
    ahs = (17).to_bytes(2, "big") + b"\x01\x00" + bytes(range(16))  # 16 more CDB bytes
    pdu = P.ScsiCommand(itt=1, cdb=bytes([0x7F]) + bytes(15), ahs=ahs)
    wire = bytearray(b"".join(encode_pdu(pdu, True, False)))
    assert wire[68:72] == digest_bytes(wire[:68])
    reader = PduReader(header_digest=True)
    reader.feed(wire)
    raw = reader.next_pdu()
    assert raw is not None and raw.ahs == ahs
    wire[60] ^= 1  # one bit of the AHS
    reader = PduReader(header_digest=True)
    reader.feed(wire)
    with pytest.raises(FramingError, match="header digest mismatch"):
        reader.next_pdu()


def test_data_digest_mismatch_is_flagged_not_fatal() -> None:
    wire = bytearray(
        b"".join(bytes(b) for b in encode_pdu(P.NopIn(itt=1, data=b"hello"), False, True))
    )
    wire[50] ^= 1
    reader = PduReader(data_digest=True)
    reader.feed(wire)
    raw = reader.next_pdu()
    assert raw is not None and raw.digest_error


def test_oversized_data_segment_is_fatal() -> None:
    wire = b"".join(bytes(b) for b in encode_pdu(P.NopIn(itt=1, data=bytes(9000))))
    reader = PduReader(max_data_length=8192)
    reader.feed(wire)
    with pytest.raises(FramingError, match="MaxRecvDataSegmentLength"):
        reader.next_pdu()


def test_extended_cdb_ahs_is_appended_to_the_cdb() -> None:
    """A 32-byte CDB: 16 bytes in the BHS, 16 in an Extended CDB AHS (§11.2.2.3)."""
    cdb = bytes(range(1, 33))
    ahs = (17).to_bytes(2, "big") + b"\x01\x00" + cdb[16:]  # length counts the reserved byte
    ahs += bytes(-len(ahs) % 4)
    pdu = P.ScsiCommand(itt=1, cdb=cdb[:16], ahs=ahs)
    back = P.decode(pdu.encode_bhs(), ahs)
    assert isinstance(back, P.ScsiCommand) and back.cdb == cdb


def test_ahs_of_unknown_type_is_an_invalid_pdu_field() -> None:
    ahs = (5).to_bytes(2, "big") + b"\x07\x00" + bytes(4)
    pdu = P.ScsiCommand(itt=1, ahs=ahs)
    with pytest.raises(P.PduFormatError) as info:
        P.decode(pdu.encode_bhs(), ahs)
    assert info.value.reason == P.RejectReason.INVALID_PDU_FIELD
