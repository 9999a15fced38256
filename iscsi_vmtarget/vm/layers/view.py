"""Views of a unit: what an initiator is shown of it, as block backends.

A :class:`GuestView` is a :class:`~iscsi_vmtarget.storage.BlockBackend` whose size is
the guest's disk and whose offsets are guest offsets: it translates them to unit
offsets per concealment mode (:mod:`..format.layout`) and refuses anything past the disk.
The SCSI device server above it never learns there is more: its READ CAPACITY and
its LOGICAL BLOCK ADDRESS OUT OF RANGE check (SBC-3 §4.5) both derive from
``GuestView.size``, so the bound is defined once, here, and enforced here a second
time for every byte that reaches the raw unit (US 9,354,927: "the virtualization layer
intercepts requests from a guest"). No command of any kind - READ, WRITE, WRITE SAME,
UNMAP, COMPARE AND WRITE, VERIFY, GET LBA STATUS - has another path to the unit.

A :class:`RawView` is the whole unit for a management or backup initiator: hidden
regions are stored encrypted, so it serves them as the ciphertext they are.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

from ...storage import FileBackend
from ...storage.backend import (
    AllocationMap,
    BackendError,
    BlockBackend,
    NowaitCapable,
    RangeFinder,
    Remeasurable,
    check_range,
    is_remote,
)
from ..format.header import Mode, UnitHeader, UnitState

CapacityListener = Callable[[int, int], None]
T = TypeVar("T")
_NOTHING = memoryview(b"")


class SliceBackend:
    """A window ``[offset, offset + length)`` of another backend (a unit carved out of
    a device pool). With ``owns_base``, closing the slice closes the base too."""

    def __init__(
        self, base: BlockBackend, offset: int, length: int, *, owns_base: bool = False
    ) -> None:
        check_range(base.size, offset, length)
        self._base = base
        self.remote_io = is_remote(base)
        self._ranges = base.allocated_ranges if isinstance(base, AllocationMap) else None
        self._owns_base = owns_base
        self.offset = offset
        self._size = length

    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self._base.read_only

    @property
    def nowait_io(self) -> frozenset[str]:
        """An offset shift: nowait I/O (storage/nowait.py) when the base does it."""
        return _nowait_io(self._base)

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
        ranges = self._ranges
        if ranges is None:
            return [(offset, length)]
        return [(o - self.offset, n) for o, n in ranges(self.offset + offset, length)]

    def close(self) -> None:
        if self._owns_base:
            self._base.close()


# One guest segment: (guest offset, length, unit offset).
Segment = tuple[int, int, int]


class _Handle:
    """A unit handle of a guest view and the I/O running on it now.

    A live resize of a file unit replaces the view's handle (a file is measured once,
    so the grown file is opened again). The old one may still serve I/O that read the
    old mapping: it is closed when the last of those ends, never under one (its
    descriptor number could by then belong to another file) and never later (one
    descriptor kept per resize for the daemon's lifetime).
    """

    __slots__ = ("raw", "read_only", "retired", "users")

    def __init__(self, raw: BlockBackend) -> None:
        self.raw = raw
        #: the handle's own read-only flag, fixed when it was opened (looked up once,
        #: not on every write)
        self.read_only = raw.read_only
        self.users = 0
        self.retired = False


# What a guest view maps through: (disk size, segments, unit handle).
_Map = tuple[int, tuple[Segment, ...], _Handle]


def guest_segments(header: UnitHeader) -> tuple[Segment, ...]:
    out = []
    guest = 0
    for region in header.guest_segments:
        out.append((guest, region.length, region.offset))
        guest += region.length
    return tuple(out)


class Gate:
    """Lets guest I/O run concurrently, and lets a live resize wait for it to drain and
    hold it off while a guest segment is copied to its new place (a reader-writer
    lock where the I/O paths are the readers).

    The I/O side is on every guest read and write, so the hot paths count themselves
    in and out inline, under :attr:`lock`: ``if gate.open: gate.active += 1`` else
    :meth:`admit` (which waits or refuses), and on the way out ``gate.active -= 1``
    then :meth:`wake` if the count reached zero while the gate is not open (issue 18:
    no method call, no f-string, no context-manager object per I/O). ``io()`` is
    the same as a context manager, for the paths that are not hot.
    """

    def __init__(self) -> None:
        #: held by :meth:`admit`/:meth:`release` callers (a view counts its handle
        #: under the same lock)
        self.lock = threading.Lock()
        self._cond = threading.Condition(self.lock)
        #: I/O runs now (no :meth:`exclusive` holds the gate, it is not shut);
        #: changed only under :attr:`lock`
        self.open = True
        #: I/O counted in (under :attr:`lock`)
        self.active = 0
        self._closed = False
        self._shut = False
        self._io = _GateIo(self)

    def io(self) -> _GateIo:
        return self._io

    def admit(self, what: str | Callable[[], str] = "the backend") -> None:
        """Count one I/O in, once no :meth:`exclusive` holds the gate; BackendError
        (naming ``what``, or what it returns) once :meth:`shut`. Call with
        :attr:`lock` held."""
        while self._closed:
            self._cond.wait()
        if self._shut:
            raise BackendError(f"{what if isinstance(what, str) else what()} is closed")
        self.active += 1

    def release(self) -> None:
        """Count one I/O out (call with :attr:`lock` held)."""
        self.active -= 1
        if not self.active and not self.open:
            self.wake()

    def wake(self) -> None:
        """The count reached zero while the gate is not open: wake whoever waits for
        that (an :meth:`exclusive` or a :meth:`shut`). Call with :attr:`lock` held."""
        self._cond.notify_all()

    def shut(self) -> None:
        """Refuse I/O from now on and wait for the I/O running (a backend closing: no
        I/O may use a descriptor after its close, when the number may name another
        file). Never waits for an :meth:`exclusive` holder: inside one no I/O runs."""
        with self._cond:
            self._shut = True
            self.open = False
            while self.active:
                self._cond.wait()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._closed:
                self._cond.wait()
            self._closed = True
            self.open = False
            while self.active:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._closed = False
                self.open = not self._shut
                self._cond.notify_all()


class _GateIo:
    """The shared (reader) side of a :class:`Gate`; one object serves every use, as
    it keeps no per-use state, only the gate's count."""

    __slots__ = ("_gate",)

    def __init__(self, gate: Gate) -> None:
        self._gate = gate

    def __enter__(self) -> None:
        gate = self._gate
        with gate.lock:
            gate.admit()

    def __exit__(self, *exc: object) -> None:
        gate = self._gate
        with gate.lock:
            gate.release()


class GuestView:
    """The guest's disk of one unit: size = disk size, offsets translated per mode.

    Every I/O takes the current mapping and counts itself on its handle under one
    short lock (:meth:`_transfer`), so a handle a live resize replaced is
    closed as soon as no I/O uses it. Only ``aligned`` views have a guest segment that
    a resize may move (GUEST_HEAD), so only they can be held off (:meth:`quiesce`); in
    the other modes the disk region never moves and I/O never waits.
    """

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
        self._read_only = read_only
        #: called once when the view is closed (a served disk's serve lock and lease);
        #: a chain built over a served view takes it over (:meth:`~.cow.ChainBackend.over`)
        self.on_close = on_close
        self._listeners: list[CapacityListener] = []
        self.unit_uuid = header.unit_uuid
        # size, segments and handle in one attribute, swapped under the lock
        self._map: _Map = (header.disk_size, guest_segments(header), _Handle(raw))
        #: the disk size (``_map[0]``, as a plain attribute: the fast lane reads it
        #: on every command)
        self.size = header.disk_size
        # counts every I/O (over every handle); only quiesce() of an aligned view closes it
        self._gate = Gate()
        self._lock = self._gate.lock
        self._movable = header.mode is Mode.ALIGNED

    # -- BlockBackend ------------------------------------------------------------------

    @property
    def read_only(self) -> bool:
        return self._read_only or self._map[2].read_only

    @property
    def _raw(self) -> BlockBackend:
        return self._map[2].raw

    @property
    def remote_io(self) -> bool:
        """I/O is a network round trip (a unit on an rbd pool; a live move may change it)."""
        return is_remote(self._map[2].raw)

    @property
    def nowait_io(self) -> frozenset[str]:
        """Translation is a pure offset mapping (a request cut off between segments
        is redone whole), so nowait I/O (storage/nowait.py) when the unit handle does
        it; a handle a resize opens again is of the same kind."""
        return _nowait_io(self._raw)

    def _what(self) -> str:
        return f"the view of unit {self.unit_uuid}"

    def _pieces(self, offset: int, length: int, mapping: _Map) -> Iterator[tuple[int, int, int]]:
        """(unit offset, position in the request, byte count) covering the request.

        The concealment bound: nothing outside ``[0, size)`` is ever translated.
        """
        size, segments, _raw = mapping
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

    def _transfer(self, offset: int, buf: memoryview, op: Callable[[_Map], T] | bool) -> T | None:
        """Run one I/O on the current mapping, counted in the gate and on its handle
        under one short lock, then counted out (so a handle a live resize replaced is
        closed as soon as no I/O uses it); the one place that takes a mapping.

        ``op`` True or False: write or read ``buf`` at guest ``offset`` (issue 18: the
        hot path of every guest WRITE and READ, in this one call). The concealment
        bound first: nothing outside ``[0, size)`` of the mapping taken is translated
        (a ValueError, as :func:`check_range` gives). A request inside one segment
        (the common case: one compare and one add, the patent's "compare operation"
        on the I/O path) is one call on the unit handle; one spanning segments is cut
        at their ends. Any other ``op``: ``op(mapping)``, its result returned."""
        gate = self._gate
        with gate.lock:
            if gate.open:
                gate.active += 1
            else:
                gate.admit(self._what)
            mapping = self._map
            size, segments, handle = mapping
            handle.users += 1
        try:
            if op is not True and op is not False:
                return op(mapping)
            writing = op
            length = len(buf)
            if offset < 0 or offset + length > size:
                check_range(size, offset, length)
            raw = handle.raw
            if writing and (self._read_only or handle.read_only):
                raise BackendError("guest view is read-only")
            io = raw.write if writing else raw.read_into
            for start, seg_len, unit_off in segments:
                if start <= offset and offset + length <= start + seg_len:
                    io(unit_off + offset - start, buf)
                    return None
            for unit_off, pos, n in self._pieces(offset, length, mapping):
                io(unit_off, buf[pos : pos + n])
            return None
        finally:
            with gate.lock:
                handle.users -= 1
                gate.active -= 1
                if not gate.active and not gate.open:
                    gate.wake()
                last = handle.retired and not handle.users
            if last:
                handle.raw.close()

    def read_into(self, offset: int, buf: memoryview) -> None:
        self._transfer(offset, buf, False)

    def read(self, offset: int, length: int) -> bytearray:
        out = bytearray(length)
        self._transfer(offset, memoryview(out), False)
        return out

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._transfer(offset, memoryview(data).cast("B"), True)

    def _mapped(self, op: Callable[[_Map], T]) -> T:
        """``op(mapping)`` on the current mapping, as an I/O (:meth:`_transfer`)."""
        return self._transfer(0, _NOTHING, op)  # type: ignore[return-value]

    def flush(self) -> None:
        """Flushes through the current handle: a handle a resize replaced is on the
        same unit (the same file, window or image), so its writes are covered."""
        self._mapped(_flush_handle)

    def unmap(self, offset: int, length: int) -> None:
        if self.read_only:
            return

        def unmap(mapping: _Map) -> None:
            for unit_off, _at, n in self._pieces(offset, length, mapping):
                mapping[2].raw.unmap(unit_off, n)

        self._mapped(unmap)

    def allocated_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Mapped extents (guest offsets) for GET LBA STATUS, clipped to the disk."""

        def extents(mapping: _Map) -> list[tuple[int, int]]:
            out: list[tuple[int, int]] = []
            ranges = _ranges_of(mapping[2].raw)
            for unit_off, at, n in self._pieces(offset, length, mapping):
                if ranges is None:
                    out.append((offset + at, n))
                    continue
                for start, count in ranges(unit_off, n):
                    out.append((offset + at + start - unit_off, count))
            return out

        return self._mapped(extents)

    def resize(self, size: int) -> None:
        raise BackendError("a guest view grows with its unit: use 'iscsi-vmtarget vm resize'")

    def close(self) -> None:
        """Refuse further I/O, let the running I/O end, close the unit handle."""
        self._gate.shut()
        self._retire(self._map[2])
        if self.on_close is not None:
            self.on_close()
            self.on_close = None

    # -- capacity changes ----------------------------------------------------------------

    def add_capacity_listener(self, listener: CapacityListener) -> None:
        """Call ``listener(old_size, new_size)`` when a resize changes the disk size
        (the server turns it into a CAPACITY DATA HAS CHANGED unit attention,
        SBC-3 §4.9 / SPC-4 ASC 2Ah ASCQ 09h)."""
        self._listeners.append(listener)

    @property
    def capacity_listeners(self) -> tuple[CapacityListener, ...]:
        return tuple(self._listeners)

    @contextlib.contextmanager
    def quiesce(self) -> Iterator[None]:
        """Hold guest I/O off (after letting what runs finish) while a live resize moves
        a guest segment; a no-op for views whose segments never move."""
        if not self._movable:
            yield
            return
        with self._gate.exclusive():
            yield

    def update(self, header: UnitHeader) -> None:
        """Take the layout of a committed resize; tell the listeners. A replaced
        handle is closed when no I/O uses it any more."""
        if header.unit_uuid != self.unit_uuid or header.state is not UnitState.CLEAN:
            raise BackendError("update() needs the clean header of the same unit")
        old_size, _segments, handle = self._map
        grown = _follow(handle.raw, header.unit_size)
        with self._lock:
            if grown is not handle.raw:
                self._map = (header.disk_size, guest_segments(header), _Handle(grown))
            else:
                self._map = (header.disk_size, guest_segments(header), handle)
            self.size = header.disk_size
        if grown is not handle.raw:
            self._retire(handle)
        if header.disk_size != old_size:
            for listener in self._listeners:
                listener(old_size, header.disk_size)

    def _retire(self, handle: _Handle) -> None:
        """No new I/O takes ``handle``: close it now, or at its last I/O's end."""
        with self._lock:
            handle.retired = True
            idle = not handle.users
        if idle:
            handle.raw.close()


def _flush_handle(mapping: _Map) -> None:
    mapping[2].raw.flush()


def _nowait_io(raw: BlockBackend) -> frozenset[str]:
    return raw.nowait_io if isinstance(raw, NowaitCapable) else frozenset()


def _ranges_of(raw: BlockBackend) -> RangeFinder | None:
    """A unit handle's allocation map, if it has one (:class:`AllocationMap`)."""
    return raw.allocated_ranges if isinstance(raw, AllocationMap) else None


def _follow(raw: BlockBackend, size: int) -> BlockBackend:
    """A handle on a unit that another handle grew to ``size`` bytes: a device-pool
    window is widened, a file is opened again (a FileBackend measures once), an RBD
    image measured again (:class:`Remeasurable`)."""
    if raw.size >= size:
        return raw
    if isinstance(raw, SliceBackend):
        raw.set_length(size)
        return raw
    if isinstance(raw, FileBackend):
        again = FileBackend(raw.path, read_only=raw.read_only)
        if again.size >= size:
            return again
        again.close()
    if isinstance(raw, Remeasurable) and raw.remeasure() >= size:
        return raw
    raise BackendError(f"the unit behind this view is not {size} bytes long")


class RawView:
    """The whole unit, read-only by default (backup); hidden regions are ciphertext."""

    def __init__(self, raw: BlockBackend, *, writable: bool = False) -> None:
        self._raw = raw
        self._writable = writable
        self.remote_io = is_remote(raw)

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
