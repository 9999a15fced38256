"""The on-unit format: a self-describing unit header kept in two slots at the unit's tail.

US 9,354,927 marks a storage unit "by writing a partition type into a root partition"
and adds "a checksum ... coded into the virtual machine data", so that "a discovery
operation would then search for both" (US 9,354,927: provisioning, marking). Our header is that
mark: a magic marker, a format version, the unit UUID, the unit's NAA designator (what
INQUIRY VPD 0x83 reports, SPC-4 §7.8.6.6.5), the region table and a SHA-256 checksum.

Where it lives. In ``truncate`` mode the guest's disk starts at byte 0 of the unit (the
patent's truncation "obviates modification of I/O requests with offsets"), so the guest
owns LBA 0 and may rewrite any partition table there. The only place that belongs to us
in every mode is the end, so the header lives in the last MiB of the unit (the META
region), in two 8 KiB slots A and B. Modes that keep LBA 0 for us (``offset``,
``aligned``) also get a GPT naming every region (:mod:`.gpt`), for sgdisk/partx/blkid.

Crash atomicity: an update writes the slot holding the older generation and flushes;
a reader takes the valid slot with the highest generation. A torn slot fails its
checksum and the other slot still holds the previous header.

Slot layout, format version 1 (little-endian, like GPT; offsets in bytes)::

      0  8  magic "IVMTUNIT"
      8  2  format version (1)
     10  2  header length N: bytes covered by the checksum (every version keeps
            this field here, so a newer header is still recognised as ours)
     12  4  flags (reserved, 0)
     16  8  generation
     24 16  unit UUID
     40 16  NAA designator (NAA 6, 16 bytes, SPC-4 §7.8.6.6.5)
     56  1  role (1 base, 2 secondary)
     57  1  concealment mode (0 truncate, 1 offset, 2 aligned)
     58  1  unit state (0 clean, 1 resizing, 2 scrubbing)
     59  1  reserved
     60  4  logical block size
     64  8  unit size in bytes
     72  8  creation time (seconds since the epoch)
     80 16  owner UUID (the base unit of the VM; itself for a base unit)
     96 64  VM name (UTF-8, NUL padded)
    160  8  master key id of the wrapping key
    168  2  wrapped data key length (40 for RFC 3394 of a 256-bit key; 0 = no key)
    170  6  reserved
    176 48  wrapped data key
    224  2  region count R
    226  2  secondary count S
    228  2  pending move count M
    230  2  pending scrub count Z
    232 24  reserved in version 1; version 2: 232 16 parent layer UUID (a delta
            unit's parent in its snapshot chain; zeros otherwise), 248 2 top count T,
            250 6 reserved
    256     R x 48  regions: kind u8, flags u8 (bit 0 encrypted), status u8, 0 u8,
                    0 u32, offset u64, length u64, generation u64, used u64, 0 u64
            S x 16  NAA designators of the VM's secondary-disk units (US 9,354,927: "the base
                    unit will identify a globally unique ID such as SCSI Inquiry VPD
                    page 0x83 for a secondary virtual disk")
            M x 24  pending moves of a resize: source u64, destination u64, length u64
            Z x 16  pending scrubs of a resize: offset u64, length u64
            T x 32  version 2, base units: the live top layer of each volume of the VM,
                    volume NAA (16) + top layer unit UUID (16) (:mod:`..operations.snapshot`)
      N 32  SHA-256 of bytes 0..N

Version 2 (snapshots, US 9,354,927: "snapshot metadata" kept with the VM) adds two roles, DELTA
(a copy-on-write layer of one volume) and SNAPSHOT (a snapshot record: the VM's state
and config when the snapshot was taken, and its sealed snapshot metadata), the parent
layer UUID and the tops list. A unit that needs none of them is still written as
version 1, so VMs without snapshots stay readable by version-1 readers; version-1
readers report a version-2 unit as newer and leave it alone.

Version 3 (issue 14) is version 2 plus one region status, BLOCKS (4): a state or config
region a hypervisor writes through its LUN, in the block format of :mod:`.sealed_blocks`.
Only a unit with such a region is written as version 3; version-2 readers refuse it as
newer instead of misreading its chunks.
"""

