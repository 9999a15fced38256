"""Eight-byte LUN structures (SAM-5 §4.7).

We support single-level LUNs in two address methods: peripheral device
addressing (§4.7.7.2, LUNs 0-255, bus identifier 0) and flat space addressing
(§4.7.7.4, LUNs 0-16383). Logical unit addressing, extended addressing,
well-known LUNs and multi-level LUNs are refused with :class:`ValueError`;
the transport answers those with LOGICAL UNIT NOT SUPPORTED or a Reject.
"""

from __future__ import annotations

from typing import Final

_PERIPHERAL: Final = 0b00  # ADDRESS METHOD: peripheral device addressing
_FLAT: Final = 0b01  # ADDRESS METHOD: flat space addressing
MAX_PERIPHERAL_LUN: Final = 0xFF
MAX_FLAT_LUN: Final = 0x3FFF


def decode_lun(raw: bytes | bytearray | memoryview) -> int:
    """Return the LUN number of an 8-byte single-level LUN (SAM-5 §4.7.7)."""
    data = bytes(raw)
    if len(data) != 8:
        raise ValueError(f"a LUN is 8 bytes, got {len(data)}")
    if any(data[2:]):
        raise ValueError("multi-level LUNs are not supported")
    method = data[0] >> 6  # ADDRESS METHOD
    if method == _PERIPHERAL:
        if data[0] & 0x3F:  # BUS IDENTIFIER
            raise ValueError("peripheral device addressing with a non-zero bus identifier")
        return data[1]  # TARGET OR LUN
    if method == _FLAT:
        return ((data[0] & 0x3F) << 8) | data[1]  # FLAT SPACE LUN
    raise ValueError(f"unsupported LUN address method {method:#04b}")


def encode_lun(n: int) -> bytes:
    """Encode LUN ``n``: peripheral addressing below 256, flat space above (as Linux does)."""
    if 0 <= n <= MAX_PERIPHERAL_LUN:
        return bytes((_PERIPHERAL << 6, n)) + bytes(6)  # bus 0, TARGET OR LUN
    if MAX_PERIPHERAL_LUN < n <= MAX_FLAT_LUN:
        return bytes(((_FLAT << 6) | (n >> 8), n & 0xFF)) + bytes(6)  # FLAT SPACE LUN
    raise ValueError(f"LUN {n} cannot be encoded (0..{MAX_FLAT_LUN})")
