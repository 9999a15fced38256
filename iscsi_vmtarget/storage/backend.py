"""The block backend interface: what every storage backend offers the layers above.

The storage layer knows nothing of SCSI: it sees byte offsets and lengths on a flat
object of fixed size, in the spirit of LIO's ``exec_cmd_ops`` (rw, sync, unmap).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from ..errors import IscsiVmtargetError


class BackendError(IscsiVmtargetError):
    """An I/O error from a backend (maps to MEDIUM ERROR or similar above)."""


@runtime_checkable
class BlockBackend(Protocol):
    """A fixed-size byte-addressed store.

    Callers guarantee ``0 <= offset`` and ``offset + length <= size``; backends
    still refuse out-of-range requests with :class:`ValueError` as a last guard.
    Optional extras, looked up with ``getattr``: ``allocated_ranges(offset,
    length)`` (data extents, for GET LBA STATUS), ``written_ranges(offset, length)``
    (the same without preallocated, unwritten extents, for thick LUNs),
    ``zero_range(offset, length)`` (zeros that keep their allocation, for thick
    LUNs) and ``crypto_erase()``.
    """

    @property
    def size(self) -> int:
        """Size in bytes."""
        ...

    @property
    def read_only(self) -> bool: ...

    def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` from ``offset``; holes read as zeros."""
        ...

    def read(self, offset: int, length: int) -> bytearray:
        """Return ``length`` bytes from ``offset``."""
        ...

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``offset`` (may stay in the page cache until flush)."""
        ...

    def flush(self) -> None:
        """Make every completed write durable (fdatasync)."""
        ...

    def unmap(self, offset: int, length: int) -> None:
        """Deallocate a range; it then reads as zeros."""
        ...

    def resize(self, size: int) -> None:
        """Grow (or shrink) to ``size`` bytes."""
        ...

    def close(self) -> None: ...


def check_range(size: int, offset: int, length: int) -> None:
    """Last-line bounds guard shared by all backends."""
    if offset < 0 or length < 0 or offset + length > size:
        raise ValueError(f"range {offset}+{length} outside backend of {size} bytes")