from __future__ import annotations

import hashlib
import itertools
import struct
import uuid
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import Final

from ...storage.backend import BlockBackend
from ..vm_errors import FormatError, NewerFormatError

MAGIC: Final = b"IVMTUNIT"
FORMAT_VERSION: Final = 3
BLOCK: Final = 512
MIB: Final = 1 << 20
#: Every region starts on a MiB boundary (the alignment partitioning tools use).
ALIGN: Final = MIB
#: The META region: the last MiB of every unit, holding the header slots.
TAIL_SIZE: Final = MIB
SLOT_SIZE: Final = 8192
SLOT_OFFSETS: Final = (0, SLOT_SIZE)  # relative to the start of the META region
#: LBA 0 area of ``offset``/``aligned`` units: protective MBR + primary GPT, and in
#: ``aligned`` mode the size of the guest's own partition-table area kept hidden.
LABEL_SIZE: Final = MIB
MAX_NAME_BYTES: Final = 64
MAX_SECONDARIES: Final = 64

_FIXED = struct.Struct("<8sHHIQ16s16sBBBBIQQ16s64s8sH6s48sHHHH24s")
_REGION = struct.Struct("<BBBBIQQQQQ")
_MOVE = struct.Struct("<QQQ")
_EXTENT = struct.Struct("<QQ")
_TOP = struct.Struct("<16s16s")
_V2 = struct.Struct("<16sH6s")
_CHECKSUM_BYTES: Final = 32
assert _FIXED.size == 256 and _REGION.size == 48


class Mode(IntEnum):
    """Concealment mode (US 9,354,927: truncation, offsets, alignment)."""

    TRUNCATE = 0  # non-disk data after the disk; capacity truncated
    OFFSET = 1  # non-disk data first; guest LBAs shifted
    ALIGNED = 2  # disk aligned with LBA 0; the guest's partition table kept hidden

    @classmethod
    def parse(cls, text: str) -> Mode:
        try:
            return cls[text.upper()]
        except KeyError:
            raise ValueError(f"unknown mode {text!r} (use truncate, offset or aligned)") from None


class Role(IntEnum):
    BASE = 1  # holds the VM's state, config and primary disk
    SECONDARY = 2  # a secondary disk, named by the base unit
    DELTA = 3  # version 2: a copy-on-write layer of one volume (grains + allocation map)
    SNAPSHOT = 4  # version 2: a snapshot record (state, config, sealed snapshot metadata)


class UnitState(IntEnum):
    CLEAN = 0
    RESIZING = 1  # moves pending: roll forward by copying again
    SCRUBBING = 2  # moves done: stale ranges still to be zeroed


class RegionKind(IntEnum):
    DISK = 1  # the guest's primary (or secondary) disk
    STATE = 2  # execution state (memory image), encrypted
    CONFIG = 3  # virtual hardware configuration, encrypted
    SNAPMETA = 4  # snapshot metadata, encrypted
    GUEST_HEAD = 5  # aligned mode: the guest's first MiB (its partition table)
    LABEL = 6  # protective MBR + primary GPT (offset, aligned)
    META = 7  # the tail: header slots and the backup GPT
    ALLOCMAP = 8  # version 2, delta units: one bit per grain held by the layer


class RegionStatus(IntEnum):
    EMPTY = 0
    VALID = 1
    WRITING = 2  # a write was started and not finished: the content is unusable
    STAGED = 3  # complete in the staging chunks (sealed.py); the copy to chunk 0 is owed
    BLOCKS = 4  # version 3: chunks in the block format of sealed_blocks.py (hypervisor view)


ENCRYPTED_KINDS: Final = frozenset({RegionKind.STATE, RegionKind.CONFIG, RegionKind.SNAPMETA})


@dataclass(frozen=True)
class Region:
    """One region of a unit: a byte extent plus, for encrypted regions, what is stored."""

    kind: RegionKind
    offset: int
    length: int
    encrypted: bool = False
    status: RegionStatus = RegionStatus.EMPTY
    generation: int = 0  # bumped on every rewrite of an encrypted region
    used: int = 0  # plaintext bytes stored

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class Move:
    """A copy of ``length`` bytes from ``src`` to ``dst`` that a resize still owes."""

    src: int
    dst: int
    length: int


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int


