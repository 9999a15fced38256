"""The scapy iSCSI layer and our codec are two descriptions of RFC 7143 §11: they agree
on every opcode, field by field, both ways."""

from __future__ import annotations

from hypothesis import given, settings
from scapy.layers.inet import IP, TCP

from iscsi_vmtarget.iscsi import pdu as P
from iscsi_vmtarget.iscsi.framing import PduReader, encode_pdu
from iscsi_vmtarget.testing import scapy_iscsi as S
from iscsi_vmtarget.testing.pdu_strategies import any_pdu


def codec_fields(pdu: P.Pdu) -> dict[str, object]:
    names = [n for n, _, _ in pdu.FIELDS] + [n for n, _ in pdu.BITS] + ["itt", "immediate"]
    return {n: getattr(pdu, n) for n in names}


def test_every_codec_opcode_has_a_scapy_class() -> None:
    assert set(S.BY_OPCODE) == set(P.PDU_TYPES)
    for opcode, cls in S.BY_OPCODE.items():
        assert cls.__name__ == P.PDU_TYPES[opcode].__name__.replace("Pdu", "")


@settings(max_examples=400, deadline=None)
@given(any_pdu())
def test_scapy_dissects_what_the_codec_encodes(pdu: P.Pdu) -> None:
    raw = b"".join(bytes(b) for b in encode_pdu(pdu))
    pkt = S.ISCSI(raw)
    assert type(pkt) is S.BY_OPCODE[pdu.OPCODE]
    for name, value in codec_fields(pdu).items():
        got = getattr(pkt, name)
        want = int(value) if isinstance(value, bool) else value
        assert got == want, (name, got, want)
    assert bytes(pkt.data) == bytes(pdu.data)
    assert pkt.data_segment_length == len(pdu.data)


@settings(max_examples=400, deadline=None)
@given(any_pdu())
def test_codec_decodes_what_scapy_builds(pdu: P.Pdu) -> None:
    values = {k: int(v) if isinstance(v, bool) else v for k, v in codec_fields(pdu).items()}
    pkt = S.BY_OPCODE[pdu.OPCODE](**values, data=bytes(pdu.data))
    assert bytes(pkt) == b"".join(bytes(b) for b in encode_pdu(pdu))


@settings(max_examples=100, deadline=None)
@given(any_pdu())
def test_digests_match_the_framing_layer(pdu: P.Pdu) -> None:
    wire = b"".join(bytes(b) for b in encode_pdu(pdu, True, True))
    pkt = S.ISCSI(b"".join(bytes(b) for b in encode_pdu(pdu)))
    assert S.frame(pkt, header_digest=True, data_digest=True) == wire
    reader = PduReader(max_data_length=1 << 24, header_digest=True, data_digest=True)
    reader.feed(S.frame(pkt, True, True, corrupt_data_digest=True))
    raw = reader.next_pdu()
    assert raw is not None and raw.digest_error == bool(pdu.data)
    (back,), rest = S.dissect_stream(wire, True, True)
    assert rest == b"" and bytes(back) == bytes(pkt)


def test_bound_to_tcp_3260_and_several_pdus_per_segment() -> None:
    two = S.NopOut(itt=1, immediate=1, data=b"ping") / S.ScsiCommand(itt=2, cdb=bytes(16))
    pkt = IP(bytes(IP(dst="127.0.0.1") / TCP(sport=40000, dport=3260) / two))
    assert pkt.haslayer(S.NopOut) and pkt.haslayer(S.ScsiCommand)
    assert pkt[S.NopOut].data == b"ping" and pkt[S.ScsiCommand].itt == 2
    back = IP(bytes(IP() / TCP(sport=3260, dport=40000) / S.Reject(reason=0x09)))
    assert back[S.Reject].reason == P.RejectReason.INVALID_PDU_FIELD
    assert "Reject" in back.summary()


def test_unknown_opcodes_dissect_as_generic_bhs() -> None:
    pkt = S.ISCSI(bytes([0x1C, 0x80]) + bytes(46))
    assert type(pkt) is S.ISCSI and pkt.opcode == 0x1C and pkt.itt == 0
