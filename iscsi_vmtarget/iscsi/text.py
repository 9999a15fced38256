"""The iSCSI text format (RFC 7143 §6.1): ``key=value`` pairs, each ended by a NUL.

Pure functions: :func:`parse_text` turns a complete data segment (already joined
across C-bit continuations) into ordered pairs, :func:`encode_text` does the reverse,
and the value helpers decode the §6.1 value encodings (decimal, ``0x`` hex, ``0b``
base64, booleans, lists). Every malformed input raises :class:`TextFormatError`,
whose message says what was wrong; callers turn it into a login status 02/00 or a
Reject (RFC 7143 §11.17).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable

from ..errors import IscsiVmtargetError

# RFC 7143 §6.1: "A key-name ... MUST NOT exceed 63 characters".
MAX_KEY_LEN = 63
# RFC 7143 §6.1: "If not otherwise specified, the maximum length of a simple-value (not its
# encoded representation) is 255 bytes, not including the delimiter (comma or zero byte)."
MAX_VALUE_LEN = 255
# RFC 7143 §6.1: every implementation must accept 8192 bytes of text; values that the RFC
# lets grow beyond 255 bytes (the large-binary-values of CHAP, §12.1.3: up to 1024 binary
# bytes, i.e. 2050 hex characters) are capped at that size.
MAX_LONG_VALUE_LEN = 8192

#: Keys whose values may exceed :data:`MAX_VALUE_LEN` (RFC 7143 §12.1.3: C and R are
#: binary values up to 1024 bytes, encoded in hex or base64).
LONG_VALUE_KEYS: frozenset[str] = frozenset({"CHAP_C", "CHAP_R"})

# RFC 7143 §6.1 key-name characters: letters, digits, '.', '-', '+', '@', '_'; plus '#'
# for the X# extension keys of §13.5.4 (e.g. X#NodeArchitecture, §13.26).
_KEY_RE = re.compile(rb"[A-Za-z0-9.\-+@_#]+")
_DECIMAL_RE = re.compile(r"(0|[1-9][0-9]*)")
_HEX_RE = re.compile(r"0[xX][0-9a-fA-F]+")
_BASE64_RE = re.compile(r"0[bB][A-Za-z0-9+/]+={0,2}")

_MAX_NUMERIC = (1 << 64) - 1  # RFC 7143 §6.1 numerical-value: "always less than 2**64"


class TextFormatError(IscsiVmtargetError, ValueError):
    """Malformed text (RFC 7143 §6.1); the message says what and where."""


def parse_text(
    data: bytes | bytearray | memoryview, *, unique: bool = True
) -> list[tuple[str, str]]:
    """Parse NUL-terminated ``key=value`` pairs (RFC 7143 §6.1) in order.

    ``unique`` rejects a key that appears twice: RFC 7143 §6.2 forbids offering or
    declaring a key more than once in a negotiation (login and text requests); a
    SendTargets answer repeats TargetName/TargetAddress and is parsed with
    ``unique=False``.
    """
    raw = bytes(data)
    if not raw:
        return []
    if not raw.endswith(b"\x00"):
        raise TextFormatError("text does not end with a NUL terminator (§6.1)")
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    for index, item in enumerate(raw[:-1].split(b"\x00")):
        key_bytes, sep, value_bytes = item.partition(b"=")
        if not sep:
            raise TextFormatError(f"pair {index} has no '=' separator")
        key = _check_key(key_bytes)
        try:
            value = value_bytes.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TextFormatError(f"value of {key} is not UTF-8") from exc
        limit = MAX_LONG_VALUE_LEN if key in LONG_VALUE_KEYS else MAX_VALUE_LEN
        if len(value_bytes) > limit:
            raise TextFormatError(f"value of {key} is {len(value_bytes)} bytes (max {limit})")
        if unique:
            if key in seen:
                raise TextFormatError(f"key {key} appears twice (§6.2)")
            seen.add(key)
        pairs.append((key, value))
    return pairs


def _check_key(key_bytes: bytes) -> str:
    if not key_bytes:
        raise TextFormatError("empty key name")
    if len(key_bytes) > MAX_KEY_LEN:
        raise TextFormatError(f"key name of {len(key_bytes)} bytes (max {MAX_KEY_LEN})")
    if not _KEY_RE.fullmatch(key_bytes):
        raise TextFormatError(f"key name {key_bytes[:MAX_KEY_LEN]!r} has illegal characters")
    return key_bytes.decode("ascii")


def encode_text(pairs: Iterable[tuple[str, str]]) -> bytes:
    """Encode pairs as ``key=value\\0`` (RFC 7143 §6.1); refuses what parse would refuse."""
    out = bytearray()
    for key, value in pairs:
        key_bytes = key.encode("ascii", errors="replace")
        _check_key(key_bytes)
        value_bytes = value.encode("utf-8")
        if b"\x00" in value_bytes:
            raise TextFormatError(f"value of {key} contains a NUL")
        out += key_bytes + b"=" + value_bytes + b"\x00"
    return bytes(out)


# ---------------------------------------------------------------------------------------
# Value encodings (RFC 7143 §6.1)
# ---------------------------------------------------------------------------------------


def parse_number(value: str) -> int:
    """A numerical-value (RFC 7143 §6.1): decimal, ``0x`` hex or ``0b`` base64, < 2**64.

    Decimal constants have no leading zeros and no sign, as in the RFC grammar.
    """
    if _DECIMAL_RE.fullmatch(value):
        number = int(value)
    elif _HEX_RE.fullmatch(value):
        number = int(value[2:], 16)
    elif _BASE64_RE.fullmatch(value):
        number = int.from_bytes(_b64(value), "big")
    else:
        raise TextFormatError(f"{value[:32]!r} is not a numerical value")
    if number > _MAX_NUMERIC:
        raise TextFormatError(f"{value[:32]!r} is not less than 2**64")
    return number


def parse_binary(value: str) -> bytes:
    """A binary-value in ``0x`` hex or ``0b`` base64 form (RFC 7143 §6.1).

    A hex constant's byte length counts four bits per digit (§6.1), so an odd number
    of digits is read with an implicit leading zero nibble.
    """
    if _HEX_RE.fullmatch(value):
        digits = value[2:]
        if len(digits) % 2:
            digits = "0" + digits
        return bytes.fromhex(digits)
    if _BASE64_RE.fullmatch(value):
        return _b64(value)
    raise TextFormatError(f"{value[:32]!r} is not a hex (0x) or base64 (0b) binary value")


def _b64(value: str) -> bytes:
    try:
        return base64.b64decode(value[2:], validate=True)
    except binascii.Error as exc:
        raise TextFormatError(f"bad base64 constant {value[:32]!r}") from exc


def encode_hex(data: bytes) -> str:
    """``0x``-prefixed hex-constant (RFC 7143 §6.1)."""
    return "0x" + data.hex()


def encode_base64(data: bytes) -> str:
    """``0b``-prefixed base64-constant (RFC 7143 §6.1)."""
    return "0b" + base64.b64encode(data).decode("ascii")


def parse_boolean(value: str) -> bool:
    """A boolean-value (RFC 7143 §6.1): exactly ``Yes`` or ``No``."""
    if value == "Yes":
        return True
    if value == "No":
        return False
    raise TextFormatError(f"{value[:32]!r} is not Yes or No")


def encode_boolean(flag: bool) -> str:
    return "Yes" if flag else "No"


def parse_list(value: str) -> list[str]:
    """A list-of-values (RFC 7143 §6.1): comma-separated, no empty members."""
    items = value.split(",")
    if any(not item for item in items):
        raise TextFormatError(f"{value[:32]!r} has an empty list member")
    for item in items:
        if len(item.encode("utf-8")) > MAX_VALUE_LEN:
            raise TextFormatError("list member longer than 255 bytes")
    return items
