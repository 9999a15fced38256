"""Block access to a sealed region: any 512-byte write, atomic per chunk (issue 14).

The hypervisor view (:mod:`iscsi_vmtarget.server.hypervisor_view`) shows the state and
config regions as LUNs a hypervisor writes like a disk. The whole-region rewrite of
:mod:`.sealed` (stage, then switch with a header commit) is no use there: every write
would rewrite the region. A region in status BLOCKS keeps its chunks log-structured
instead, with the region's chunk table and chunk slots laid out as in :mod:`.sealed`:

* a *logical* chunk (64 KiB of the LUN) lives in any physical slot; the slot's table
  entry names it: nonce (12), tag (16), sequence u64, logical index u32, flags u32
  (bit 0 present, bit 1 block format), 20 reserved - the same 64 bytes as a
  :mod:`.sealed` entry;
* a write seals the chunk's new content (read-modify-write for a partial chunk) into a
  *free* slot with sequence + 1; the slot that held the old content is freed only after
  the next flush, and its table entry is cleared then (so a tampered chunk has no
  older copy to fall back on: it fails). AES-256-GCM binds the unit, the region kind
  (with bit 7 set: the block format), the logical index, the sequence and the length,
  so a kill -9 in the middle of a write leaves a slot that fails authentication beside
  the old one that passes: every chunk reads back as its old or its new content,
  never as a tag failure;
* ``SPARE`` slots (2 to 64, 1/16 of the region) are kept free for that, so the LUN holds
  ``capacity(length) - SPARE`` chunks;
* a region written by :meth:`.unit.Unit.write_region` (status VALID: ``vm state write``,
  a revert) converts in place: its chunk ``i`` is logical chunk ``i`` with sequence 0,
  authenticated the old way; the conversion only clears the table entries past the
  content and commits status BLOCKS (format version 3, :mod:`.format`), so it is
  crash-atomic too.

The header's ``used`` of a BLOCKS region is the length of the image a hypervisor
recorded (the stream descriptor of :mod:`iscsi_vmtarget.server.hypervisor_view`);
:func:`read_image` returns those bytes, so snapshots, clones and ``vm state read`` see
exactly what was pushed.

Slots replaced by a rewrite are recycled through flushes that run in the background
(:meth:`BlockCodec._flush_ahead`) while sealing goes on; a slot is reused only after a
flush that began once its replacement was written has completed.

A power cut (unlike a kill -9, which leaves every write in the page cache) may keep
any subset of the writes since the last flush: a slot's table entry without its data.
A chunk with a durable copy keeps it until a newer one is durable, so it reads old or
new. A chunk's *first* copy has nothing older, so its entry carries flag bit 2 until a
flush has made it durable (then the entry is written again without it): a chunk whose
every slot fails authentication and whose oldest slot still has the bit was never
durable and reads as zeros, what it held before; without the bit it is a MEDIUM ERROR.

A replay of a whole older slot (both ciphertext and entry) by someone who can write the
pool is not detected (the sequence is per chunk, not in the header).
"""

from __future__ import annotations

import os
import struct
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Final

from ...storage.backend import BlockBackend
from ..vm_errors import IntegrityError
from . import sealed
from .crypto import TAG_BYTES, RandomSource, RegionCipher
from .header import Region, RegionKind, RegionStatus

CHUNK: Final = sealed.CHUNK
ENTRY: Final = sealed.ENTRY
BLOCK_FORMAT: Final = 0x80  # or-ed into the region kind of the AEAD's associated data
_ENTRY = struct.Struct("<12s16sQII20s")
_BATCH: Final = 16  # chunks sealed per scratch buffer (1 MiB)
_PRESENT: Final = 0x01
_BLOCK: Final = 0x02
_FIRST: Final = 0x04  # a chunk's first copy, not yet known durable (module doc)