@dataclass(frozen=True)
class UnitHeader:
    """The decoded header of one unit."""

    unit_uuid: uuid.UUID
    naa: bytes
    role: Role
    mode: Mode
    unit_size: int
    regions: tuple[Region, ...]
    name: str = ""
    owner_uuid: uuid.UUID | None = None
    block_size: int = BLOCK
    created: int = 0
    key_id: bytes = bytes(8)
    wrapped_key: bytes = b""
    secondaries: tuple[bytes, ...] = ()
    state: UnitState = UnitState.CLEAN
    moves: tuple[Move, ...] = ()
    scrubs: tuple[Extent, ...] = ()
    generation: int = 0
    version: int = field(default=FORMAT_VERSION, compare=False)  # as read; written: 1 or 2
    parent_uuid: uuid.UUID | None = None  # version 2: a delta's parent layer
    tops: tuple[tuple[bytes, uuid.UUID], ...] = ()  # version 2: (volume NAA, top layer)

    @property
    def needs_v2(self) -> bool:
        """Whether this header uses a version-2 feature (else it is written as v1)."""
        return (
            self.role in (Role.DELTA, Role.SNAPSHOT)
            or bool(self.tops)
            or self.parent_uuid is not None
        )

    def top_of(self, naa: bytes, default: uuid.UUID) -> uuid.UUID:
        """The live top layer of the volume ``naa`` (``default``: the volume's unit)."""
        for volume, top in self.tops:
            if volume == naa:
                return top
        return default

    def region(self, kind: RegionKind) -> Region | None:
        for region in self.regions:
            if region.kind is kind:
                return region
        return None

    def require_region(self, kind: RegionKind) -> Region:
        region = self.region(kind)
        if region is None:
            raise FormatError(f"unit {self.unit_uuid} has no {kind.name.lower()} region")
        return region

    def with_region(self, new: Region) -> UnitHeader:
        """A copy with the region of the same kind replaced by ``new``."""
        regions = tuple(new if r.kind is new.kind else r for r in self.regions)
        return replace(self, regions=regions)

    @property
    def guest_segments(self) -> tuple[Region, ...]:
        """The regions a guest view concatenates, in guest LBA order.

        ``aligned``: the hidden GUEST_HEAD (guest LBAs below 1 MiB, where the guest's
        partition table lives) then the DISK region, which sits at the same unit
        offsets as the guest LBAs it serves. Other modes: the DISK region alone.
        """
        disk = self.require_region(RegionKind.DISK)
        if self.mode is Mode.ALIGNED:
            return (self.require_region(RegionKind.GUEST_HEAD), disk)
        return (disk,)

    @property
    def disk_size(self) -> int:
        """What READ CAPACITY reports to a guest, in bytes."""
        return sum(r.length for r in self.guest_segments)

    @property
    def meta_offset(self) -> int:
        return self.unit_size - TAIL_SIZE


