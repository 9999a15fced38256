"""Receiving PDUs into the reader's own buffer (iscsi/framing.py ``PduReader``
``get_buffer``/``buffer_updated``, as asyncio's BufferedProtocol drives it): the PDUs
are the same as when the bytes are fed, however the socket splits them (RFC 7143
§11.2: padding and digests), and the buffer stays at its size."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iscsi_vmtarget.iscsi import pdu as P
from iscsi_vmtarget.iscsi.framing import BUFFER_SIZE, FramingError, PduReader, encode_pdu

MAX = 1 << 20


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


def medium_pdus(sizes: list[int]) -> list[P.Pdu]:
    """SCSI Commands with immediate data and Data-Outs of these sizes, between NOP-Ins."""
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
    sizes=st.lists(st.one_of(st.integers(0, 64), st.integers(60000, 70000)),
                   min_size=1, max_size=8),
    splits=st.lists(st.one_of(st.integers(1, 100), st.integers(1000, 300000)),
                    min_size=1, max_size=8),
)  # fmt: skip
def test_received_pdus_are_the_fed_ones_however_split(
    hd: bool, dd: bool, sizes: list[int], splits: list[int]
) -> None:
    pdus = medium_pdus(sizes)
    wire = wire_of(pdus, hd, dd)
    fed = PduReader(MAX, hd, dd)
    fed.feed(wire)
    expected = []
    while (raw := fed.next_pdu()) is not None:
        expected.append(raw)
    reader = PduReader(MAX, hd, dd)
    got = receive(reader, wire, splits)
    assert [r.decode() for r in got] == [r.decode() for r in expected] == pdus
    assert not any(r.digest_error for r in got)
    assert reader.capacity == BUFFER_SIZE  # PDUs below it never grow the buffer


def test_a_pdu_larger_than_the_buffer_is_received_whole() -> None:
    """A Text Request of 400 KiB: the reader offers room for all of it, moving to a
    larger buffer rather than resizing the one the socket may still hold."""
    pdus = [P.NopIn(itt=1, data=b"a" * 10), P.TextRequest(itt=2, data=b"k=v\0" * 102400)]
    reader = PduReader(MAX)
    got = receive(reader, wire_of(pdus, False, False), [70000])
    assert [r.decode() for r in got] == pdus
    assert reader.capacity >= 400 << 10


def test_an_oversized_data_segment_is_refused_at_its_header() -> None:
    """§7.8: no waiting for a data segment larger than MaxRecvDataSegmentLength."""
    wire = wire_of([P.DataOut(itt=1, data=bytes(9000))], False, False)
    reader = PduReader(8192)
    room = reader.get_buffer()
    room[:48] = wire[:48]
    del room
    reader.buffer_updated(48)
    with pytest.raises(FramingError, match="MaxRecvDataSegmentLength"):
        reader.next_pdu()


def test_no_memory_until_the_first_receive() -> None:
    reader = PduReader()
    assert reader.capacity == 0
    assert len(reader.get_buffer()) == BUFFER_SIZE

