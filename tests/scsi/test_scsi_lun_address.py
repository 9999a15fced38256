"""LUN structures (SAM-5 §4.7): every address method that names a single-level LUN."""

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
        "8101000000000000",  # logical unit addressing, target 1
        "8021000000000000",  # logical unit addressing, bus 1
        "c101000000000000",  # well-known LUN
        "d300000500000000",  # extended, unknown extended address method
        "d200000500000001",  # extended flat, a second level after it
        "0101000000000000",  # peripheral with a bus identifier
        "0001000100000000",  # second level
        "00010000000000",  # 7 bytes
    ],
)
def test_decode_refuses(raw: str) -> None:
    with pytest.raises(ValueError):
        decode_lun(bytes.fromhex(raw))


@pytest.mark.parametrize(
    "raw,n",
    [
        ("0007000000000000", 7),  # peripheral
        ("4007000000000000", 7),  # flat space
        ("8007000000000000", 7),  # logical unit addressing: target 0, bus 0, LUN 7
        ("d200000700000000", 7),  # extended flat space, 3-byte LUN
        ("e200000000070000", 7),  # extended flat space, 5-byte LUN
        ("d201234500000000", 0x12345),
    ],
)
def test_every_method_names_the_same_lun(raw: str, n: int) -> None:
    """Masking compares numbers: a re-encoded LUN reaches the same LU, no other."""
    assert decode_lun(bytes.fromhex(raw)) == n