def encode_header(h: UnitHeader) -> bytes:
    """The 8 KiB slot image of ``h`` (layout in the module docstring)."""
    name = h.name.encode()
    if len(name) > MAX_NAME_BYTES:
        raise ValueError(f"name {h.name!r} is longer than {MAX_NAME_BYTES} bytes")
    if len(h.wrapped_key) > 48 or len(h.key_id) != 8 or len(h.naa) != 16:
        raise ValueError("bad key or designator length")
    v3 = any(r.status is RegionStatus.BLOCKS for r in h.regions)
    v2 = h.needs_v2 or v3
    reserved = _V2.pack((h.parent_uuid or uuid.UUID(int=0)).bytes, len(h.tops), b"") if v2 else b""
    fixed = _FIXED.pack(
        MAGIC,  # marker
        3 if v3 else 2 if v2 else 1,  # format version: the oldest that holds h
        0,  # header length, patched below
        0,  # flags
        h.generation,  # generation
        h.unit_uuid.bytes,  # unit UUID
        h.naa,  # NAA designator
        h.role,  # role
        h.mode,  # concealment mode
        h.state,  # unit state
        0,  # reserved
        h.block_size,  # logical block size
        h.unit_size,  # unit size
        h.created,  # creation time
        (h.owner_uuid or h.unit_uuid).bytes,  # owner UUID
        name,  # VM name, NUL padded by struct
        h.key_id,  # master key id
        len(h.wrapped_key),  # wrapped key length
        b"",  # reserved
        h.wrapped_key,  # wrapped data key, NUL padded
        len(h.regions),
        len(h.secondaries),
        len(h.moves),
        len(h.scrubs),
        reserved,  # version 2: parent layer UUID, top count
    )
    parts = [fixed]
    for r in h.regions:
        parts.append(
            _REGION.pack(
                r.kind,  # region kind
                0x01 if r.encrypted else 0,  # flags: bit 0 encrypted
                r.status,  # content status
                0,
                0,
                r.offset,  # byte offset in the unit
                r.length,  # byte length
                r.generation,  # content generation (AEAD associated data)
                r.used,  # plaintext bytes stored
                0,
            )
        )
    parts.extend(bytes(n) for n in h.secondaries)
    parts.extend(_MOVE.pack(m.src, m.dst, m.length) for m in h.moves)
    parts.extend(_EXTENT.pack(e.offset, e.length) for e in h.scrubs)
    parts.extend(_TOP.pack(naa, top.bytes) for naa, top in h.tops)
    body = bytearray(b"".join(parts))
    length = len(body)
    if length + _CHECKSUM_BYTES > SLOT_SIZE:
        raise ValueError("unit header does not fit its slot")
    struct.pack_into("<H", body, 10, length)  # header length
    body += hashlib.sha256(body).digest()  # checksum
    return bytes(body.ljust(SLOT_SIZE, b"\0"))


def decode_header(slot: bytes | bytearray | memoryview) -> UnitHeader:
    """Parse one slot; FormatError (NewerFormatError for a newer version) if unusable."""
    buf = bytes(slot)
    if buf[:8] != MAGIC:
        raise FormatError("no unit marker")
    (length,) = struct.unpack_from("<H", buf, 10)
    if not _FIXED.size <= length <= SLOT_SIZE - _CHECKSUM_BYTES:
        raise FormatError(f"header length {length} out of range")
    if hashlib.sha256(buf[:length]).digest() != buf[length : length + _CHECKSUM_BYTES]:
        raise FormatError("header checksum mismatch")
    (
        _magic,
        version,
        _length,
        _flags,
        generation,
        unit_uuid,
        naa,
        role,
        mode,
        state,
        _r0,
        block_size,
        unit_size,
        created,
        owner,
        name,
        key_id,
        key_len,
        _r1,
        wrapped,
        n_regions,
        n_secondaries,
        n_moves,
        n_scrubs,
        reserved,
    ) = _FIXED.unpack_from(buf, 0)
    if version > FORMAT_VERSION:
        raise NewerFormatError(
            f"format version {version} (this iscsi-vmtarget reads version "
            f"{FORMAT_VERSION} and older); upgrade iscsi-vmtarget to use it"
        )
    parent_raw, n_tops = b"", 0
    if version >= 2:
        parent_raw, n_tops, _r3 = _V2.unpack(reserved)
    need = (
        n_tops * _TOP.size
        + _FIXED.size
        + n_regions * _REGION.size
        + n_secondaries * 16
        + n_moves * _MOVE.size
        + n_scrubs * _EXTENT.size
    )
    if need != length or key_len > 48:
        raise FormatError("header lengths are inconsistent")
    try:
        pos = _FIXED.size
        regions = []
        for _ in range(n_regions):
            kind, flags, status, _a, _b, off, ln, gen, used, _c = _REGION.unpack_from(buf, pos)
            regions.append(
                Region(
                    RegionKind(kind),
                    off,
                    ln,
                    bool(flags & 0x01),
                    RegionStatus(status),
                    gen,
                    used,
                )
            )
            pos += _REGION.size
        secondaries = []
        for _ in range(n_secondaries):
            secondaries.append(buf[pos : pos + 16])
            pos += 16
        moves = []
        for _ in range(n_moves):
            moves.append(Move(*_MOVE.unpack_from(buf, pos)))
            pos += _MOVE.size
        scrubs = []
        for _ in range(n_scrubs):
            scrubs.append(Extent(*_EXTENT.unpack_from(buf, pos)))
            pos += _EXTENT.size
        tops = []
        for _ in range(n_tops):
            top_naa, top = _TOP.unpack_from(buf, pos)
            tops.append((top_naa, uuid.UUID(bytes=top)))
            pos += _TOP.size
        header = UnitHeader(
            unit_uuid=uuid.UUID(bytes=unit_uuid),
            naa=naa,
            role=Role(role),
            mode=Mode(mode),
            unit_size=unit_size,
            regions=tuple(regions),
            name=name.rstrip(b"\0").decode(),
            owner_uuid=uuid.UUID(bytes=owner),
            block_size=block_size,
            created=created,
            key_id=key_id,
            wrapped_key=wrapped[:key_len],
            secondaries=tuple(secondaries),
            state=UnitState(state),
            moves=tuple(moves),
            scrubs=tuple(scrubs),
            generation=generation,
            version=version,
            parent_uuid=(uuid.UUID(bytes=parent_raw) if parent_raw and any(parent_raw) else None),
            tops=tuple(tops),
        )
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"header field out of range: {exc}") from exc
    _check_geometry(header)
    return header


