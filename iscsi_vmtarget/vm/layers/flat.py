"""Raw views of a unit whose disk is a copy-on-write chain: the unit as it would be
if the chain were flattened (merged into the unit) now, or at a snapshot.

A management host granted ``view = "raw"`` backs a VM up by reading the whole unit
(US 9,354,927: the raw view serves the non-disk data as the ciphertext it is). Once the VM has
snapshots the guest's writes go to delta layers (:mod:`.cow`), so the unit's own disk
region is only the oldest image. A :class:`FlatView` composes, per request and without
copying any region:

* every byte outside the guest disk as the unit holds it (header, GPT, region table,
  the sealed state, config and snapshot-metadata regions: ciphertext, never decrypted);
* the disk region's bytes read through the chain - the very object the guest LU
  writes, which live snapshot, revert, delete and move rebind in place - at the unit
  offsets the concealment mode gives them (:func:`~.view.guest_segments`: ``aligned``
  serves the guest's first MiB from GUEST_HEAD, so that is where the flattened guest
  partition table is).

A chain larger than the unit's disk (``vm resize`` of a disk with snapshots grows a new
top, not the unit: :mod:`..operations.snapshot_resize`) is served in the layout the unit takes when
it grows to that size (:func:`~..format.layout.plan_growth`, what a merge into the unit does):
the regions in the way sit at their new offsets, carried whole, and the header (the
live one, re-read on every read of the tail, with the new region table) and GPT are
those of the grown unit.

A snapshot's raw view (:func:`snapshot_flat`) is the unit flattened at the snapshot: a
fresh layout of the unit's mode for the snapshot's disk size, the disk through the
snapshot's read-only chain, the sealed regions as the snapshot record holds them, and a
header naming the record's UUID and wrapped data key - the ones its ciphertext is bound
to (:class:`~..format.crypto.RegionCipher`) - so a backup of it is a self-consistent unit.
"""

from __future__ import annotations

import threading
import uuid
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import replace
from typing import Protocol

from ...storage.backend import BackendError, BlockBackend, check_range
from ..format.gpt import write_gpt
from ..format.header import (
    ALIGN,
    SLOT_OFFSETS,
    SLOT_SIZE,
    TAIL_SIZE,
    Mode,
    Region,
    UnitHeader,
    UnitState,
    encode_header,
    scan_slots,
)
from ..format.layout import align_up, initial_regions, plan_growth
from ..units.unit_pools import Pool, UnitRef
from .view import RawView, guest_segments


class _Source(Protocol):
    """Where a piece of the flattened unit comes from: offsets are the source's."""

    def read_into(self, offset: int, buf: memoryview) -> None: ...


class DiskSource(Protocol):
    """What a raw view reads the guest disk through: a chain (a snapshot's), or
    whatever the guest LUN serves now (a server's live disk: a plain guest view while
    the volume has no layers, a chain once a live snapshot gave it one)."""

    @property
    def size(self) -> int: ...

    def read_into(self, offset: int, buf: memoryview) -> None: ...


class _Zeros:
    @staticmethod
    def read_into(offset: int, buf: memoryview) -> None:
        buf[:] = bytes(len(buf))


