"""An in-memory backend for tests and scratch LUNs."""

from __future__ import annotations

from .backend import BackendError, check_range


class MemoryBackend:
    def __init__(self, size: int, read_only: bool = False) -> None:
        self._buf = bytearray(size)
        self._read_only = read_only

    @property
    def size(self) -> int:
        return len(self._buf)

    @property
    def read_only(self) -> bool:
        return self._read_only

    def read_into(self, offset: int, buf: memoryview) -> None:
        check_range(self.size, offset, len(buf))
        buf[:] = memoryview(self._buf)[offset : offset + len(buf)]

    def read(self, offset: int, length: int) -> bytearray:
        check_range(self.size, offset, length)
        return self._buf[offset : offset + length]

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self._read_only:
            raise BackendError("backend is read-only")
        view = memoryview(data).cast("B")
        check_range(self.size, offset, len(view))
        self._buf[offset : offset + len(view)] = view

    def flush(self) -> None:
        pass

    def unmap(self, offset: int, length: int) -> None:
        check_range(self.size, offset, length)
        self._buf[offset : offset + length] = bytes(length)

    zero_range = unmap  # memory has no allocation to keep or give back

    def resize(self, size: int) -> None:
        if size > len(self._buf):
            self._buf.extend(bytes(size - len(self._buf)))
        else:
            del self._buf[size:]

    def allocated_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        return [(offset, length)]

    def close(self) -> None:
        pass
