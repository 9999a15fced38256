"""Chunked AES-GCM storage inside one encrypted region (state, config, snapshot metadata).

Region layout: a chunk table, then the data chunks, each 64 KiB of ciphertext at a
64 KiB-aligned offset (ciphertext is as long as its plaintext in GCM, so data stays
aligned; the tags live in the table)::

    region.offset                table: one 64-byte entry per data chunk, padded to
                                 whole chunks
    region.offset + table_bytes  chunk 0, chunk 1, ...

Table entry (little-endian): nonce (12), tag (16), generation u64, plaintext length
u32, flags u32 (bit 0: present), 20 reserved. The entry's generation is informative;
the generation that counts is the region's, in the unit header, and it is part of the
associated data (:mod:`.crypto`).

Only ciphertext is ever written: plaintext exists in memory one chunk at a time.

A rewrite that fits the region twice (the config, the snapshot metadata, a small state
image) is crash-atomic: it is sealed into the *staging* chunks at the end of the
region, past every chunk the committed content uses, and the header commit marking the
region STAGED (new generation, new length) is the switch; the staged chunks and their
table entries are then copied to chunk 0 onwards and a commit marks it VALID. A crash
before the STAGED commit leaves the old content untouched; after it, the content is
read from the staging chunks until the copy is finished (:meth:`Unit.open` repairs it).
The AEAD binds the chunk's logical index, not its place, so a copy stays valid. A
rewrite too large for that is done in place under status WRITING: a crash then leaves
no usable content (:meth:`Unit.write_region` says so).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from typing import Final

from ...storage.backend import BlockBackend
from ..vm_errors import IntegrityError
from .crypto import RegionCipher
from .header import ALIGN, Move, Region, RegionStatus

CHUNK: Final = 64 * 1024
ENTRY: Final = 64
_ENTRY = struct.Struct("<12s16sQII20s")
_PRESENT: Final = 0x01


def table_bytes(length: int) -> int:
    """Bytes of chunk table at the start of a region of ``length`` bytes."""
    entries = length // CHUNK
    return -(-entries * ENTRY // CHUNK) * CHUNK


def capacity(length: int) -> int:
    """Plaintext bytes a region of ``length`` bytes holds."""
    return length - table_bytes(length)


def length_for(plaintext: int) -> int:
    """Smallest MiB-aligned region length holding ``plaintext`` bytes."""
    length = max(ALIGN, -(-plaintext // ALIGN) * ALIGN)
    while capacity(length) < plaintext:
        length += ALIGN
    return length


def chunks_of(used: int) -> int:
    return -(-used // CHUNK)


def staging_slot(region: Region, length: int) -> int | None:
    """The first staging chunk for a rewrite of ``length`` bytes: the last chunks of
    the region, clear of the chunks the committed content uses and of those the copy
    will fill. None: too large to stage, the rewrite goes in place."""
    if region.status is RegionStatus.BLOCKS:
        return None  # block format (sealed_blocks.py): any slot may hold live content
    new = chunks_of(length)
    old = chunks_of(region.used) if region.status is RegionStatus.VALID else 0
    first = capacity(region.length) // CHUNK - new
    return first if new and first >= max(new, old) else None


def first_slot(region: Region) -> int:
    """Where ``region``'s content starts: chunk 0, or the staging chunks while STAGED."""
    if region.status is not RegionStatus.STAGED:
        return 0
    return capacity(region.length) // CHUNK - chunks_of(region.used)


def move_plan(old: Region, new: Region) -> list[Move]:
    """Copies that carry ``old``'s table entries and used chunks into ``new`` (the same
    status and length of content; staged content lands in ``new``'s staging chunks)."""
    if not old.used and old.status is not RegionStatus.BLOCKS:
        return []
    used_chunks = chunks_of(old.used)
    src, dst = first_slot(old), first_slot(new)
    if old.status is RegionStatus.BLOCKS:  # chunks anywhere (sealed_blocks.py): all slots
        used_chunks = capacity(old.length) // CHUNK
    return [
        Move(old.offset + src * ENTRY, new.offset + dst * ENTRY, used_chunks * ENTRY),
        Move(
            old.offset + table_bytes(old.length) + src * CHUNK,
            new.offset + table_bytes(new.length) + dst * CHUNK,
            used_chunks * CHUNK,
        ),
    ]