def slots_of(length: int) -> int:
    """Physical chunk slots of a region of ``length`` bytes."""
    return sealed.capacity(length) // CHUNK


def spare_of(length: int) -> int:
    return max(2, min(64, slots_of(length) // 16))


def block_capacity(length: int) -> int:
    """Bytes of a region of ``length`` bytes a block-format LUN offers."""
    return max(0, slots_of(length) - spare_of(length)) * CHUNK


@dataclass
class _Slot:
    physical: int
    sequence: int
    nonce: bytes
    tag: bytes
    legacy_length: int = 0  # > 0: a chunk sealed by sealed.write_chunks (sequence 0)
    first: bool = False  # the chunk's first copy, its entry written before a flush


@dataclass
class BlockMap:
    """Where each logical chunk of a BLOCKS region is: its slots, newest first."""

    region: Region
    chunks: dict[int, list[_Slot]] = field(default_factory=dict)
    free: list[int] = field(default_factory=list)
    retired: list[int] = field(default_factory=list)  # free after the next flush
    #: first copies (logical chunk, slot) to confirm after the next flush
    unconfirmed: list[tuple[int, _Slot]] = field(default_factory=list)
    dirty: bool = False

    @classmethod
    def scan(cls, backend: BlockBackend, region: Region) -> BlockMap:
        out = cls(region)
        count = slots_of(region.length)
        table = backend.read(region.offset, count * ENTRY)
        for p in range(count):
            nonce, tag, seq, logical, flags, _ = _ENTRY.unpack_from(table, p * ENTRY)
            if flags & _BLOCK and logical < count:
                slot = _Slot(p, seq, nonce, tag, first=bool(flags & _FIRST))
                out.chunks.setdefault(logical, []).append(slot)
            elif flags & _PRESENT and seq == region.generation and 0 < logical <= CHUNK:
                out.chunks.setdefault(p, []).append(_Slot(p, 0, nonce, tag, logical))
            else:
                out.free.append(p)
        for slots in out.chunks.values():
            slots.sort(key=lambda s: s.sequence, reverse=True)
        out.free.reverse()  # pop() takes the lowest slot first
        return out


class BlockCodec:
    """Read and write logical chunks of one BLOCKS region (the caller serializes)."""

    def __init__(
        self,
        backend: BlockBackend,
        data_key: bytes,
        unit_uuid: uuid.UUID,
        kind: RegionKind,
        what: str,
        random: RandomSource = os.urandom,
    ) -> None:
        self.backend = backend
        self.what = what
        self.legacy = RegionCipher(data_key, unit_uuid, kind, random)
        self._cipher = RegionCipher(data_key, unit_uuid, kind | BLOCK_FORMAT, random)
        self._scratch: memoryview | None = None  # chunks being sealed (_BATCH + a tag)
        self._sealed: memoryview | None = None  # one chunk being opened, with its tag
        # a flush running in the background: the map and the retired slots it frees
        self._ahead: (
            tuple[Future[None], BlockMap, list[int], list[tuple[int, _Slot]]] | None
        ) = None

    def _data(self, region: Region, physical: int) -> int:
        return region.offset + sealed.table_bytes(region.length) + physical * CHUNK

    def _open(self, bmap: BlockMap, logical: int) -> tuple[bytes, _Slot | None]:
        """The newest slot of ``logical`` that authenticates (and its plaintext)."""
        slots = bmap.chunks.get(logical)
        if not slots:
            return bytes(CHUNK), None
        region = bmap.region
        for slot in slots:
            if slot.legacy_length:
                data = bytes(
                    self.backend.read(self._data(region, slot.physical), slot.legacy_length)
                )
                try:
                    plain = self.legacy.open(
                        logical, region.generation, slot.nonce, data, slot.tag, self.what
                    )
                except IntegrityError:
                    continue
                return plain.ljust(CHUNK, b"\0"), slot
            data = bytes(self.backend.read(self._data(region, slot.physical), CHUNK))
            try:
                return self._cipher.open(
                    logical, slot.sequence, slot.nonce, data, slot.tag, self.what
                ), slot
            except IntegrityError:
                continue  # torn by a crash mid-write: an older slot holds the content
        if slots[-1].first:  # never durable: the power went before its first flush
            return bytes(CHUNK), None
        raise IntegrityError(
            f"{self.what}: chunk {logical} failed authentication in every slot "
            "(tampered or corrupted); refusing to return its bytes"
        )

    def read_chunk(self, bmap: BlockMap, logical: int) -> bytes:
        return self._open(bmap, logical)[0]

    def read_chunk_into(self, bmap: BlockMap, logical: int, out: memoryview) -> None:
        """:meth:`read_chunk` into ``out`` (CHUNK bytes): the ciphertext is read beside
        its tag and opened straight into ``out`` (no copy of the plaintext)."""
        slots = bmap.chunks.get(logical, [])
        if self._sealed is None:
            self._sealed = memoryview(bytearray(CHUNK + TAG_BYTES))
        sealed = self._sealed
        for slot in slots:
            if slot.legacy_length:
                break  # the full path below
            self.backend.read_into(self._data(bmap.region, slot.physical), sealed[:CHUNK])
            sealed[CHUNK:] = slot.tag
            try:
                self._cipher.open_into(
                    logical, slot.sequence, slot.nonce, sealed, out, self.what
                )  # fmt: skip
                return
            except IntegrityError:
                continue  # torn by a crash mid-write: an older slot holds the content
        out[:] = self._open(bmap, logical)[0]  # no slot, a converted one, or none opens

    def write_chunk(
        self, bmap: BlockMap, logical: int, offset: int, data: bytes | memoryview
    ) -> None:
        """Put ``data`` at ``offset`` of logical chunk ``logical`` into a free slot."""
        if offset == 0 and len(data) == CHUNK:
            self.write_chunks(bmap, logical, data)
            return
        old, current = self._open(bmap, logical)
        buf = bytearray(old)
        buf[offset : offset + len(data)] = data
        self._store(bmap, [self._seal(bmap, logical, buf, current, 0)])

    def write_chunks(self, bmap: BlockMap, first: int, data: bytes | memoryview) -> None:
        """Whole chunks from logical chunk ``first`` on: sealed one by one into a
        scratch buffer, :data:`_BATCH` at a time, written with one write per run of
        adjacent free slots (a 1 MiB write: usually one)."""
        view = memoryview(data).cast("B")
        count = len(view) // CHUNK
        for batch in range(0, count, _BATCH):
            pending: list[tuple[int, int, bytes]] = []
            end = min(count, batch + _BATCH)
            nonces = self._cipher.nonces(end - batch)  # one getrandom for the batch
            for k in range(batch, end):
                if not bmap.free:  # never flush (free old copies) before the new ones are out
                    self._store(bmap, pending)
                    pending = []
                logical = first + k
                current = self._current_slot(bmap, logical)
                piece = view[k * CHUNK : (k + 1) * CHUNK]
                at = k - batch
                pending.append(self._seal(bmap, logical, piece, current, at, nonces[at]))
            self._store(bmap, pending)
            self._flush_ahead(bmap)

    def _seal(
        self,
        bmap: BlockMap,
        logical: int,
        plain: bytes | bytearray | memoryview,
        current: _Slot | None,
        at: int,
        nonce: bytes | None = None,
    ) -> tuple[int, int, bytes]:
        """Seal ``plain`` as ``logical``'s next copy into a free slot (updating the map;
        the slots it replaces retire), its ciphertext into chunk ``at`` of the scratch
        buffer: (slot, at, table entry) to write. Chunks of a batch are sealed in
        ``at`` order: each tag lands where the next one's ciphertext will go."""
        slots = bmap.chunks.get(logical, [])
        sequence = slots[0].sequence + 1 if slots else 1  # slots: newest first
        target = self._take_free(bmap)
        out = self._scratch_buffer()[at * CHUNK : (at + 1) * CHUNK + TAG_BYTES]
        nonce, tag = self._cipher.seal_into(logical, sequence, plain, out, nonce)
        # the first copy of a chunk has no older one to fall back on: a power cut may
        # keep its entry and lose its data, so it is marked until a flush confirms it
        first = current is None and all(slot.first for slot in slots)
        flags = _PRESENT | _BLOCK | (_FIRST if first else 0)
        entry = _ENTRY.pack(nonce, tag, sequence, logical, flags, b"")
        for slot in slots:  # the old content until the flush, torn leftovers at once
            (bmap.retired if slot is current else bmap.free).append(slot.physical)
        new = _Slot(target, sequence, nonce, tag, first=first)
        bmap.chunks[logical] = [new]
        if first:
            bmap.unconfirmed.append((logical, new))
        return target, at, entry

    def _scratch_buffer(self) -> memoryview:
        if self._scratch is None:  # made at the first write: most regions are only read
            self._scratch = memoryview(bytearray(_BATCH * CHUNK + TAG_BYTES))
        return self._scratch

    def _store(self, bmap: BlockMap, placed: list[tuple[int, int, bytes]]) -> None:
        """Write sealed chunks (slot, scratch chunk, entry): one data write and one
        table write per run adjacent both in the region and in the scratch buffer."""
        placed.sort()
        scratch = self._scratch_buffer()
        start = 0
        for i in range(1, len(placed) + 1):
            if (
                i < len(placed)
                and placed[i][0] == placed[i - 1][0] + 1
                and placed[i][1] == placed[i - 1][1] + 1
            ):
                continue
            run = placed[start:i]
            first, at = run[0][0], run[0][1]
            data = scratch[at * CHUNK : (at + len(run)) * CHUNK]
            self.backend.write(self._data(bmap.region, first), data)
            self.backend.write(bmap.region.offset + first * ENTRY, b"".join(p[2] for p in run))
            start = i
        bmap.dirty = bmap.dirty or bool(placed)

    def _current_slot(self, bmap: BlockMap, logical: int) -> _Slot | None:
        slots = bmap.chunks.get(logical)
        if not slots:
            return None
        if len(slots) == 1:
            return slots[0]  # nothing newer was ever torn over it
        try:
            return self._open(bmap, logical)[1]
        except IntegrityError:
            return None  # every slot is damaged: the whole chunk is replaced anyway

    def _take_free(self, bmap: BlockMap) -> int:
        if not bmap.free:
            self._collect(bmap, wait=True)
        if not bmap.free:
            self.flush(bmap)
        if not bmap.free:
            raise IntegrityError(f"{self.what}: no free chunk slot (table damaged)")
        return bmap.free.pop()

    def flush(self, bmap: BlockMap) -> None:
        """Make the written slots durable, then let the slots they replace be reused
        (never overwrite the only durable copy of a chunk)."""
        self._collect(bmap, wait=True)
        if bmap.dirty:
            self.backend.flush()
            bmap.dirty = False
        retired, bmap.retired = bmap.retired, []
        unconfirmed, bmap.unconfirmed = bmap.unconfirmed, []
        self._release(bmap, retired, unconfirmed)

    def _flush_ahead(self, bmap: BlockMap) -> None:
        """Once half the reusable slots wait for a flush, start one in the background
        for them (every chunk that replaces them is written by now), so a rewrite of a
        whole region seals on while the disk syncs instead of stopping at each fsync."""
        self._collect(bmap, wait=False)
        if self._ahead is None and bmap.retired and len(bmap.retired) >= len(bmap.free):
            waiting, bmap.retired = bmap.retired, []
            first, bmap.unconfirmed = bmap.unconfirmed, []
            done: Future[None] = Future()
            self._ahead = (done, bmap, waiting, first)
            threading.Thread(
                target=_settle, args=(done, self.backend.flush), name="region-flush", daemon=True
            ).start()

    def _collect(self, bmap: BlockMap, wait: bool) -> None:
        """Free the slots of a background flush that is over (or, ``wait``, once it
        is). If it failed, they stay retired and the error is raised."""
        if self._ahead is None or not (wait or self._ahead[0].done()):
            return
        (done, owner, waiting, first), self._ahead = self._ahead, None
        try:
            done.result()
        except BaseException:
            owner.retired.extend(waiting)
            owner.unconfirmed.extend(first)
            raise
        if owner is bmap:  # a map read again since then sees them as older copies
            self._release(bmap, waiting, first)

    def settle(self) -> None:
        """Wait for a background flush (before the backend closes); errors are the
        next flush's to report, since they left its slots retired."""
        if self._ahead is not None:
            self._ahead[0].exception()

    def _release(
        self, bmap: BlockMap, slots: list[int], first: list[tuple[int, _Slot]]
    ) -> None:
        """After a flush: clear the table entries of ``slots`` (older copies, now
        superseded by durable ones) and make them free: one copy per chunk from then on,
        so a tampered one fails. Confirm the ``first`` copies the flush made durable
        (their entries lose the mark, so a tampered one fails too)."""
        for logical, slot in first:
            if slot.first and slot in bmap.chunks.get(logical, ()):  # still a copy
                slot.first = False
                entry = _ENTRY.pack(
                    slot.nonce, slot.tag, slot.sequence, logical, _PRESENT | _BLOCK, b""
                )
                self.backend.write(bmap.region.offset + slot.physical * ENTRY, entry)
        retired = sorted(slots)
        start = 0
        for i in range(1, len(retired) + 1):
            if i == len(retired) or retired[i] != retired[i - 1] + 1:
                at = bmap.region.offset + retired[start] * ENTRY
                self.backend.write(at, bytes((i - start) * ENTRY))
                start = i
        bmap.free.extend(reversed(slots))


def _settle(done: Future[None], work: Callable[[], None]) -> None:
    try:
        work()
    except BaseException as exc:  # handed to whoever collects it
        done.set_exception(exc)
    else:
        done.set_result(None)


def convert(backend: BlockBackend, region: Region) -> Region:
    """Make a VALID (or EMPTY, or WRITING) region's table a block-format table: entries
    past the content (staging leftovers, older content) are cleared, the content's own
    chunks stay as they are. Returns the region to commit (status BLOCKS); the caller
    flushes and commits. Crash-safe: nothing the old status reads is touched."""
    keep = sealed.chunks_of(region.used) if region.status is RegionStatus.VALID else 0
    count = slots_of(region.length)
    if keep > count - spare_of(region.length):
        raise IntegrityError(
            f"the region holds {region.used} bytes, more than its block view's "
            f"{block_capacity(region.length)}; grow it first"
        )
    backend.write(region.offset + keep * ENTRY, bytes((count - keep) * ENTRY))
    used = region.used if keep else 0
    return Region(
        region.kind,
        region.offset,
        region.length,
        region.encrypted,
        RegionStatus.BLOCKS,
        region.generation if keep else region.generation + 1,
        used,
    )


def read_image(
    backend: BlockBackend,
    region: Region,
    data_key: bytes,
    unit_uuid: uuid.UUID,
    kind: RegionKind,
    what: str,
) -> Iterator[bytes]:
    """The ``region.used`` bytes of a BLOCKS region, chunk by chunk (authenticated)."""
    codec = BlockCodec(backend, data_key, unit_uuid, kind, what)
    bmap = BlockMap.scan(backend, region)
    for index in range(sealed.chunks_of(region.used)):
        plain = codec.read_chunk(bmap, index)
        yield plain[: min(CHUNK, region.used - index * CHUNK)]