class _Bytes:
    """Bytes of our own (a GPT, a header image) at offset 0 of the source."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def read_into(self, offset: int, buf: memoryview) -> None:
        buf[:] = self.data[offset : offset + len(buf)]


ZEROS = _Zeros()
# (unit offset, length, source, offset in the source)
Piece = tuple[int, int, _Source, int]


class _Canvas:
    """Non-overlapping pieces covering ``[0, size)``; a later paint wins."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.pieces: list[Piece] = [(0, size, ZEROS, 0)]

    def paint(self, start: int, length: int, source: _Source, at: int = 0) -> None:
        end = min(start + length, self.size)
        if end <= start:
            return
        out: list[Piece] = []
        for s, n, src, o in self.pieces:
            e = s + n
            if e <= start or s >= end:
                out.append((s, n, src, o))
                continue
            if s < start:
                out.append((s, start - s, src, o))
            if e > end:
                out.append((end, e - end, src, o + end - s))
        out.append((start, end - start, source, at))
        out.sort(key=lambda p: p[0])
        self.pieces = out

    def paint_disk(self, header: UnitHeader, disk: DiskSource, size: int) -> None:
        """The guest disk's ``size`` bytes (read through ``disk``) where ``header``'s
        mode puts them; disk space past them reads zeros."""
        for guest, length, unit_off in guest_segments(header):
            inside = max(0, min(length, size - guest))
            self.paint(unit_off, inside, disk, guest)
            self.paint(unit_off + inside, length - inside, ZEROS)

    def paint_label(self, header: UnitHeader, tail: _Source | None = None) -> None:
        """Our own GPT (``offset``/``aligned``) and the META region: slot A holds
        ``header`` (or ``tail`` serves the whole region)."""
        recorder = _Recorder()
        if header.mode is not Mode.TRUNCATE:
            write_gpt(recorder, header)  # type: ignore[arg-type]
        if tail is None:
            recorder.write(header.meta_offset + SLOT_OFFSETS[0], encode_header(header))
        self.paint(header.meta_offset, TAIL_SIZE, ZEROS)
        for offset, data in recorder.writes:
            self.paint(offset, len(data), _Bytes(data))
        if tail is not None:
            self.paint(header.meta_offset, 2 * SLOT_SIZE, tail)


class _Recorder:
    """Just enough of a BlockBackend to capture what :func:`write_gpt` writes."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, bytes]] = []

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.writes.append((offset, bytes(data)))


class Home:
    """A unit this view reads (the live unit, a snapshot record) through a handle that
    a move swaps for one on the unit's new place (:meth:`FlatView.follow`)."""

    def __init__(self, unit_uuid: uuid.UUID, backend: BlockBackend) -> None:
        self.unit_uuid = unit_uuid
        self.backend = backend

    def read_into(self, offset: int, buf: memoryview) -> None:
        self.backend.read_into(offset, buf)


class _LiveTail:
    """Slots A and B of a grown flattened unit: the live unit's header, re-read on
    every read (region generations change as the state is rewritten), with the grown
    layout's region table and size."""

    def __init__(self, unit: Home, layout: UnitHeader) -> None:
        self._unit = unit
        self._layout = layout

    def read_into(self, offset: int, buf: memoryview) -> None:
        live = scan_slots(self._unit.backend).header
        if live is None:
            raise BackendError("the unit's header cannot be read")
        image = encode_header(relaid(live, self._layout)).ljust(2 * SLOT_SIZE, b"\0")
        buf[:] = image[offset : offset + len(buf)]


def relaid(header: UnitHeader, layout: UnitHeader) -> UnitHeader:
    """``header`` (its sealed regions' status, generation and length of content) in
    the region table and size of ``layout``."""
    regions = []
    for region in layout.regions:
        own = header.region(region.kind)
        if region.encrypted and own is not None:
            region = replace(own, offset=region.offset, length=region.length)
        regions.append(region)
    return replace(header, regions=tuple(regions), unit_size=layout.unit_size)