def unstage(backend: BlockBackend, region: Region) -> None:
    """Copy a STAGED region's table entries and chunks to chunk 0 onwards (idempotent:
    the staging chunks are never a target). The caller flushes and commits VALID."""
    count, first = chunks_of(region.used), first_slot(region)
    backend.write(region.offset, backend.read(region.offset + first * ENTRY, count * ENTRY))
    data_base = region.offset + table_bytes(region.length)
    for index in range(count):
        length = min(CHUNK, region.used - index * CHUNK)
        piece = backend.read(data_base + (first + index) * CHUNK, length)
        backend.write(data_base + index * CHUNK, piece)


def write_chunks(
    backend: BlockBackend,
    region: Region,
    generation: int,
    cipher: RegionCipher,
    pieces: Iterable[bytes],
    first: int = 0,
) -> int:
    """Encrypt ``pieces`` (each exactly CHUNK bytes but the last) into ``region``
    under ``generation``, from chunk ``first`` on (the staging chunks) or chunk 0;
    return the plaintext length. The caller flushes."""
    data_base = region.offset + table_bytes(region.length)
    limit = capacity(region.length) - first * CHUNK
    table = bytearray()
    total = 0
    for index, piece in enumerate(pieces):
        if total + len(piece) > limit:
            raise ValueError("plaintext exceeds the region's capacity")
        nonce, ciphertext, tag = cipher.seal(index, generation, piece)  # logical index
        backend.write(data_base + (first + index) * CHUNK, ciphertext)
        table += _ENTRY.pack(nonce, tag, generation, len(piece), _PRESENT, b"")
        total += len(piece)
    if table:
        backend.write(region.offset + first * ENTRY, table)
    return total


def read_chunks(
    backend: BlockBackend, region: Region, cipher: RegionCipher, what: str
) -> Iterator[bytes]:
    """Decrypt the ``region.used`` bytes of ``region``, chunk by chunk, checking each
    against the header's generation and expected length."""
    count, first = chunks_of(region.used), first_slot(region)
    table = backend.read(region.offset + first * ENTRY, count * ENTRY)
    data_base = region.offset + table_bytes(region.length) + first * CHUNK
    for index in range(count):
        nonce, tag, generation, length, flags, _ = _ENTRY.unpack_from(table, index * ENTRY)
        expected = min(CHUNK, region.used - index * CHUNK)
        if not flags & _PRESENT or length != expected:
            raise IntegrityError(
                f"{what}: chunk {index} is missing or has the wrong length "
                "(tampered or torn); refusing to return its bytes"
            )
        if generation != region.generation:
            raise IntegrityError(
                f"{what}: chunk {index} belongs to generation {generation}, the header "
                f"says {region.generation} (swapped or stale chunk)"
            )
        ciphertext = bytes(backend.read(data_base + index * CHUNK, length))
        yield cipher.open(index, region.generation, nonce, ciphertext, tag, what)


def read_chunk(
    backend: BlockBackend, region: Region, cipher: RegionCipher, index: int, what: str
) -> bytes:
    """Chunk ``index`` of ``region``'s content alone (what :func:`read_chunks` yields
    for it): random access for a region's block view (:mod:`.region_backend`)."""
    first = first_slot(region)
    entry = backend.read(region.offset + (first + index) * ENTRY, ENTRY)
    nonce, tag, generation, length, flags, _ = _ENTRY.unpack(entry)
    expected = min(CHUNK, region.used - index * CHUNK)
    if not flags & _PRESENT or length != expected or generation != region.generation:
        raise IntegrityError(
            f"{what}: chunk {index} is missing, stale or has the wrong length "
            "(tampered or torn); refusing to return its bytes"
        )
    data_base = region.offset + table_bytes(region.length) + first * CHUNK
    ciphertext = bytes(backend.read(data_base + index * CHUNK, length))
    return cipher.open(index, region.generation, nonce, ciphertext, tag, what)