def _check_geometry(h: UnitHeader) -> None:
    """Regions inside the unit and disjoint; the META region at the tail."""
    if h.block_size != BLOCK or h.unit_size < TAIL_SIZE or h.unit_size % ALIGN:
        raise FormatError("unit geometry out of range")
    spans = sorted((r.offset, r.end, r.kind.name) for r in h.regions)
    for (_s0, e0, k0), (s1, _e1, k1) in itertools.pairwise(spans):
        if s1 < e0:
            raise FormatError(f"regions {k0} and {k1} overlap")
    if any(r.end > h.unit_size or r.length <= 0 for r in h.regions):
        raise FormatError("a region lies outside the unit")
    meta = h.region(RegionKind.META)
    if meta is None or meta.offset != h.unit_size - TAIL_SIZE:
        raise FormatError("META region is not at the tail")
    if h.region(RegionKind.DISK) is None and h.role is not Role.SNAPSHOT:
        raise FormatError("no disk region")


@dataclass(frozen=True)
class SlotScan:
    """What the two header slots of a unit hold."""

    header: UnitHeader | None  # the newest valid one
    slot: int  # index of that slot (0 = A, 1 = B), -1 if none
    problems: tuple[str, ...]  # why the other slots were not usable
    marked: bool  # at least one slot carries our marker

    @property
    def foreign(self) -> bool:
        return self.header is None and not self.marked


def scan_slots(backend: BlockBackend) -> SlotScan:
    """Read both header slots from the tail of ``backend`` and pick the newest valid one.

    Raises NewerFormatError if the newest marked slot is from a newer format version.
    """
    size = backend.size
    if size < TAIL_SIZE or size % ALIGN:
        return SlotScan(None, -1, (f"size {size} is not a whole number of MiB",), False)
    base = size - TAIL_SIZE
    raw = backend.read(base, 2 * SLOT_SIZE)
    best: UnitHeader | None = None
    best_slot = -1
    problems: list[str] = []
    marked = False
    newer: NewerFormatError | None = None
    for index, rel in enumerate(SLOT_OFFSETS):
        slot = raw[rel : rel + SLOT_SIZE]
        if slot[:8] == MAGIC:
            marked = True
        try:
            header = decode_header(slot)
        except NewerFormatError as exc:
            newer = exc
            continue
        except FormatError as exc:
            problems.append(f"slot {'AB'[index]}: {exc}")
            continue
        if header.unit_size != size:
            problems.append(f"slot {'AB'[index]}: records unit size {header.unit_size}")
            continue
        if best is None or header.generation > best.generation:
            best, best_slot = header, index
    if newer is not None:  # never touch (or half-read) a unit of a newer version
        raise newer
    return SlotScan(best, best_slot, tuple(problems), marked)


def write_slot(backend: BlockBackend, header: UnitHeader, slot: int) -> None:
    """Write ``header`` into slot ``slot`` of the META region (no flush)."""
    backend.write(header.meta_offset + SLOT_OFFSETS[slot], encode_header(header))
