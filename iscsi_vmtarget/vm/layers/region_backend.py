"""A sealed region (state or config) as a block device: what a hypervisor view's LUN
reads and writes (issue 14, :mod:`iscsi_vmtarget.server.hypervisor_view`).

The device is the region's block-format chunks (:mod:`.sealed_blocks`) followed by one
4 KiB **stream descriptor**::

    0          block_capacity(length)           + 4096
    | image bytes, sealed per 64 KiB chunk     | descriptor |

The descriptor is not stored as such: reads build it from the unit header (magic
``IVMTSTRM``, version u32, 0 u32, image length u64, zeros) and a write of it commits
the length it carries into the header (the region's ``used``), a header commit being
atomic. ``state push`` writes the image, flushes, then the descriptor; ``state pull``
reads the descriptor, then exactly that many bytes. A descriptor without the magic
records length 0.

Reads return plaintext; writes are sealed on the way (read-modify-write of the 64 KiB
chunk for a partial one, never in place: a kill -9 leaves each chunk old or new). The
unit header is read again before every request, so a revert, a ``vm state write`` or
a snapshot done by other code on the same unit is seen at once; the region converts to
the block format (status BLOCKS) at its first write.
"""

from __future__ import annotations

import os
import struct
import threading
from dataclasses import replace
from typing import Final

from ...storage.backend import BackendError, is_remote
from ..format import sealed
from ..format.crypto import Keyring, RandomSource
from ..format.header import (
    SLOT_SIZE,
    TAIL_SIZE,
    Region,
    RegionKind,
    RegionStatus,
    UnitHeader,
    scan_slots,
)
from ..format.sealed_blocks import CHUNK, BlockCodec, BlockMap, block_capacity, convert
from ..units.pool_protocol import Pool, UnitRef
from ..units.unit import Unit
from ..vm_errors import IntegrityError, VmError

DESCRIPTOR_BYTES: Final = 4096
DESCRIPTOR_MAGIC: Final = b"IVMTSTRM"
_DESCRIPTOR = struct.Struct("<8sIIQ")


def encode_descriptor(length: int) -> bytes:
    """The 4 KiB stream descriptor recording an image of ``length`` bytes."""
    return _DESCRIPTOR.pack(DESCRIPTOR_MAGIC, 1, 0, length).ljust(DESCRIPTOR_BYTES, b"\0")


def decode_descriptor(data: bytes | bytearray) -> int | None:
    """The image length a descriptor records; None if it is no descriptor."""
    magic, _version, _zero, length = _DESCRIPTOR.unpack_from(data)
    return length if magic == DESCRIPTOR_MAGIC else None


