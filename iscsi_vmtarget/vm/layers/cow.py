"""Copy-on-write layers: grain-based deltas with an allocation map, and chains of them.

The snapshots of US 9,354,927 are taken "at the storage layer" by the array itself (in its
words: "snapshot, clone and move operations ... performed by the storage array"); a snapshot
"may contain all of the data or only the differences relative to a predecessor". Our
array keeps each volume (a base or secondary unit's guest disk) as a chain of layers:

* the root: the volume's own unit, read through its :class:`~.view.GuestView` (so the
  concealment mode is applied exactly as for the guest);
* delta units (role DELTA, :mod:`..format.header` version 2): an ALLOCMAP region, one bit per
  64 KiB grain, and a DISK region as long as the guest disk where a grain held by the
  layer sits at its own guest offset (a sparse file: holes cost nothing).

A read walks the chain newest first and takes each grain from the first layer whose
map has it. A write goes to the top layer; a write that covers only part of a grain
the top does not hold yet first copies the grain's current bytes up the chain
(copy-on-write), so the grain is whole in the top. Creating a snapshot therefore costs
a new empty delta per volume and a header commit, never a copy of the data.

Crash safety: map bits only ever turn on, and the map is written only by
:meth:`DeltaLayer.flush` after the grain data it describes has been flushed, so after a
crash a bit never names a grain whose bytes were not stable. A write not yet flushed may
be lost (as on any disk without FUA), an acknowledged flushed one never.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Protocol

from ...storage.backend import (
    AllocationMap,
    BackendError,
    BlockBackend,
    CapacityNotifier,
    check_range,
    is_remote,
)
from ..format.header import (
    ALIGN,
    TAIL_SIZE,
    Mode,
    Region,
    RegionKind,
    Role,
    UnitHeader,
    encode_header,
)
from ..format.header import SLOT_OFFSETS as _SLOTS
from ..format.layout import align_up
from ..units.unit_pools import Pool, UnitRef
from .view import Gate, GuestView

GRAIN = 64 * 1024
_UNKNOWN = 0xFF  # owner cache: not looked up yet
_ROOT = 0xFE  # owner cache: no layer holds the grain (read the volume's unit)


_ZERO_GRAIN = bytes(GRAIN)


def grains_of(size: int) -> int:
    return -(-size // GRAIN)


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    """Whether ``data`` is all zeros: one memcmp per grain against a zero grain, no
    copy (``not any(data)`` loops per byte, ~600 us a zero grain; this, ~1 us)."""
    view = memoryview(data).cast("B")
    return all(
        _ZERO_GRAIN.startswith(view[start : start + GRAIN]) for start in range(0, len(view), GRAIN)
    )


def delta_header(
    *,
    unit_uuid: uuid.UUID,
    naa: bytes,
    name: str,
    owner: uuid.UUID,
    volume_naa: bytes,
    parent: uuid.UUID,
    disk_size: int,
    created: int,
) -> UnitHeader:
    """The header of a new, empty delta layer of the volume ``volume_naa``, whose image
    is ``disk_size`` bytes (recorded in the DISK region's ``used`` field)."""
    map_len = align_up(-(-grains_of(disk_size) // 8) or 1, ALIGN)
    disk_len = align_up(disk_size, ALIGN)
    regions = (
        Region(RegionKind.ALLOCMAP, 0, map_len),
        Region(RegionKind.DISK, map_len, disk_len, used=disk_size),
        Region(RegionKind.META, map_len + disk_len, TAIL_SIZE),
    )
    return UnitHeader(
        unit_uuid=unit_uuid,
        naa=naa,
        role=Role.DELTA,
        mode=Mode.TRUNCATE,
        unit_size=map_len + disk_len + TAIL_SIZE,
        regions=regions,
        name=name,
        owner_uuid=owner,
        created=created,
        secondaries=(volume_naa,),
        parent_uuid=parent,
        generation=1,
    )


def create_delta(pool: Pool, header: UnitHeader) -> UnitRef:
    """Allocate a delta unit with ``header`` (all map bits clear); atomic (temp + rename)."""
    ref, backend = pool.allocate(header.unit_uuid, header.unit_size)
    try:
        backend.write(header.meta_offset + _SLOTS[0], encode_header(header))
        backend.flush()
        final = pool.commit(ref, backend)
    except BaseException:
        pool.abandon(ref, backend)
        raise
    backend.close()
    return final


def layer_size(header: UnitHeader, fallback: int) -> int:
    """The size of a delta's image: recorded in its DISK region's ``used`` field. Deltas
    written before a disk with snapshots could grow record 0: they have the size of the
    unit their chain ends at, ``fallback``, which never grows under them (a unit grows
    only when its one remaining child is larger, and sizes never shrink up a chain)."""
    return header.require_region(RegionKind.DISK).used or fallback


class DeltaLayer:
    """One open delta unit: its allocation map in memory, its grains in the file.

    A layer's image has the size of the volume when the layer was made (a snapshot of
    a disk grown since keeps its own size): ``size`` is only the fallback for layers
    that do not record theirs (:func:`layer_size`). A grain past a layer's size is
    one it never holds; what a grown chain reads there comes from the layers above,
    else from the volume's unit, whose bytes past any layer's size are zeros (a grown
    unit's new space is scrubbed, and nothing writes a unit while smaller layers rest
    on it)."""

    def __init__(self, backend: BlockBackend, header: UnitHeader, size: int) -> None:
        self.backend = backend
        self.header = header
        self.unit_uuid = header.unit_uuid
        self.size = size = layer_size(header, size)
        amap = header.require_region(RegionKind.ALLOCMAP)
        self._map_off = amap.offset
        #: where the image starts in the unit (the chain's hot paths add it themselves)
        self.disk_offset = header.require_region(RegionKind.DISK).offset
        nbytes = -(-grains_of(size) // 8)
        self.bits = bytearray(backend.read(self._map_off, nbytes)) if nbytes else bytearray()
        self._dirty: set[int] = set()  # map bytes changed since the last flush

    def has(self, grain: int) -> bool:
        byte = grain >> 3
        return byte < len(self.bits) and bool(self.bits[byte] & (1 << (grain & 7)))

    def mark(self, grain: int) -> None:
        byte = grain >> 3
        self.bits[byte] |= 1 << (grain & 7)
        self._dirty.add(byte)

    def allocated(self) -> list[int]:
        return [g for g in range(grains_of(self.size)) if self.has(g)]

    def held(self) -> int:
        """Bytes of its image the layer holds itself (its size when it holds every
        grain: a full snapshot's layer, :mod:`..operations.snapshot_fill`)."""
        count = int.from_bytes(self.bits, "little").bit_count()
        last = grains_of(self.size) - 1
        short = (last + 1) * GRAIN - self.size  # the last grain may end early
        return count * GRAIN - (short if last >= 0 and self.has(last) else 0)

    def read_into(self, offset: int, buf: memoryview) -> None:
        self.backend.read_into(self.disk_offset + offset, buf)

    def write(self, offset: int, data: memoryview | bytes | bytearray) -> None:
        self.backend.write(self.disk_offset + offset, data)

    def punch(self, offset: int, length: int) -> None:
        self.backend.unmap(self.disk_offset + offset, length)

    def flush(self) -> None:
        """Grain data first, then the map bytes that name it (module docstring)."""
        self.backend.flush()
        if self._dirty:
            dirty, self._dirty = sorted(self._dirty), set()
            while dirty:  # write runs of 512-byte map sectors
                first = dirty[0] & ~511
                last = first + 512
                while dirty and dirty[0] < last:
                    dirty.pop(0)
                end = min(last, len(self.bits))
                self.backend.write(self._map_off + first, self.bits[first:end])
            self.backend.flush()

    def close(self) -> None:
        self.backend.close()


class LiveVolume(Protocol):
    """A volume a server in this process serves, as the live operations get it
    (``live`` of :mod:`..operations.snapshot`, ``.move``, ``.clone``). A volume without
    layers is served as its plain :class:`~.view.GuestView` (no chain to pay for on
    every I/O); :meth:`chain` gives its disk as a chain, turning it into one first if
    need be - with the guest's commands drained, so the guest notices nothing - for an
    operation that pushes a layer, rebinds a root or tracks writes. A
    :class:`ChainBackend` is one itself."""

    def chain(self) -> ChainBackend: ...


class ChainBackend:
    """A volume seen through its layer chain: a BlockBackend of the guest disk size.

    ``layers`` newest first; ``root`` the volume's own guest view. With no layers the
    chain is the root itself (reads and writes go straight through): a served volume
    becomes one (:meth:`over`) when a live operation needs it, so a daemon can
    snapshot, revert or move it in place (:meth:`quiesce` drains in-flight I/O and
    holds new I/O, :meth:`rebind` swaps the layers). A snapshot is read through a
    read-only chain starting at its frozen layer.

    The range check: with no layers the chain passes every request to its root, a
    :class:`~.view.GuestView` that owns the bound (the concealment check), and checks
    nothing itself; with layers it resolves offsets to delta units itself, so it
    checks each request once against its size (past a delta's DISK region lies its
    header), whoever calls: a SCSI command (already checked, with sense data, by
    ``check_lba_range``) or a management copy, a snapshot export, a replication.
    """

    def __init__(
        self,
        layers: list[DeltaLayer],
        root: BlockBackend,
        *,
        read_only: bool = False,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.layers = layers
        self.root = root
        self._read_only = read_only
        #: called once when the chain is closed (a served disk's serve lock and lease)
        self.on_close = on_close
        self._lock = threading.Lock()  # copy-on-write of one grain is read-modify-write
        self._gate = Gate()
        self._owner: bytearray | None = None  # grain -> layer index cache (_owner_of)
        self._listeners: list[Callable[[int, int], None]] = []
        self.unit_uuid = getattr(root, "unit_uuid", None)
        self._root_ranges = _ranges_of(root)
        #: called as ``hook(offset, length)`` after every write or unmap, inside the
        #: I/O gate (so a :meth:`quiesce` waits for it): a live move's dirty tracking
        self.write_hook: Callable[[int, int], None] | None = None

    # -- BlockBackend ----------------------------------------------------------------------

    @property
    def size(self) -> int:
        """The top layer's size (the volume's unit may be larger: reverted to a
        snapshot taken before the disk grew), or the unit's with no layers."""
        return self.layers[0].size if self.layers else self.root.size

    @property
    def read_only(self) -> bool:
        return self._read_only or (not self.layers and self.root.read_only)

    @property
    def remote_io(self) -> bool:
        """Some layer (or the root) is a network round trip away (an rbd pool)."""
        return is_remote(self.root) or any(is_remote(layer.backend) for layer in self.layers)

    def _source(self, grain: int, start: int = 0) -> DeltaLayer | None:
        for layer in self.layers[start:]:
            if layer.has(grain):
                return layer
        return None

    def _owner_of(self, grain: int) -> int:
        """Index of the newest layer holding ``grain`` (ROOT: none), cached per grain
        (1 byte each) so a read through a long chain looks each grain up once."""
        owner = self._owner
        if owner is None:
            if len(self.layers) >= _ROOT:  # too long for one byte: no cache
                source = self._source(grain)
                return -1 if source is None else self.layers.index(source)
            owner = self._owner = bytearray(b"\xff") * grains_of(self.size)
        value = owner[grain]
        if value == _UNKNOWN:
            # under the copy-on-write lock: a write marking the grain in the top between
            # this scan and the store would otherwise be undone by a stale owner
            with self._lock:
                value = _ROOT
                byte, bit = grain >> 3, 1 << (grain & 7)
                for index, layer in enumerate(self.layers):
                    bits = layer.bits
                    if byte < len(bits) and bits[byte] & bit:  # a smaller layer lacks it
                        value = index
                        break
                owner[grain] = value
        return -1 if value == _ROOT else value

    def _read_from(self, offset: int, buf: memoryview, start: int) -> None:
        """Read ``buf`` at ``offset`` from the chain below ``layers[start]`` inclusive,
        merging runs of grains that come from the same layer into one read."""
        length = len(buf)
        layers = self.layers
        if start >= len(layers):
            self._read_root(offset, buf)
            return
        if start:  # copy-up of one grain: look it up past the top
            grain = offset // GRAIN
            source = self._source(grain, start)
            if source is None:
                self._read_root(offset, buf)
            else:
                source.read_into(offset, buf)
            return
        owner_of = self._owner_of
        pos = 0
        while pos < length:
            at = offset + pos
            grain = at // GRAIN
            owner = owner_of(grain)
            end = min(length, (grain + 1) * GRAIN - offset)
            while end < length:  # extend the run while the next grain has the same owner
                nxt = (offset + end) // GRAIN
                if owner_of(nxt) != owner:
                    break
                end = min(length, (nxt + 1) * GRAIN - offset)
            piece = buf[pos:end]
            if owner < 0:
                self._read_root(at, piece)
            else:
                layers[owner].read_into(at, piece)
            pos = end

    def _read_root(self, offset: int, buf: memoryview) -> None:
        """Read from the volume's unit; zeros past its end (a linked clone's chain ends
        at its source's unit, which may be smaller than the clone's grown disk)."""
        size = self.root.size
        if offset + len(buf) <= size:
            self.root.read_into(offset, buf)
            return
        inside = max(0, size - offset)
        if inside:
            self.root.read_into(offset, buf[:inside])
        buf[inside:] = bytes(len(buf) - inside)

    def read_into(self, offset: int, buf: memoryview) -> None:
        self._io(offset, buf, False, self._gate)

    def read_quiesced(self, offset: int, buf: memoryview) -> None:
        """:meth:`read_into` without the gate: for a caller inside :meth:`quiesce`."""
        self._io(offset, buf, False, None)

    def read(self, offset: int, length: int) -> bytearray:
        out = bytearray(length)
        self.read_into(offset, memoryview(out))
        return out

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self._read_only:
            raise BackendError("this snapshot is read-only")
        self._io(offset, memoryview(data).cast("B"), True, self._gate)

    def _io(self, offset: int, buf: memoryview, writing: bool, gate: Gate | None) -> None:
        """A read into ``buf`` or a write of it at ``offset``, counted in ``gate``
        (None: the caller holds :meth:`quiesce`). The hot path of every guest READ
        and WRITE in one call (issue 18): the gate's ``io()`` inline, and a request
        within one grain served at once - a read from the layer the owner cache
        names, a write into a grain the top holds already (no copy-up, no map bit to
        set: no copy-on-write lock; a grain's bit is set only after its copy-up is
        written, so a writer that sees it never races one)."""
        if gate is not None:
            with gate.lock:
                if gate.open:
                    gate.active += 1
                else:
                    gate.admit()
        try:
            layers = self.layers
            length = len(buf)
            if not layers:  # the root owns the bound (class docstring)
                if not writing:
                    self.root.read_into(offset, buf)
                    return
                if self.root.read_only:
                    raise BackendError("this snapshot is read-only")
                self.root.write(offset, buf)
            else:
                top = layers[0]
                if offset < 0 or offset + length > top.size:
                    check_range(top.size, offset, length)
                grain = offset // GRAIN
                if not length or (offset + length - 1) // GRAIN != grain:  # several grains
                    if not writing:
                        self._read_from(offset, buf, 0)
                        return
                    self._write(offset, buf)
                elif not writing:
                    owners = self._owner
                    owner = _UNKNOWN if owners is None else owners[grain]
                    if owner == _UNKNOWN:  # not looked up yet (or no cache: a long chain)
                        owner = self._owner_of(grain)  # an index, -1 for the root
                    elif owner == _ROOT:
                        owner = -1
                    if owner < 0:
                        self._read_root(offset, buf)
                    else:  # the layer's read_into, inline
                        layer = layers[owner]
                        layer.backend.read_into(layer.disk_offset + offset, buf)
                    return
                elif (grain >> 3) < len(bits := top.bits) and bits[grain >> 3] & (1 << (grain & 7)):
                    # the top's has(), inline
                    top.backend.write(top.disk_offset + offset, buf)
                else:
                    self._write(offset, buf)
            hook = self.write_hook
            if hook is not None:  # after the write: a copy reading later sees it
                hook(offset, length)
        finally:
            if gate is not None:
                with gate.lock:
                    gate.active -= 1
                    if not gate.active and not gate.open:
                        gate.wake()

    def _write(self, offset: int, view: memoryview) -> None:
        if not self.layers:
            self.root.write(offset, view)
            return
        top = self.layers[0]
        size = self.size
        pos = 0
        with self._lock:
            while pos < len(view):
                at = offset + pos
                grain = at // GRAIN
                g_start = grain * GRAIN
                g_end = min(g_start + GRAIN, size)
                n = min(len(view) - pos, g_end - at)
                if top.has(grain) or (at == g_start and n == g_end - g_start):
                    top.write(at, view[pos : pos + n])
                else:  # partial write of a grain the top lacks: copy it up first
                    whole = bytearray(g_end - g_start)
                    self._read_from(g_start, memoryview(whole), 1)
                    whole[at - g_start : at - g_start + n] = view[pos : pos + n]
                    top.write(g_start, whole)
                top.mark(grain)
                if self._owner is not None:
                    self._owner[grain] = 0
                pos += n

    def unmap(self, offset: int, length: int) -> None:
        """Unmapped blocks read as zeros: whole grains become holes in the top, the
        rest is written as zeros."""
        if self.read_only:
            return
        with self._gate.io():
            if self.layers:  # else the root owns the bound (class docstring)
                check_range(self.size, offset, length)
            self._unmap(offset, length)
            hook = self.write_hook
            if hook is not None:
                hook(offset, length)

    def _unmap(self, offset: int, length: int) -> None:
        if not self.layers:
            self.root.unmap(offset, length)
            return
        top = self.layers[0]
        end = offset + length
        at = offset
        while at < end:
            grain = at // GRAIN
            g_start = grain * GRAIN
            g_end = min(g_start + GRAIN, self.size)
            n = min(end, g_end) - at
            if at == g_start and n == g_end - g_start:
                with self._lock:
                    top.punch(at, n)
                    top.mark(grain)
                    if self._owner is not None:
                        self._owner[grain] = 0
            else:
                self._write(at, memoryview(bytes(n)))
            at += n

    def allocated_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        """GET LBA STATUS: the root's map without layers; with layers, all mapped."""
        ranges = self._root_ranges
        if not self.layers and ranges is not None:
            with self._gate.io():
                result: list[tuple[int, int]] = ranges(offset, length)
                return result
        return [(offset, length)]

    def flush(self) -> None:
        with self._gate.io():
            self.flush_quiesced()

    def resize(self, size: int) -> None:
        raise BackendError("a VM with snapshots cannot be resized (delete its snapshots)")

    def close(self) -> None:
        """Refuse further I/O, let the running I/O end (a target removed under its
        sessions), then close the layers and the root."""
        self._gate.shut()
        for layer in self.layers:
            layer.close()
        self.layers = []
        self.root.close()
        if self.on_close is not None:
            self.on_close()
            self.on_close = None

    # -- live snapshot support --------------------------------------------------------------

    @classmethod
    def over(cls, view: GuestView) -> ChainBackend:
        """A chain with no layers to take the place of ``view``, a volume served as its
        plain guest view until now: it takes over the view's close callback (closing
        the chain closes the view, then runs it) and its capacity listeners (handed
        on to a root a :meth:`rebind` brings; the view keeps them registered, so a
        resize of the root notifies each once)."""
        chain = cls([], view, on_close=view.on_close)
        view.on_close = None
        chain._listeners = list(view.capacity_listeners)
        return chain

    def release_root(self) -> GuestView | None:
        """The inverse of :meth:`over`: the root, with the close callback, to be served
        on its own again (it has every capacity listener: :meth:`over` and
        :meth:`rebind` saw to that). None, the chain unchanged, while the chain has
        layers, a write hook, or a root that is not a writable guest view. The chain
        must not be used once it gave its root away."""
        root = self.root
        if self.layers or self.write_hook is not None or self._read_only:
            return None
        if not isinstance(root, GuestView) or root.read_only:
            return None
        root.on_close, self.on_close = self.on_close, None
        return root

    def chain(self) -> ChainBackend:
        """A chain is its own :class:`LiveVolume`."""
        return self

    def add_capacity_listener(self, listener: Callable[[int, int], None]) -> None:
        self._listeners.append(listener)  # handed on to a root :meth:`rebind` brings
        if isinstance(self.root, CapacityNotifier):
            self.root.add_capacity_listener(listener)

    @contextlib.contextmanager
    def quiesce(self) -> Iterator[None]:
        """Let in-flight I/O finish and hold new I/O until the block ends."""
        with self._gate.exclusive():
            yield

    def flush_quiesced(self) -> None:
        """:meth:`flush` for a caller inside :meth:`quiesce` (which holds the gate)."""
        if self.layers and not self.read_only:
            with self._lock:
                self.layers[0].flush()
        self.root.flush()

    def rebind(self, layers: list[DeltaLayer], root: BlockBackend | None = None) -> None:
        """Take a new layer list, and a new root if given (call under :meth:`quiesce`,
        after :meth:`flush`): layers of the old list that the new one does not keep,
        and a replaced root, are closed. A live move binds the same volume's copies
        in another pool this way."""
        keep = {id(layer) for layer in layers}
        before = self.size
        for old in self.layers:
            if id(old) not in keep:
                old.close()
        self.layers = layers
        if root is not None and root is not self.root:
            self.root.close()
            self.root = root
            self._root_ranges = _ranges_of(root)
            if isinstance(root, CapacityNotifier):
                for listener in self._listeners:
                    root.add_capacity_listener(listener)
        self._owner = None
        if self.size != before:  # a revert to a smaller snapshot, a grown top
            for listener in self._listeners:
                listener(before, self.size)


def _ranges_of(root: BlockBackend) -> Callable[[int, int], list[tuple[int, int]]] | None:
    """The root's allocation map (:class:`AllocationMap`), looked up once per root."""
    return root.allocated_ranges if isinstance(root, AllocationMap) else None
