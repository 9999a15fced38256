"""Eight-byte LUN structures (SAM-5 §4.7).

Single-level LUNs are decoded in every address method that can name one: peripheral
device addressing (§4.7.7.2, bus 0), flat space addressing (§4.7.7.4), logical unit
addressing (§4.7.7.3, target 0 and bus 0) and extended flat space addressing
(§4.7.7.5, extended address method 2h, 3- or 5-byte form). Well-known LUNs, other
extended methods and multi-level LUNs are refused with :class:`ValueError`; the
transport answers those with LOGICAL UNIT NOT SUPPORTED. A LUN number is the same LU
whichever method names it, so masking cannot be bypassed by re-encoding a LUN.
"""

from __future__ import annotations

from typing import Final

_PERIPHERAL: Final = 0b00  # ADDRESS METHOD: peripheral device addressing
_FLAT: Final = 0b01  # ADDRESS METHOD: flat space addressing
_LOGICAL_UNIT: Final = 0b10  # ADDRESS METHOD: logical unit addressing
_EXTENDED: Final = 0b11  # ADDRESS METHOD: extended logical unit addressing
_EXTENDED_FLAT: Final = 0x2  # EXTENDED ADDRESS METHOD: extended flat space
MAX_PERIPHERAL_LUN: Final = 0xFF
MAX_FLAT_LUN: Final = 0x3FFF


def decode_lun(raw: bytes | bytearray | memoryview) -> int:
    """Return the LUN number of an 8-byte single-level LUN (SAM-5 §4.7.7)."""
    data = bytes(raw)
    if len(data) != 8:
        raise ValueError(f"a LUN is 8 bytes, got {len(data)}")
    method = data[0] >> 6  # ADDRESS METHOD
    if method == _EXTENDED:
        return _decode_extended(data)
    if any(data[2:]):
        raise ValueError("multi-level LUNs are not supported")
    if method == _PERIPHERAL:
        if data[0] & 0x3F:  # BUS IDENTIFIER
            raise ValueError("peripheral device addressing with a non-zero bus identifier")
        return data[1]  # TARGET OR LUN
    if method == _FLAT:
        return ((data[0] & 0x3F) << 8) | data[1]  # FLAT SPACE LUN
    # Logical unit addressing: TARGET (6 bits), BUS NUMBER (3 bits), LUN (5 bits).
    if data[0] & 0x3F or data[1] >> 5:
        raise ValueError("logical unit addressing with a non-zero target or bus")
    return data[1] & 0x1F


def _decode_extended(data: bytes) -> int:
    """Extended flat space addressing (SAM-5 §4.7.7.5): byte 0 holds the address
    method (11b), LENGTH (bits 5-4: 01b = 4 bytes, 10b = 6 bytes) and the EXTENDED
    ADDRESS METHOD (bits 3-0, 2h); the EXTENDED FLAT SPACE LUN follows."""
    length = (data[0] >> 4) & 0x3
    if data[0] & 0x0F != _EXTENDED_FLAT or length not in (1, 2):
        raise ValueError(f"unsupported extended LUN address 0x{data[0]:02x}")
    size = 3 if length == 1 else 5  # bytes of EXTENDED FLAT SPACE LUN
    if any(data[1 + size :]):
        raise ValueError("multi-level LUNs are not supported")
    return int.from_bytes(data[1 : 1 + size], "big")


def encode_lun(n: int) -> bytes:
    """Encode LUN ``n``: peripheral addressing below 256, flat space above (as Linux does)."""
    if 0 <= n <= MAX_PERIPHERAL_LUN:
        return bytes((_PERIPHERAL << 6, n)) + bytes(6)  # bus 0, TARGET OR LUN
    if MAX_PERIPHERAL_LUN < n <= MAX_FLAT_LUN:
        return bytes(((_FLAT << 6) | (n >> 8), n & 0xFF)) + bytes(6)  # FLAT SPACE LUN
    raise ValueError(f"LUN {n} cannot be encoded (0..{MAX_FLAT_LUN})")
