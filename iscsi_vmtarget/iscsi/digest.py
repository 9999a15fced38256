"""CRC32C header and data digests (RFC 7143 §13.1, test vectors in Appendix B.4).

The digest is the CRC32C (Castagnoli) of the covered bytes, sent least significant
byte first. Uses the C-accelerated ``crc32c`` package (SSE4.2/ARMv8 instructions).
"""

from __future__ import annotations

import crc32c as _crc32c

DIGEST_LEN = 4


def crc32c(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """CRC32C of ``data``, continuing from ``value`` (0 to start)."""
    return _crc32c.crc32c(data, value)


def digest_bytes(*parts: bytes | bytearray | memoryview) -> bytes:
    """The 4 wire bytes of the digest over the concatenation of ``parts``."""
    value = 0
    for part in parts:
        value = _crc32c.crc32c(part, value)
    return value.to_bytes(4, "little")
