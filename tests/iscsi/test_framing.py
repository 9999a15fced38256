"""Receiving PDUs into the reader's own buffers (iscsi/framing.py ``PduReader``
``get_buffer``/``buffer_updated``, as asyncio's BufferedProtocol drives it): the PDUs
are the same as when the bytes are fed, however the socket splits them, and a large
SCSI Command's or Data-Out's data segment is received straight into the buffer that
becomes its ``data`` (RFC 7143 §11.2: padding and digests around it)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iscsi_vmtarget.iscsi import pdu as P
from iscsi_vmtarget.iscsi.framing import IN_PLACE_MIN, FramingError, PduReader, encode_pdu

MAX = 1 << 18


def wire_of(pdus: list[P.Pdu], hd: bool, dd: bool) -> bytes:
    return b"".join(b"".join(bytes(b) for b in encode_pdu(p, hd, dd)) for p in pdus)


def receive(reader: PduReader, wire: bytes, splits: list[int]) -> list[P.RawPdu]:
    """Play the socket: each receive puts at most the next split's count of bytes
    into the buffer the reader offers; PDUs are taken after every receive."""
    got: list[P.RawPdu] = []
    at, n = 0, 0
    while at < len(wire):
        room = reader.get_buffer()
        assert len(room) > 0
        k = min(len(room), splits[n % len(splits)], len(wire) - at)
        room[:k] = wire[at : at + k]
        del room  # the socket lets go of the buffer before the protocol is told
        reader.buffer_updated(k)
        at, n = at + k, n + 1
        while (raw := reader.next_pdu()) is not None:
            got.append(raw)
    assert reader.buffered == 0
    return got


def put(reader: PduReader, data: bytes) -> None:
    """One receive of ``data`` into the buffer the reader offers (it must fit)."""
    room = reader.get_buffer()
    room[: len(data)] = data
    del room
    reader.buffer_updated(len(data))


def medium_pdus(sizes: list[int]) -> list[P.Pdu]:
    """SCSI Commands with immediate data and Data-Outs of these sizes, between NOP-Ins
    (no data or a little, which never go in place)."""
    out: list[P.Pdu] = []
    for i, size in enumerate(sizes):
        data = bytes((i * 31 + j) & 0xFF for j in range(size))
        if i % 2:
            out.append(P.DataOut(itt=i, ttt=7, datasn=i, buffer_offset=size, data=data))
        else:
            out.append(P.ScsiCommand(itt=i, write=True, expected_length=size, cmdsn=i,
                                     cdb=b"\x2a" + bytes(15), data=data))  # fmt: skip
        out.append(P.NopIn(itt=1000 + i, data=b"x" * (i % 5)))
    return out


@pytest.mark.parametrize("hd,dd", [(False, False), (True, False), (False, True), (True, True)])
@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(
        st.one_of(st.integers(0, 64), st.integers(IN_PLACE_MIN - 3, IN_PLACE_MIN + 5),
                  st.integers(60000, 70000)),
        min_size=1, max_size=6,
    ),
    splits=st.lists(st.one_of(st.integers(1, 100), st.integers(1000, 200000)),
                    min_size=1, max_size=8),
)  # fmt: skip
def test_received_in_place_or_not_the_pdus_are_the_fed_ones(
    hd: bool, dd: bool, sizes: list[int], splits: list[int]
) -> None:
    pdus = medium_pdus(sizes)
    wire = wire_of(pdus, hd, dd)
    fed = PduReader(MAX, hd, dd)
    fed.feed(wire)
    expected = []
    while (raw := fed.next_pdu()) is not None:
        expected.append(raw)
    got = receive(PduReader(MAX, hd, dd), wire, splits)
    assert [r.decode() for r in got] == [r.decode() for r in expected] == pdus
    assert not any(r.digest_error for r in got)


def test_a_large_data_out_lands_in_its_own_buffer() -> None:
    """Once the header is in, the socket is given the data segment's own buffer (only
    its remaining part, so the next PDU's bytes never land there), and that buffer is
    the PDU's data: no copy between the socket and the SCSI layer."""
    data = bytes(range(256)) * 256  # 64 KiB
    first, second = P.DataOut(itt=1, ttt=2, data=data), P.NopIn(itt=9)
    wire = wire_of([first, second], False, False)
    reader = PduReader(MAX)
    put(reader, wire[:1000])  # the header and the start of the data
    assert reader.next_pdu() is None
    room = reader.get_buffer()
    assert len(room) == 48 + len(data) - 1000  # exactly what is left of the segment
    target = room.obj
    room[:] = wire[1000 : 48 + len(data)]
    reader.buffer_updated(len(room))
    raw = reader.next_pdu()
    assert raw is not None and raw.data is target and raw.data == data
    put(reader, wire[48 + len(data) :])
    assert reader.next_pdu().decode() == second  # type: ignore[union-attr]


def test_a_bad_data_digest_in_place_is_reported_and_the_stream_goes_on() -> None:
    data = b"\x5a" * (IN_PLACE_MIN + 2)  # padded: the data is a view of its buffer
    wire = bytearray(wire_of([P.DataOut(itt=1, data=data), P.NopIn(itt=2)], False, True))
    wire[48 + len(data) + 2] ^= 0xFF  # the data digest, after 2 bytes of padding
    got = receive(PduReader(MAX, False, True), bytes(wire), [100, 5000])
    assert [r.digest_error for r in got] == [True, False]
    assert bytes(got[0].data) == data and got[1].decode() == P.NopIn(itt=2)


def test_a_bad_header_digest_fails_before_the_data_is_taken_in() -> None:
    wire = bytearray(wire_of([P.DataOut(itt=1, data=bytes(65536))], True, False))
    wire[10] ^= 1
    reader = PduReader(MAX, header_digest=True)
    put(reader, wire[:200])
    with pytest.raises(FramingError, match="header digest"):
        reader.next_pdu()


def test_an_oversized_data_segment_is_refused_at_its_header() -> None:
    wire = wire_of([P.DataOut(itt=1, data=bytes(9000))], False, False)
    reader = PduReader(8192)
    put(reader, wire[:48])
    with pytest.raises(FramingError, match="MaxRecvDataSegmentLength"):
        reader.next_pdu()


def test_a_pdu_larger_than_the_buffer_is_received_whole() -> None:
    """A Text Request (never in place) of 200 KiB: the reader offers room for all of
    it, moving to a larger buffer rather than resizing the one the socket may hold."""
    pdus = [P.NopIn(itt=1, data=b"a" * 10), P.TextRequest(itt=2, data=b"k=v\0" * 51200)]
    got = receive(PduReader(MAX), wire_of(pdus, False, False), [70000])
    assert [r.decode() for r in got] == pdus
