"""A device pool: one block device (or one large file) carved into units.

The first MiB holds the **unit table** in two 256 KiB slots (A at 0, B at 256 KiB),
updated like the unit header: write the slot with the older generation, flush; read the
valid slot with the highest generation. Units are MiB-aligned extents after the table.

Slot layout (little-endian)::

     0  8  magic "IVMTPOOL"
     8  2  format version (1)
    10  2  reserved
    12  4  length N of the bytes covered by the checksum
    16  8  generation
    24 16  pool UUID
    40  8  device size in bytes when formatted
    48  4  entry count E
    52 12  reserved
    64     E x 32  entries: unit UUID (16), offset u64, length u64
     N 32  SHA-256 of bytes 0..N

A unit is allocated by zeroing its extent, writing it whole, then committing the table
entry: until the commit the extent is free space and a crash loses nothing. Growing a
unit writes the new tail header into the free space after it, then commits the longer
entry (:mod:`.unit` explains the rest of a resize). A pool object reserves the extents
it handed out until they are committed or dropped, so several units can be written
before one table commit makes them all units at once (:meth:`DevicePool.publish`, the
switch of a ``vm move`` into the pool).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Final

from ...storage import BackendError, FileBackend
from ...storage.backend import BlockBackend
from ..format.header import ALIGN, MIB, TAIL_SIZE
from ..layers.view import SliceBackend
from ..vm_errors import FormatError, NewerFormatError, SizeError, VmError
from .pool_protocol import UnitRef

#: Where a unit's lease block lies inside its META region (the header slots use 16 KiB).
LEASE_AT: Final = 512 * 1024

#: What moves a unit's lease block when a growth moves its META region: called as
#: ``(device, unit UUID, old lease offset, new)`` around the table commit. The unit
#: leases (:func:`.device_lease.relocating`) register themselves here.
LeaseMover = Callable[
    [BlockBackend, uuid.UUID, int, int], contextlib.AbstractContextManager[None]
]
LEASE_MOVERS: list[LeaseMover] = []


def lease_offset(unit_offset: int, unit_length: int) -> int:
    """Device offset of the lease block of the unit at ``[unit_offset, +unit_length)``."""
    return unit_offset + unit_length - TAIL_SIZE + LEASE_AT

MAGIC: Final = b"IVMTPOOL"
VERSION: Final = 1
TABLE_SLOT: Final = 256 * 1024
TABLE_AREA: Final = MIB
_FIXED = struct.Struct("<8sHHIQ16sQI12s")
_ENTRY = struct.Struct("<16sQQ")
MAX_ENTRIES: Final = (TABLE_SLOT - _FIXED.size - 32) // _ENTRY.size
#: The key of an allocated extent not yet in the table: ``pending:UUID:OFFSET:LENGTH``.
_PENDING: Final = "pending:"


def _pending(ref: UnitRef) -> tuple[uuid.UUID, int, int]:
    """(unit UUID, offset, length) of a pending key."""
    try:
        raw_uuid, offset, length = ref.key.removeprefix(_PENDING).split(":")
        return uuid.UUID(raw_uuid), int(offset), int(length)
    except ValueError:
        raise VmError(f"{ref.location} is not an allocated extent") from None


@dataclass(frozen=True)
class Table:
    pool_uuid: uuid.UUID
    device_size: int
    entries: tuple[tuple[uuid.UUID, int, int], ...]
    generation: int = 0


def encode_table(table: Table) -> bytes:
    if len(table.entries) > MAX_ENTRIES:
        raise VmError(f"a device pool holds at most {MAX_ENTRIES} units")
    body = bytearray(
        _FIXED.pack(
            MAGIC,  # marker
            VERSION,  # format version
            0,  # reserved
            _FIXED.size + len(table.entries) * _ENTRY.size,  # checksummed length
            table.generation,  # generation
            table.pool_uuid.bytes,  # pool UUID
            table.device_size,  # device size
            len(table.entries),  # entry count
            b"",  # reserved
        )
    )
    for unit_uuid, offset, length in table.entries:
        body += _ENTRY.pack(unit_uuid.bytes, offset, length)
    body += hashlib.sha256(body).digest()
    return bytes(body.ljust(TABLE_SLOT, b"\0"))


def decode_table(slot: bytes | bytearray) -> Table:
    if slot[:8] != MAGIC:
        raise FormatError("no pool marker")
    _magic, version, _r, length, generation, pool, size, count, _r2 = _FIXED.unpack_from(slot)
    if not _FIXED.size <= length <= TABLE_SLOT - 32:
        raise FormatError("pool table length out of range")
    if hashlib.sha256(slot[:length]).digest() != bytes(slot[length : length + 32]):
        raise FormatError("pool table checksum mismatch")
    if version > VERSION:
        raise NewerFormatError(
            f"pool table format version {version} (this iscsi-vmtarget reads {VERSION})"
        )
    if length != _FIXED.size + count * _ENTRY.size:
        raise FormatError("pool table lengths are inconsistent")
    entries = []
    for index in range(count):
        raw, offset, ln = _ENTRY.unpack_from(slot, _FIXED.size + index * _ENTRY.size)
        entries.append((uuid.UUID(bytes=raw), offset, ln))
    return Table(uuid.UUID(bytes=pool), size, tuple(entries), generation)


def _read_tables(backend: BlockBackend) -> tuple[Table | None, int, bool]:
    """(newest valid table, its slot, whether any slot is marked)."""
    best: Table | None = None
    best_slot = -1
    marked = False
    for slot in (0, 1):
        raw = backend.read(slot * TABLE_SLOT, TABLE_SLOT)
        marked = marked or raw[:8] == MAGIC
        try:
            table = decode_table(raw)
        except NewerFormatError:
            raise
        except FormatError:
            continue
        if best is None or table.generation > best.generation:
            best, best_slot = table, slot
    return best, best_slot, marked


def format_device(path: str, force: bool = False) -> None:
    """Write an empty unit table to ``path``, or adopt the table already there."""
    try:
        backend = FileBackend(path)
    except BackendError as exc:
        raise VmError(str(exc)) from exc
    try:
        if backend.size < TABLE_AREA + ALIGN:
            raise SizeError(f"{path!r} is too small for a device pool (needs at least 2 MiB)")
        table, _slot, marked = _read_tables(backend)
        if table is not None:
            return  # already a pool: adopt it
        head = backend.read(0, TABLE_AREA)
        if (marked or any(head)) and not force:
            raise VmError(
                f"{path!r} holds data in its first MiB; refusing to format it (--force overwrites)"
            )
        fresh = Table(uuid.uuid4(), backend.size, (), 1)
        backend.write(0, encode_table(fresh))
        backend.write(TABLE_SLOT, bytes(TABLE_SLOT))
        backend.flush()
    finally:
        backend.close()


class DevicePool:
    """Units carved out of one device, listed by the on-device unit table."""

    kind = "device"

    def __init__(self, name: str, path: str) -> None:
        self.name = name
        self.path = os.path.abspath(path)
        try:
            self._backend = FileBackend(self.path)
        except BackendError as exc:
            raise VmError(f"pool {name!r}: {exc}") from exc
        table, slot, _marked = _read_tables(self._backend)
        if table is None:
            self._backend.close()
            raise FormatError(f"pool {name!r}: {self.path!r} holds no valid unit table")
        self._table = table
        self._slot = slot
        self._slices: dict[str, SliceBackend] = {}
        #: extents allocated and not yet committed or dropped, by pending key
        self._reserved: dict[str, tuple[int, int]] = {}

    # -- the table -----------------------------------------------------------------------

    def reload(self) -> None:
        """Re-read the table (another process may have changed it); callers hold the
        pool lock (:func:`.locks.pool_lock`) from here to their commit."""
        table, slot, _marked = _read_tables(self._backend)
        if table is None:
            raise FormatError(f"pool {self.name!r}: the unit table is no longer valid")
        self._table, self._slot = table, slot

    def _commit(self, entries: tuple[tuple[uuid.UUID, int, int], ...]) -> None:
        new = replace(self._table, entries=entries, generation=self._table.generation + 1)
        slot = 1 - self._slot
        self._backend.write(slot * TABLE_SLOT, encode_table(new))
        self._backend.flush()
        self._table, self._slot = new, slot

    def _entry(self, ref: UnitRef) -> tuple[uuid.UUID, int, int]:
        """The table entry of ``ref``, or the extent of an allocated one (pending)."""
        if ref.key.startswith(_PENDING):
            return _pending(ref)
        for entry in self._table.entries:
            if str(entry[0]) == ref.key:
                return entry
        raise VmError(f"unit {ref.key} is not in pool {self.name!r}")

    def extent(self, ref: UnitRef) -> tuple[int, int]:
        """(offset, length) of a unit on the device, from a fresh read of the table."""
        self.reload()
        _u, offset, length = self._entry(ref)
        return offset, length

    def extent_of(self, unit_uuid: uuid.UUID) -> tuple[int, int] | None:
        """(offset, length) of unit ``unit_uuid`` in the table as last read, if here."""
        for entry_uuid, offset, length in self._table.entries:
            if entry_uuid == unit_uuid:
                return offset, length
        return None

    def _end(self) -> int:
        return min(self._backend.size, self._table.device_size) // ALIGN * ALIGN

    def _free_after(self, offset: int) -> int:
        """End of the free gap starting at ``offset``."""
        later = [o for _u, o, _l in self._table.entries if o >= offset]
        return min([*later, self._end()])

    # -- Pool ------------------------------------------------------------------------------

    def candidates(self) -> list[UnitRef]:
        return [UnitRef(self.name, str(u)) for u, _o, _l in self._table.entries]

    def open(self, ref: UnitRef, read_only: bool = False) -> BlockBackend:
        """A window on a descriptor of its own: it outlives the pool object (a server
        keeps guest views open for its lifetime)."""
        _u, offset, length = self._entry(ref)
        try:
            device = FileBackend(self.path, read_only=read_only)
        except BackendError as exc:
            raise VmError(f"pool {self.name!r}: {exc}") from exc
        return SliceBackend(device, offset, length, owns_base=True)

    def allocate(self, unit_uuid: uuid.UUID, size: int) -> tuple[UnitRef, BlockBackend]:
        self.reload()
        cursor = TABLE_AREA
        taken = [(o, n) for _u, o, n in self._table.entries] + list(self._reserved.values())
        for offset, length in sorted(taken):
            if offset - cursor >= size:
                break
            cursor = max(cursor, offset + length)
        if cursor + size > self._end():
            raise SizeError(
                f"pool {self.name!r} has no free extent of {size} bytes "
                f"(largest free: {self._largest_free()} bytes)"
            )
        window = SliceBackend(FileBackend(self.path), cursor, size, owns_base=True)
        window.unmap(0, size)  # a new unit never shows a former unit's bytes
        ref = UnitRef(self.name, f"{_PENDING}{unit_uuid}:{cursor}:{size}")
        self._reserved[ref.key] = (cursor, size)
        return ref, window

    def _largest_free(self) -> int:
        best, cursor = 0, TABLE_AREA
        for _u, offset, length in sorted(self._table.entries, key=lambda e: e[1]):
            best = max(best, offset - cursor)
            cursor = max(cursor, offset + length)
        return max(best, self._end() - cursor)

    def commit(self, ref: UnitRef, backend: BlockBackend) -> UnitRef:
        backend.flush()
        return self.publish([ref])[0]

    def publish(self, refs: list[UnitRef]) -> list[UnitRef]:
        """Make allocated extents, written and flushed, units: one table commit for
        all (atomic: after a crash, all of them are units or none). Idempotent."""
        self.reload()
        have = {u for u, _o, _n in self._table.entries}
        extents = [_pending(ref) for ref in refs]
        self._commit((*self._table.entries, *(e for e in extents if e[0] not in have)))
        for ref in refs:
            self._reserved.pop(ref.key, None)
        return [UnitRef(self.name, str(unit_uuid)) for unit_uuid, _o, _n in extents]

    def abandon(self, ref: UnitRef, backend: BlockBackend) -> None:
        backend.close()  # nothing was committed: the extent is still free space
        self._reserved.pop(ref.key, None)

    def discard(self, ref: UnitRef) -> None:
        """Drop an allocated extent that will not become a unit (a move rolled back,
        maybe by another process after a crash): its bytes are scrubbed, as a deleted
        unit's, unless a unit committed since occupies them."""
        self._reserved.pop(ref.key, None)
        self.reload()
        _u, offset, length = _pending(ref)
        if not any(o < offset + length and offset < o + n for _u, o, n in self._table.entries):
            SliceBackend(self._backend, offset, length).unmap(0, length)

    def delete(self, ref: UnitRef) -> None:
        self.reload()
        entry = self._entry(ref)
        self._commit(tuple(e for e in self._table.entries if e != entry))
        window = SliceBackend(self._backend, entry[1], entry[2])
        window.unmap(0, entry[2])  # scrub: the disk region is not encrypted

    def begin_growth(self, ref: UnitRef, backend: BlockBackend, new_size: int) -> None:
        self.reload()
        _u, offset, length = self._entry(ref)
        if offset + new_size > self._free_after(offset + length):
            raise SizeError(
                f"pool {self.name!r} has no free space right after this unit for "
                f"{new_size - length} more bytes"
            )
        assert isinstance(backend, SliceBackend)
        SliceBackend(self._backend, offset + length, new_size - length).unmap(0, new_size - length)
        backend.set_length(new_size)

    def end_growth(self, ref: UnitRef, backend: BlockBackend) -> None:
        unit_uuid, offset, length = self._entry(ref)
        backend.flush()
        entries = tuple(
            (u, o, backend.size if u == unit_uuid else n) for u, o, n in self._table.entries
        )
        old, new = lease_offset(offset, length), lease_offset(offset, backend.size)
        with contextlib.ExitStack() as stack:  # the lease moves with META
            for mover in LEASE_MOVERS:
                stack.enter_context(mover(self._backend, unit_uuid, old, new))
            self._commit(entries)

    def recover(self, ref: UnitRef) -> str | None:
        return None  # the table entry is the commit point: nothing to finish

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "kind": self.kind,
            "path": self.path,
            "pool_uuid": str(self._table.pool_uuid),
            "size_bytes": self._end(),
            "units": len(self._table.entries),
            "free_bytes": self._largest_free(),
        }

    def close(self) -> None:
        self._backend.close()