class FlatView:
    """A read-only BlockBackend over a unit flattened with the chain ``disk``.

    ``build(disk_size)`` returns the pieces and the size of the flattened unit; they
    are rebuilt when the chain's size changes (a live revert to a smaller snapshot, a
    grown top), so the view follows the chain it reads through. ``homes`` are the
    units it reads besides, through handles it owns (closed with it); the chain is the
    guest LU's."""

    def __init__(
        self,
        disk: DiskSource,
        build: Callable[[int], _Canvas],
        homes: list[Home],
    ) -> None:
        self.disk = disk
        self._build = build
        self._homes = homes
        self._lock = threading.Lock()
        self._layout: tuple[int, _Canvas, list[int]] | None = None

    def _current(self) -> tuple[_Canvas, list[int]]:
        size = self.disk.size
        layout = self._layout
        if layout is None or layout[0] != size:
            with self._lock:
                canvas = self._build(size)
                layout = self._layout = (size, canvas, [p[0] for p in canvas.pieces])
        return layout[1], layout[2]

    def rebuild(self, build: Callable[[int], _Canvas], homes: list[Home]) -> list[BlockBackend]:
        """Take a new unit handle and layout (the unit grew or moved); returns the
        handles it replaced, for the caller to close."""
        with self._lock:
            old, self._homes = self._homes, homes
            self._build = build
            self._layout = None
        return [home.backend for home in old]

    def follow(
        self, locate: Callable[[uuid.UUID], tuple[Pool, UnitRef]], moved: set[uuid.UUID]
    ) -> list[BlockBackend]:
        """Read the ``moved`` units this view reads at their new places (``locate``);
        returns the handles replaced, for the caller to close. The layout is theirs
        still: a move copies a unit byte for byte."""
        fresh = {}
        for home in self._homes:
            if home.unit_uuid in moved:
                pool, ref = locate(home.unit_uuid)
                fresh[id(home)] = pool.open(ref)
        retired = []
        for home in self._homes:
            if id(home) in fresh:
                retired.append(home.backend)
                home.backend = fresh[id(home)]
        return retired

    @property
    def homes(self) -> tuple[Home, ...]:
        return tuple(self._homes)

    @property
    def size(self) -> int:
        return self._current()[0].size

    @property
    def read_only(self) -> bool:
        return True

    def read_into(self, offset: int, buf: memoryview) -> None:
        canvas, starts = self._current()
        check_range(canvas.size, offset, len(buf))
        pieces = canvas.pieces
        index = bisect_right(starts, offset) - 1
        pos = 0
        while pos < len(buf):
            start, length, source, at = pieces[index]
            here = offset + pos
            n = min(len(buf) - pos, start + length - here)
            source.read_into(at + here - start, buf[pos : pos + n])
            pos += n
            index += 1

    def read(self, offset: int, length: int) -> bytearray:
        out = bytearray(length)
        self.read_into(offset, memoryview(out))
        return out

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        raise BackendError("raw view is read-only")

    def flush(self) -> None:
        pass

    def unmap(self, offset: int, length: int) -> None:
        pass

    def resize(self, size: int) -> None:
        raise BackendError("a raw view cannot be resized")

    def close(self) -> None:
        for home in self._homes:
            home.backend.close()
        self._homes = []


def _live_canvas(unit: Home, header: UnitHeader, disk: DiskSource, size: int) -> _Canvas:
    if size <= header.disk_size:  # the unit's own layout: everything else as it holds it
        canvas = _Canvas(header.unit_size)
        canvas.paint(0, header.unit_size, unit, 0)
        canvas.paint_disk(header, disk, size)
        return canvas
    plan = plan_growth(header, size)
    layout = replace(header, regions=plan.regions, unit_size=plan.unit_size)
    canvas = _Canvas(layout.unit_size)
    canvas.paint(0, header.unit_size, unit, 0)
    for scrub in plan.scrubs:  # vacated places and the old META read zeros
        canvas.paint(scrub.offset, scrub.length, ZEROS)
    for region in layout.regions:  # sealed regions, carried whole (ciphertext)
        old = header.region(region.kind)
        if region.encrypted and old is not None:
            canvas.paint(region.offset, old.length, unit, old.offset)
    canvas.paint_disk(layout, disk, size)
    canvas.paint_label(layout, _LiveTail(unit, layout))
    return canvas


def live_flat(unit: BlockBackend, header: UnitHeader, disk: DiskSource) -> FlatView:
    """The raw view of a served unit (``unit``: a whole-unit handle this view owns,
    ``header`` its layout) whose guest disk is the live disk ``disk``."""
    home = Home(header.unit_uuid, unit)
    return FlatView(disk, _live_builder(home, header, disk), [home])