class RegionBlockBackend:
    """The block device of one sealed region of one unit (a BlockBackend)."""

    def __init__(
        self,
        pool: Pool,
        ref: UnitRef,
        kind: RegionKind,
        keyring: Keyring,
        random: RandomSource = os.urandom,
    ) -> None:
        self._pool, self._ref, self.kind = pool, ref, kind
        self._backend = pool.open(ref)
        self.remote_io = is_remote(self._backend)
        self._lock = threading.Lock()
        self._header: UnitHeader | None = None
        self._slot, self._stamp = 0, b""
        try:
            unit = self._unit()
            region = unit.header.require_region(kind)
            self.what = f"the {kind.name.lower()} region of {unit.what}"
            self._codec = BlockCodec(
                self._backend,
                unit.data_key(keyring),
                unit.header.unit_uuid,
                kind,
                self.what,
                random,
            )
        except BaseException:
            self._backend.close()
            raise
        self._capacity = block_capacity(region.length)
        self._map: BlockMap | None = None
        self._key: tuple[int, int, int, int] | None = None

    # -- the unit ------------------------------------------------------------------------

    def _unit(self) -> Unit:
        """The unit with its current header: read again when a slot's generation
        changed since the last request (any commit, by anyone, changes one)."""
        base = self._backend.size - TAIL_SIZE
        stamp = bytes(
            self._backend.read(base + 16, 8) + self._backend.read(base + SLOT_SIZE + 16, 8)
        )
        if self._header is None or stamp != self._stamp:
            scan = scan_slots(self._backend)
            if scan.header is None:
                raise BackendError(f"unit {self._ref.location}: header unreadable")
            self._header, self._slot, self._stamp = scan.header, scan.slot, stamp
        return Unit(self._pool, self._ref, self._backend, self._header, self._slot)

    def _current(self) -> tuple[Unit, Region]:
        unit = self._unit()
        return unit, unit.header.require_region(self.kind)

    def _block_map(self, region: Region) -> BlockMap:
        key = (region.offset, region.length, region.status, region.generation)
        if self._map is None or self._key != key:
            if self._map is not None and self._map.dirty:
                self._backend.flush()
            self._map, self._key = BlockMap.scan(self._backend, region), key
        self._map.region = region  # used may have changed
        return self._map

    def _writable(self) -> tuple[Unit, Region]:
        """The region in block format (converted on its first write)."""
        unit, region = self._current()
        if region.status is RegionStatus.BLOCKS:
            return unit, region
        if region.status is RegionStatus.STAGED:
            region = unit.finish_staged(self.kind)
        converted = convert(self._backend, region)
        self._backend.flush()
        unit.commit(unit.header.with_region(converted))
        return unit, converted

    # -- BlockBackend --------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._capacity + DESCRIPTOR_BYTES

    @property
    def read_only(self) -> bool:
        return False

    def read(self, offset: int, length: int) -> bytearray:
        out = bytearray(length)
        self.read_into(offset, memoryview(out))
        return out

    def read_into(self, offset: int, buf: memoryview) -> None:
        with self._lock, _as_backend_error():
            unit, region = self._current()
            end = offset + len(buf)
            pos = offset
            while pos < end:
                if pos >= self._capacity:  # the descriptor
                    rel = pos - self._capacity
                    desc = encode_descriptor(_image_length(region))
                    n = min(end, self.size) - pos
                    buf[pos - offset : pos - offset + n] = desc[rel : rel + n]
                    pos += n
                    continue
                index, rel = divmod(pos, CHUNK)
                n = min(CHUNK - rel, end - pos, self._capacity - pos)
                out = buf[pos - offset : pos - offset + n]
                if n == CHUNK and region.status is RegionStatus.BLOCKS:  # no copy
                    self._codec.read_chunk_into(self._block_map(region), index, out)
                else:
                    out[:] = memoryview(self._read_chunk(unit, region, index))[rel : rel + n]
                pos += n

    def _read_chunk(self, unit: Unit, region: Region, index: int) -> bytes:
        if region.status is RegionStatus.BLOCKS:
            return self._codec.read_chunk(self._block_map(region), index)
        if region.status in (RegionStatus.VALID, RegionStatus.STAGED):
            if index < sealed.chunks_of(region.used):
                return sealed.read_chunk(
                    self._backend, region, self._codec.legacy, index, self.what
                ).ljust(CHUNK, b"\0")
        return bytes(CHUNK)  # EMPTY, WRITING (being rewritten), past the content

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        with self._lock, _as_backend_error():
            unit, region = self._writable()
            bmap = self._block_map(region)
            pos, end = offset, offset + len(view)
            while pos < min(end, self._capacity):
                index, rel = divmod(pos, CHUNK)
                n = min(CHUNK - rel, end - pos, self._capacity - pos)
                if not rel and n == CHUNK:  # a run of whole chunks at once
                    n = (min(end, self._capacity) - pos) // CHUNK * CHUNK
                    self._codec.write_chunks(bmap, index, view[pos - offset : pos - offset + n])
                else:
                    self._codec.write_chunk(bmap, index, rel, view[pos - offset : pos - offset + n])
                pos += n
            if end > self._capacity:  # the descriptor: commit the length it records
                desc = bytearray(encode_descriptor(_image_length(region)))
                start = pos - self._capacity
                desc[start : start + end - pos] = view[pos - offset :]
                length = decode_descriptor(desc) or 0
                if length > self._capacity:
                    raise IntegrityError(
                        f"{self.what}: a {length}-byte image does not fit its "
                        f"{self._capacity} bytes"
                    )
                self._codec.flush(bmap)  # the image is durable before it is recorded
                unit.commit(unit.header.with_region(replace(region, used=length)))

    def flush(self) -> None:
        with self._lock:
            if self._map is not None:
                self._codec.flush(self._map)
            self._backend.flush()

    def unmap(self, offset: int, length: int) -> None:
        self.write(offset, bytes(length))  # zeros, sealed like any data

    def resize(self, size: int) -> None:
        raise BackendError(f"{self.what}: grow the region with 'vm resize'")

    def close(self) -> None:
        with self._lock:
            self._codec.settle()  # no fsync of a closed descriptor in the background
            if self._map is not None and self._map.dirty:
                self._backend.flush()
            self._backend.close()


def _image_length(region: Region) -> int:
    if region.status in (RegionStatus.VALID, RegionStatus.STAGED, RegionStatus.BLOCKS):
        return region.used
    return 0


class _as_backend_error:
    """Integrity and VM errors of a request become BackendError (MEDIUM ERROR sense)."""

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if isinstance(exc, (IntegrityError, VmError)) and not isinstance(exc, BackendError):
            raise BackendError(str(exc)) from exc
