"""Views of a unit: what an initiator is shown of it, as block backends.

A :class:`GuestView` is a :class:`~iscsi_vmtarget.storage.BlockBackend` whose size is
the guest's disk and whose offsets are guest offsets: it translates them to unit
offsets per concealment mode (:mod:`.layout`) and refuses anything past the disk.
The SCSI device server above it never learns there is more: its READ CAPACITY and
its LOGICAL BLOCK ADDRESS OUT OF RANGE check (SBC-3 §4.5) both derive from
``GuestView.size``, so the bound is defined once, here, and enforced here a second
time for every byte that reaches the raw unit (seed: "the virtualization layer
intercepts requests from a guest"). No command of any kind - READ, WRITE, WRITE SAME,
UNMAP, COMPARE AND WRITE, VERIFY, GET LBA STATUS - has another path to the unit.

A :class:`RawView` is the whole unit for a management or backup initiator: hidden
regions are stored encrypted, so it serves them as the ciphertext they are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from ..storage.backend import BackendError, BlockBackend, check_range
from .format import UnitHeader, UnitState

CapacityListener = Callable[[int, int], None]


class SliceBackend:
    """A window ``[offset, offset + length)`` of another backend (a unit carved out of
    a device pool). With ``owns_base``, closing the slice closes the base too."""

    def __init__(
        self, base: BlockBackend, offset: int, length: int, *, owns_base: bool = False
    ) -> None:
        check_range(base.size, offset, length)
        self._base = base
        self._owns_base = owns_base
        self.offset = offset
        self._size = length

    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self._base.read_only

    def read_into(self, offset: int, buf: memoryview) -> None:
        check_range(self._size, offset, len(buf))
        self._base.read_into(self.offset + offset, buf)

    def read(self, offset: int, length: int) -> bytearray:
        check_range(self._size, offset, length)
        return self._base.read(self.offset + offset, length)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        check_range(self._size, offset, len(view))
        self._base.write(self.offset + offset, view)

    def flush(self) -> None:
        self._base.flush()

    def unmap(self, offset: int, length: int) -> None:
        check_range(self._size, offset, length)
        self._base.unmap(self.offset + offset, length)

    def resize(self, size: int) -> None:
        """Only the pool may move the window (:meth:`set_length`)."""
        raise BackendError("a unit of a device pool is resized by its pool")

    def set_length(self, length: int) -> None:
        check_range(self._base.size, self.offset, length)
        self._size = length

    def allocated_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        check_range(self._size, offset, length)
        ranges = getattr(self._base, "allocated_ranges", None)
        if ranges is None:
            return [(offset, length)]
        return [(o - self.offset, n) for o, n in ranges(self.offset + offset, length)]

    def close(self) -> None:
        if self._owns_base:
            self._base.close()


# One guest segment: (guest offset, length, unit offset).
Segment = tuple[int, int, int]


def guest_segments(header: UnitHeader) -> tuple[Segment, ...]:
    out = []
    guest = 0
    for region in header.guest_segments:
        out.append((guest, region.length, region.offset))
        guest += region.length
    return tuple(out)


class GuestView:
    """The guest's disk of one unit: size = disk size, offsets translated per mode."""

    def __init__(
        self,
        raw: BlockBackend,
        header: UnitHeader,
        *,
        read_only: bool = False,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        if header.state is not UnitState.CLEAN:
            raise BackendError(
                f"unit {header.unit_uuid} has an unfinished resize; open it through the "
                "VM layer to complete it first"
            )
        self._raw = raw
        self._read_only = read_only
        self._on_close = on_close
        self._listeners: list[CapacityListener] = []
        self.unit_uuid = header.unit_uuid
        self._map = (header.disk_size, guest_segments(header))

    # -- BlockBackend ------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._map[0]

    @property
    def read_only(self) -> bool:
        return self._read_only or self._raw.read_only

    def _pieces(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        """(unit offset, position in the request, byte count) covering the request.

        The concealment bound: nothing outside ``[0, size)`` is ever translated.
        """
        size, segments = self._map
        check_range(size, offset, length)
        done = 0
        for start, seg_len, unit_off in segments:
            if done == length:
                return
            pos = offset + done
            if pos >= start + seg_len:
                continue
            n = min(length - done, start + seg_len - pos)
            yield unit_off + pos - start, done, n
            done += n

    def _within(self, offset: int, length: int) -> int:
        """The unit offset of a request inside one segment (the common case: one
        compare and one add, the seed's "compare operation" on the I/O path), or -1
        when it spans segments. Raises ValueError outside the disk."""
        size, segments = self._map
        check_range(size, offset, length)
        for start, seg_len, unit_off in segments:
            if start <= offset and offset + length <= start + seg_len:
                return unit_off + offset - start
        return -1

    def read_into(self, offset: int, buf: memoryview) -> None:
        at = self._within(offset, len(buf))
        if at >= 0:
            self._raw.read_into(at, buf)
            return
        for unit_off, pos, n in self._pieces(offset, len(buf)):
            self._raw.read_into(unit_off, buf[pos : pos + n])

    def read(self, offset: int, length: int) -> bytearray:
        out = bytearray(length)
        self.read_into(offset, memoryview(out))
        return out

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self.read_only:
            raise BackendError("guest view is read-only")
        view = memoryview(data).cast("B")
        at = self._within(offset, len(view))
        if at >= 0:
            self._raw.write(at, view)
            return
        for unit_off, pos, n in self._pieces(offset, len(view)):
            self._raw.write(unit_off, view[pos : pos + n])

    def flush(self) -> None:
        self._raw.flush()

    def unmap(self, offset: int, length: int) -> None:
        if self.read_only:
            return
        for unit_off, _at, n in self._pieces(offset, length):
            self._raw.unmap(unit_off, n)

    def allocated_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Mapped extents (guest offsets) for GET LBA STATUS, clipped to the disk."""
        ranges = getattr(self._raw, "allocated_ranges", None)
        out: list[tuple[int, int]] = []
        for unit_off, at, n in self._pieces(offset, length):
            if ranges is None:
                out.append((offset + at, n))
                continue
            for start, count in ranges(unit_off, n):
                out.append((offset + at + start - unit_off, count))
        return out

    def resize(self, size: int) -> None:
        raise BackendError("a guest view grows with its unit: use 'iscsi-vmtarget vm resize'")

    def close(self) -> None:
        self._raw.close()
        if self._on_close is not None:
            self._on_close()
            self._on_close = None

    # -- capacity changes ----------------------------------------------------------------

    def add_capacity_listener(self, listener: CapacityListener) -> None:
        """Call ``listener(old_size, new_size)`` when a resize changes the disk size
        (the server turns it into a CAPACITY DATA HAS CHANGED unit attention,
        SBC-3 §4.9 / SPC-4 ASC 2Ah ASCQ 09h)."""
        self._listeners.append(listener)

    def update(self, header: UnitHeader) -> None:
        """Take the layout of a committed resize; tell the listeners."""
        if header.unit_uuid != self.unit_uuid or header.state is not UnitState.CLEAN:
            raise BackendError("update() needs the clean header of the same unit")
        old = self._map[0]
        self._map = (header.disk_size, guest_segments(header))
        if header.disk_size != old:
            for listener in self._listeners:
                listener(old, header.disk_size)


class RawView:
    """The whole unit, read-only by default (backup); hidden regions are ciphertext."""

    def __init__(self, raw: BlockBackend, *, writable: bool = False) -> None:
        self._raw = raw
        self._writable = writable

    @property
    def size(self) -> int:
        return self._raw.size

    @property
    def read_only(self) -> bool:
        return not self._writable or self._raw.read_only

    def read_into(self, offset: int, buf: memoryview) -> None:
        self._raw.read_into(offset, buf)

    def read(self, offset: int, length: int) -> bytearray:
        return self._raw.read(offset, length)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self.read_only:
            raise BackendError("raw view is read-only")
        self._raw.write(offset, data)

    def flush(self) -> None:
        self._raw.flush()

    def unmap(self, offset: int, length: int) -> None:
        if not self.read_only:
            self._raw.unmap(offset, length)

    def resize(self, size: int) -> None:
        raise BackendError("a raw view cannot be resized")

    def close(self) -> None:
        self._raw.close()
