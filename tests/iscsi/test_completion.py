"""The packed completions of iscsi/completion.py against the generic PDU encoder:
the same wire bytes for every flag and field, with and without digests."""

from __future__ import annotations

import itertools

import pytest

from iscsi_vmtarget.iscsi import pdu as P
from iscsi_vmtarget.iscsi.completion import command_end, residual_flags
from iscsi_vmtarget.iscsi.framing import encode_pdu


def _wire(buffers: list[P.Payload]) -> bytes:
    return b"".join(bytes(b) for b in buffers)


@pytest.mark.parametrize(
    "overflow,underflow,hd,dd,size",
    [
        (o, u, hd, dd, size)
        for o, u, hd, dd in itertools.product((False, True), repeat=4)
        for size in (1, 4096, 8191)
    ],
)
def test_a_read_ends_in_the_generic_data_in(
    overflow: bool, underflow: bool, hd: bool, dd: bool, size: int
) -> None:
    data = memoryview(bytes(range(256)) * 32)[:size]
    generic = P.DataIn(
        itt=0x12345678, final=True, status_present=True, status=0x02, overflow=overflow,
        underflow=underflow, residual=0x0A0B0C0D, lun=bytes(8), statsn=0xFFFFFFFF,
        expcmdsn=0x01020304, maxcmdsn=0x05060708, datasn=0, buffer_offset=0, data=data,
    )  # fmt: skip
    fast = command_end(
        0x12345678, 0x02, residual_flags(overflow, underflow), 0x0A0B0C0D, 0xFFFFFFFF,
        0x01020304, 0x05060708, data, 99, hd, dd,
    )  # fmt: skip
    assert _wire(fast) == _wire(encode_pdu(generic, hd, dd))


@pytest.mark.parametrize("overflow,underflow,hd", list(itertools.product((False, True), repeat=3)))
def test_a_write_ends_in_the_generic_scsi_response(
    overflow: bool, underflow: bool, hd: bool
) -> None:
    generic = P.ScsiResponsePdu(
        itt=7, status=0x28, overflow=overflow, underflow=underflow, residual=512,
        statsn=0x80000000, expcmdsn=9, maxcmdsn=136, expdatasn=3,
    )  # fmt: skip
    fast = command_end(
        7, 0x28, residual_flags(overflow, underflow), 512, 0x80000000, 9, 136, b"", 3, hd, True
    )
    assert _wire(fast) == _wire(encode_pdu(generic, hd, True))