def _live_builder(unit: Home, header: UnitHeader, disk: DiskSource) -> Callable[[int], _Canvas]:
    return lambda size: _live_canvas(unit, header, disk, size)


def reopen_live(view: FlatView, unit: BlockBackend, header: UnitHeader) -> list[BlockBackend]:
    """Point a live raw view at a new handle and layout of its unit (after a resize
    grew it, or a move put it in another pool); it keeps reading the same chain.
    Returns the handles replaced (the caller closes them)."""
    home = Home(header.unit_uuid, unit)
    return view.rebuild(_live_builder(home, header, view.disk), [home])


def fresh_layout(template: UnitHeader, disk_size: int, sealed: UnitHeader | None) -> UnitHeader:
    """A new unit of ``template``'s mode and role with a ``disk_size`` disk and the
    sealed regions of ``sealed`` (their lengths, status and generations): regions in
    :func:`~..format.layout.initial_regions`' order, each at the next MiB after the last."""
    regions, _size = initial_regions(template.mode, template.role, disk_size)
    placed: list[Region] = []
    cursor = 0
    for region in sorted(regions, key=lambda r: r.offset):
        own = sealed.region(region.kind) if sealed is not None else None
        if region.encrypted and own is not None:
            region = own
        placed.append(replace(region, offset=cursor))
        cursor = align_up(cursor + region.length, ALIGN)
    size = placed[-1].end
    return replace(
        template,
        regions=tuple(placed),
        unit_size=size,
        state=UnitState.CLEAN,
        moves=(),
        scrubs=(),
        tops=(),
        parent_uuid=None,
    )


def snapshot_flat(
    volume: UnitHeader, record: BlockBackend | None, record_header: UnitHeader, disk: BlockBackend
) -> FlatView:
    """The raw view of a volume flattened at a snapshot: ``disk`` the snapshot's
    read-only chain of the volume, ``record`` (the snapshot record unit, a handle this
    view owns) the sealed regions of a base volume; None for a secondary disk, which
    has none. A base volume's header names the record's UUID and wrapped data key."""
    template = volume
    if record is not None:
        template = replace(
            volume,
            unit_uuid=record_header.unit_uuid,
            naa=record_header.naa,
            owner_uuid=record_header.unit_uuid,  # a base unit owns itself
            key_id=record_header.key_id,
            wrapped_key=record_header.wrapped_key,
            generation=record_header.generation,
        )
    layout = fresh_layout(template, disk.size, record_header if record is not None else None)
    canvas = _Canvas(layout.unit_size)
    homes = [] if record is None else [Home(record_header.unit_uuid, record)]
    for home in homes:
        for region in layout.regions:
            own = record_header.region(region.kind)
            if region.encrypted and own is not None:
                canvas.paint(region.offset, own.length, home, own.offset)
    canvas.paint_disk(layout, disk, disk.size)
    canvas.paint_label(layout)
    return FlatView(disk, lambda _size: canvas, homes)


__all__ = ["DiskSource", "FlatView", "live_flat", "reopen_live", "snapshot_flat"]


class ServedRaw(Protocol):
    """What :func:`reopen_raw` needs of a served raw-view logical unit (the server's
    :class:`~iscsi_vmtarget.scsi.LogicalUnit`)."""

    @property
    def backend(self) -> BlockBackend: ...

    def replace_backend(self, backend: BlockBackend) -> None: ...

    def check_capacity(self) -> None: ...


def reopen_raw(lu: ServedRaw, handle: BlockBackend, header: UnitHeader) -> list[BlockBackend]:
    """Give a raw-view LU a new handle on its unit (grown by a resize, moved to another
    pool) with ``header``'s layout; it goes on reading the disk through the same chain.
    Returns what it replaced, for the caller to close; initiators are told of a new
    capacity (CAPACITY DATA HAS CHANGED)."""
    backend = lu.backend
    if isinstance(backend, FlatView):
        retired = reopen_live(backend, handle, header)
    else:
        retired = [backend]
        lu.replace_backend(RawView(handle))
    lu.check_capacity()
    return retired
