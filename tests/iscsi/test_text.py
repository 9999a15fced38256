"""RFC 7143 §6.1 text format: round trips, malformed input, value encodings."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iscsi_vmtarget.iscsi.text import (
    MAX_VALUE_LEN,
    TextFormatError,
    encode_base64,
    encode_boolean,
    encode_hex,
    encode_text,
    parse_binary,
    parse_boolean,
    parse_list,
    parse_number,
    parse_text,
)

KEY_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-+@_#"
keys = st.text(KEY_ALPHABET, min_size=1, max_size=63)
values = st.text(
    st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=60
)


@given(st.dictionaries(keys, values, max_size=20))
def test_round_trip(pairs: dict[str, str]) -> None:
    items = list(pairs.items())
    assert parse_text(encode_text(items)) == items


@given(st.binary(max_size=300))
def test_parse_never_raises_anything_but_text_format_error(data: bytes) -> None:
    try:
        pairs = parse_text(data)
    except TextFormatError:
        return
    assert encode_text(pairs) == data


def test_empty_text_is_no_pairs() -> None:
    assert parse_text(b"") == []


def test_empty_value_is_allowed() -> None:
    assert parse_text(b"SendTargets=\x00") == [("SendTargets", "")]


def test_value_may_contain_equals() -> None:
    assert parse_text(b"X-a=b=c\x00") == [("X-a", "b=c")]


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"Key=value", "NUL terminator"),
        (b"Keyvalue\x00", "separator"),
        (b"=value\x00", "empty key"),
        (b"A=1\x00\x00", "separator"),
        (b"Bad Key=1\x00", "illegal characters"),
        (b"K" * 64 + b"=1\x00", "max 63"),
        (b"Key=" + b"v" * 256 + b"\x00", "max 255"),
        (b"Key=\xff\xfe\x00", "UTF-8"),
        (b"A=1\x00A=2\x00", "twice"),
    ],
)
def test_malformed(data: bytes, fragment: str) -> None:
    with pytest.raises(TextFormatError, match=fragment):
        parse_text(data)


def test_duplicates_allowed_when_asked() -> None:
    data = b"TargetName=a\x00TargetAddress=x\x00TargetName=b\x00"
    pairs = parse_text(data, unique=False)
    assert [k for k, _ in pairs] == ["TargetName", "TargetAddress", "TargetName"]


def test_long_values_only_for_chap_binary_keys() -> None:
    long_hex = "0x" + "ab" * 1024
    assert parse_text(encode_text([("CHAP_C", long_hex)])) == [("CHAP_C", long_hex)]
    assert len(long_hex) > MAX_VALUE_LEN
    with pytest.raises(TextFormatError):
        parse_text(b"CHAP_C=0x" + b"a" * 8200 + b"\x00")


def test_encode_refuses_bad_input() -> None:
    with pytest.raises(TextFormatError):
        encode_text([("A", "x\x00y")])
    with pytest.raises(TextFormatError):
        encode_text([("bad key", "1")])


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("0", 0),
        ("8192", 8192),
        ("0x2000", 8192),
        ("0X2000", 8192),
        ("0bIAA=", 8192),
        ("18446744073709551615", 2**64 - 1),
    ],
)
def test_parse_number(text: str, number: int) -> None:
    assert parse_number(text) == number


@pytest.mark.parametrize(
    "text", ["", "-1", "+1", "012", "1.5", "0x", "0xg", "0b", "0b!!", "18446744073709551616", "Yes"]
)
def test_parse_number_rejects(text: str) -> None:
    with pytest.raises(TextFormatError):
        parse_number(text)


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_number_encodings_agree(n: int) -> None:
    raw = n.to_bytes(8, "big")
    assert parse_number(str(n)) == parse_number(hex(n)) == parse_number(encode_base64(raw)) == n


@given(st.binary(min_size=1, max_size=64))
def test_binary_round_trip(data: bytes) -> None:
    assert parse_binary(encode_hex(data)) == data
    assert parse_binary(encode_base64(data)) == data


def test_binary_odd_hex_digits_and_errors() -> None:
    assert parse_binary("0xabc") == b"\x0a\xbc"
    for bad in ("abc", "0x", "0bA", "12"):
        with pytest.raises(TextFormatError):
            parse_binary(bad)


def test_booleans_and_lists() -> None:
    assert parse_boolean("Yes") is True and parse_boolean("No") is False
    assert encode_boolean(True) == "Yes" and encode_boolean(False) == "No"
    with pytest.raises(TextFormatError):
        parse_boolean("yes")
    assert parse_list("CRC32C,None") == ["CRC32C", "None"]
    for bad in ("", "a,,b", "a,"):
        with pytest.raises(TextFormatError):
            parse_list(bad)
