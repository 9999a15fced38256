"""LUN structures (SAM-5 §4.7): peripheral and flat space addressing only."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iscsi_vmtarget.scsi import decode_lun, encode_lun


def test_peripheral_encoding() -> None:
    assert encode_lun(0) == bytes(8)
    assert encode_lun(5) == bytes.fromhex("0005000000000000")
    assert encode_lun(255) == bytes.fromhex("00ff000000000000")


def test_flat_encoding() -> None:
    assert encode_lun(256) == bytes.fromhex("4100000000000000")
    assert encode_lun(16383) == bytes.fromhex("7fff000000000000")


def test_flat_form_of_small_lun_decodes() -> None:
    assert decode_lun(bytes.fromhex("4005000000000000")) == 5


@given(st.integers(min_value=0, max_value=16383))
def test_round_trip(n: int) -> None:
    assert decode_lun(encode_lun(n)) == n


@pytest.mark.parametrize("n", [-1, 16384, 1 << 20])
def test_encode_out_of_range(n: int) -> None:
    with pytest.raises(ValueError):
        encode_lun(n)


@pytest.mark.parametrize(
    "raw",
    [
        "8001000000000000",  # logical unit addressing
        "c101000000000000",  # extended addressing / well-known LUN
        "0101000000000000",  # peripheral with a bus identifier
        "0001000100000000",  # second level
        "00010000000000",  # 7 bytes
    ],
)
def test_decode_refuses(raw: str) -> None:
    with pytest.raises(ValueError):
        decode_lun(bytes.fromhex(raw))
