"""The replica: a VM's last coherent checkpoint as ``vm replicate`` keeps it on a LUN of
another target, and the redo journal that keeps it coherent while a round is written.

US 9,354,927 (continuous data protection): "running the move command operations 24 7 without
the final suspend resume. Periodic check points ... coincident with the replica
updates. At any point in time the virtual machine may be resumed at the destination
... based on the last coherent replica." The destination is a plain LUN (for our own
target, the file ``vm receive`` creates); everything below is bytes on that LUN, written
by the source with WRITE(16) and made durable with SYNCHRONIZE CACHE(16), so any target
can hold a replica. Layout (offsets in bytes, every area MiB aligned)::

    0         superblock slot A  (1 MiB)
    1 MiB     superblock slot B  (1 MiB)
    2 MiB     per volume (LUN order): its guest disk image area, then its grain hashes
              (32 bytes per 64 KiB grain: SHA-256 of the grain, all zeros for a grain
              that reads as zeros)
    ...       STATE area, CONFIG area: the sealed regions of the checkpoint's snapshot
              record, byte for byte (chunk table + AES-GCM chunks, :mod:`..format.sealed`)
    ...       journal: room for a round that rewrites every area

Superblock slot (little-endian)::

     0  8  magic "IVMTREPL"
     8  2  version (2)
    10  2  flags (0)
    12  4  body length B
    16  8  generation (the slot written last holds the highest valid one)
    24  B  body: UTF-8 JSON - checkpoint sequence number, snapshot record UUID and
           name, VM name, per volume the source's unit header (its own encoded image,
           with its SHA-256, :mod:`..format.header`), its image size and capacity, the area
           offsets, and the journal state
    24+B 32 SHA-256 of bytes 0 .. 24+B

A volume's *size* is the size of the checkpoint's image - its snapshot chain's
(:func:`~.snapshot.chain_size`), which is larger than the unit header's once the disk
grew while it had snapshots (:mod:`.snapshot_resize`) - and is what promote restores.
Its *capacity* is what the image area holds: a new replica spreads the LUN's room
beyond the minimum over its disks in proportion to their sizes (:func:`plan`), so a
disk may grow between rounds up to its capacity; past it the round is refused (a new
replica is needed). Version 1 (before sizes were recorded) had neither field: both are
the unit header's disk size there, which is right for every replica it could make but
one of a disk grown with snapshots - whose next round is then refused, as its chain no
longer fits. A replica is written as version 2 by its next round; older code refuses
version 2 ("upgrade"), since it would restore a grown disk's old size.

Journal entry: one 512-byte descriptor (magic "IVMTJRNL", sequence u64, index u32,
flags u32 (bit 0: the range reads as zeros, no data follows), target offset u64, length
u64) followed by ``length`` bytes of data.

Coherence - a round never touches the previous checkpoint before the new one is
durable somewhere else on the LUN:

1. the round's pieces (grains, grain-hash sectors, sealed regions) are *staged* in the
   journal, then SYNCHRONIZE CACHE;
2. the commit record: a superblock naming the new checkpoint and the journal's length
   and SHA-256, written to the older slot, then SYNCHRONIZE CACHE - the commit point;
3. the pieces are *applied* to their areas, SYNCHRONIZE CACHE, and a superblock with
   the journal cleared is written.

Interrupted before 2, the superblock still names the previous checkpoint and the areas
hold it untouched: the journal's content is ignored (discarded). Interrupted after 2,
:func:`replay` (``vm promote``, or the next round) applies the journal again - each
entry is idempotent - after checking its SHA-256. A torn superblock write fails its
checksum and the other slot still holds the previous generation. The first round has
no checkpoint to protect: it writes the areas directly and commits sequence 1.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

from ...storage.backend import BlockBackend
from .. import faults
from ..format.header import SLOT_SIZE, Region, RegionKind, UnitHeader, decode_header, encode_header
from ..layers.cow import grains_of, is_zero
from ..vm_errors import FormatError, IntegrityError, SizeError, VmError

MAGIC: Final = b"IVMTREPL"
JOURNAL_MAGIC: Final = b"IVMTJRNL"
VERSION: Final = 2
MIB: Final = 1 << 20
BLOCK: Final = 512
SB_SLOT: Final = MIB
SB_OFFSETS: Final = (0, MIB)
DATA_START: Final = 2 * MIB
HASH_BYTES: Final = 32
#: Largest piece of one journal entry (grains are merged into runs up to this).
RUN: Final = MIB
ZERO_FLAG: Final = 0x01
_FIXED = struct.Struct("<8sHHIQ")
_ENTRY = struct.Struct("<8sQIIQQ")
ZERO_HASH: Final = bytes(HASH_BYTES)


class ReplicaError(VmError):
    """A replica that cannot be used as asked (the message says why)."""


def align_mib(value: int) -> int:
    return -(-value // MIB) * MIB


def align_block(value: int) -> int:
    return -(-value // BLOCK) * BLOCK


def grain_hash(data: bytes | bytearray | memoryview) -> bytes:
    """What the hash area holds for a grain: zeros for a grain of zeros, else SHA-256."""
    if is_zero(data):
        return ZERO_HASH
    return hashlib.sha256(data).digest()


# -- unit header images (kept with their own checksum) ----------------------------------


def header_image(header: UnitHeader) -> str:
    image = encode_header(header)
    (length,) = struct.unpack_from("<H", image, 10)
    return base64.b64encode(image[: length + 32]).decode()


def header_from_image(text: str) -> UnitHeader:
    """Decode (and checksum) a header image; FormatError if damaged."""
    raw = base64.b64decode(text.encode(), validate=True)
    return decode_header(raw.ljust(SLOT_SIZE, b"\0"))


# -- the superblock ----------------------------------------------------------------------


#: A volume to lay out: its unit's header and its image's size (:class:`VolumeArea`).
Volume = tuple[UnitHeader, int]


@dataclass(frozen=True)
class VolumeArea:
    """One volume of the VM: its source unit's header (identity and mode; its disk size
    is the unit's, not the image's), where its image lives and how large it is."""

    header: UnitHeader
    image: int
    hashes: int  # -1: no hash area (a disk-only replica)
    size: int  # bytes of the checkpoint's image (its chain's size)
    capacity: int  # bytes the image area holds: the most ``size`` may grow to here

    def to_json(self) -> dict[str, object]:
        return {
            "header": header_image(self.header),
            "image": self.image,
            "hashes": self.hashes,
            "size": self.size,
            "capacity": self.capacity,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> VolumeArea:
        header = header_from_image(doc["header"])
        size = int(doc.get("size", header.disk_size))  # version 1: the unit's (docstring)
        capacity = int(doc.get("capacity", size))
        return cls(header, int(doc["image"]), int(doc["hashes"]), size, capacity)


@dataclass(frozen=True)
class SealedArea:
    """A sealed region (state or config) of the checkpoint: the snapshot record whose
    region it is a byte copy of (its header carries the wrapped data key, the UUID the
    chunks are bound to and the region's generation and length in use)."""

    kind: RegionKind
    offset: int
    length: int
    sealer: UnitHeader | None = None  # None: never sent yet

    def region(self) -> Region | None:
        """The sealer's region as it lies in this area (None: nothing sent yet)."""
        if self.sealer is None:
            return None
        return replace(self.sealer.require_region(self.kind), offset=self.offset)


@dataclass(frozen=True)
class Superblock:
    vm_name: str
    volumes: tuple[VolumeArea, ...]
    state: SealedArea
    config: SealedArea
    journal_offset: int
    journal_capacity: int
    seq: int = 0  # checkpoint sequence number; 0: no coherent checkpoint yet
    record_uuid: uuid.UUID | None = None  # the source snapshot record of checkpoint seq
    checkpoint: str = ""  # its snapshot name
    taken: float = 0.0
    journal_length: int = 0  # a committed, not yet applied journal (0: none)
    journal_sha256: str = ""
    journal_seq: int = 0
    generation: int = 0

    @property
    def base(self) -> UnitHeader:
        return self.volumes[0].header

    @property
    def size_needed(self) -> int:
        return self.journal_offset + self.journal_capacity

    def misfit(self, volumes: Sequence[Volume], state_length: int, config_length: int) -> str:
        """Why this layout cannot take a checkpoint of these volumes (LUN order) and
        sealed regions ('' when it can): the areas never move once laid out."""
        if [h.unit_uuid for h, _size in volumes] != [v.header.unit_uuid for v in self.volumes]:
            return "its disks are not the ones the replica was made of"
        for lun, ((_header, size), area) in enumerate(zip(volumes, self.volumes, strict=True)):
            if size > area.capacity:
                return (
                    f"LUN {lun} is {size} bytes now, the replica has room for "
                    f"{area.capacity} bytes of it"
                )
        if (state_length, config_length) != (self.state.length, self.config.length):
            return "its state or config region was resized"
        return ""

    def holding(self, volumes: Sequence[Volume]) -> Superblock:
        """This layout with the volumes' current headers and image sizes (they fit:
        :meth:`misfit`)."""
        areas = (
            replace(area, header=header, size=size)
            for (header, size), area in zip(volumes, self.volumes, strict=True)
        )
        return replace(self, volumes=tuple(areas))

    def to_json(self) -> dict[str, object]:
        return {
            "vm": self.vm_name,
            "seq": self.seq,
            "record": str(self.record_uuid) if self.record_uuid else None,
            "checkpoint": self.checkpoint,
            "taken": self.taken,
            "volumes": [v.to_json() for v in self.volumes],
            "sealed": {
                area.kind.name.lower(): {
                    "offset": area.offset,
                    "length": area.length,
                    "sealer": header_image(area.sealer) if area.sealer else None,
                }
                for area in (self.state, self.config)
            },
            "journal": {
                "offset": self.journal_offset,
                "capacity": self.journal_capacity,
                "length": self.journal_length,
                "sha256": self.journal_sha256,
                "seq": self.journal_seq,
            },
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any], generation: int) -> Superblock:
        def sealed(kind: RegionKind) -> SealedArea:
            item = doc["sealed"][kind.name.lower()]
            sealer = item["sealer"]
            return SealedArea(
                kind,
                int(item["offset"]),
                int(item["length"]),
                header_from_image(sealer) if sealer else None,
            )

        journal = doc["journal"]
        return cls(
            vm_name=str(doc["vm"]),
            volumes=tuple(VolumeArea.from_json(v) for v in doc["volumes"]),
            state=sealed(RegionKind.STATE),
            config=sealed(RegionKind.CONFIG),
            journal_offset=int(journal["offset"]),
            journal_capacity=int(journal["capacity"]),
            seq=int(doc["seq"]),
            record_uuid=uuid.UUID(doc["record"]) if doc["record"] else None,
            checkpoint=str(doc["checkpoint"]),
            taken=float(doc["taken"]),
            journal_length=int(journal["length"]),
            journal_sha256=str(journal["sha256"]),
            journal_seq=int(journal["seq"]),
            generation=generation,
        )


def _lay_out(
    vm_name: str,
    volumes: Sequence[Volume],
    capacities: Sequence[int],
    state_length: int,
    config_length: int,
) -> Superblock:
    cursor = DATA_START
    areas = []
    entries = 0  # journal descriptors a round rewriting everything needs
    for (header, size), capacity in zip(volumes, capacities, strict=True):
        grains = grains_of(capacity)
        image, cursor = cursor, align_mib(cursor + capacity)
        hashes, cursor = cursor, align_mib(cursor + grains * HASH_BYTES)
        areas.append(VolumeArea(header, image, hashes, size, capacity))
        entries += -(-capacity // RUN) + -(-grains * HASH_BYTES // BLOCK)
    state, cursor = SealedArea(RegionKind.STATE, cursor, state_length), cursor + state_length
    config, cursor = SealedArea(RegionKind.CONFIG, cursor, config_length), cursor + config_length
    entries += 2 * (-(-state_length // RUN) + -(-config_length // RUN)) + 2
    data = cursor - DATA_START
    capacity = align_mib(data + entries * BLOCK)
    return Superblock(vm_name, tuple(areas), state, config, cursor, capacity)


def plan(
    vm_name: str,
    volumes: Sequence[Volume],
    state_length: int,
    config_length: int,
    room: int = 0,
) -> Superblock:
    """The layout of a new replica of a VM with these volumes (LUN order) and sealed
    regions: each image area as large as its image, or - when ``room`` (the LUN's
    bytes) is more than that needs - the largest areas in proportion to the images
    (in steps of 1/1024 of each) that still fit it: room for the disks to grow."""
    sizes = [size for _header, size in volumes]

    def scaled(step: int) -> Superblock:
        capacities = [align_mib(s + s * step // 1024) for s in sizes]
        return _lay_out(vm_name, volumes, capacities, state_length, config_length)

    low, high = 0, (room // min(sizes) + 1) * 1024  # past it an area alone exceeds room
    if scaled(0).size_needed > room:
        high = 0
    while low < high:  # the largest step that fits: size_needed grows with the step
        mid = (low + high + 1) // 2
        if scaled(mid).size_needed <= room:
            low = mid
        else:
            high = mid - 1
    return scaled(low)


def encode_superblock(sb: Superblock) -> bytes:
    body = json.dumps(sb.to_json(), sort_keys=True, separators=(",", ":")).encode()
    fixed = _FIXED.pack(
        MAGIC,  # marker
        VERSION,  # version
        0,  # flags
        len(body),  # body length
        sb.generation,  # generation
    )
    image = fixed + body
    image += hashlib.sha256(image).digest()  # checksum
    if len(image) > SB_SLOT:
        raise ReplicaError(f"replica superblock of {len(image)} bytes does not fit its slot")
    return image.ljust(align_block(len(image)), b"\0")


def _decode_slot(disk: BlockBackend, offset: int) -> tuple[Superblock | None, bool, str]:
    """(superblock or None, marked, problem)."""
    first = bytes(disk.read(offset, BLOCK))
    if first[:8] != MAGIC:
        return None, False, "no replica marker"
    _magic, version, _flags, length, generation = _FIXED.unpack_from(first, 0)
    if version > VERSION:
        raise ReplicaError(
            f"the replica is format version {version}; this iscsi-vmtarget reads version "
            f"{VERSION}: upgrade it"
        )
    total = _FIXED.size + length + 32
    if total > SB_SLOT:
        return None, True, f"body length {length} out of range"
    image = (
        first + bytes(disk.read(offset + BLOCK, align_block(total) - BLOCK))
        if total > BLOCK
        else first
    )
    body_end = _FIXED.size + length
    if hashlib.sha256(image[:body_end]).digest() != image[body_end:total]:
        return None, True, "checksum mismatch"
    try:
        return Superblock.from_json(json.loads(image[_FIXED.size : body_end]), generation), True, ""
    except (FormatError, ValueError, KeyError, TypeError) as exc:
        return None, True, f"unreadable: {exc}"


def read_superblock(disk: BlockBackend) -> Superblock | None:
    """The newest valid superblock; None on a LUN never written as a replica;
    ReplicaError when marked but no slot is valid."""
    if disk.size < DATA_START:
        return None
    best: Superblock | None = None
    problems = []
    marked = False
    for name, offset in zip("AB", SB_OFFSETS, strict=True):
        sb, mark, problem = _decode_slot(disk, offset)
        marked = marked or mark
        if sb is None:
            problems.append(f"slot {name}: {problem}")
        elif best is None or sb.generation > best.generation:
            best = sb
    if best is None and marked:
        raise ReplicaError(f"the replica's superblock is damaged ({'; '.join(problems)})")
    return best


def write_superblock(disk: BlockBackend, sb: Superblock) -> Superblock:
    """Write ``sb`` with the next generation into the slot not holding the current one,
    then SYNCHRONIZE CACHE: after this returns, a reader finds ``sb``."""
    new = replace(sb, generation=sb.generation + 1)
    image = encode_superblock(new)
    slot = SB_OFFSETS[new.generation % 2]
    if faults.armed("replica.torn"):  # a superblock write cut short by the crash
        disk.write(slot, image[:BLOCK])
        disk.flush()
        faults.crashpoint("replica.torn")
    disk.write(slot, image)
    disk.flush()
    return new


# -- the journal -------------------------------------------------------------------------


class JournalWriter:
    """Stages a round's pieces in the journal area (step 1 of the module docstring)."""

    def __init__(self, disk: BlockBackend, sb: Superblock, seq: int) -> None:
        self.disk = disk
        self.sb = sb
        self.seq = seq
        self.length = 0
        self.entries = 0
        self._sha = hashlib.sha256()

    def add(
        self, target: int, data: bytes | bytearray | memoryview | None, length: int = 0
    ) -> None:
        """Stage ``data`` for ``target`` (None: ``length`` bytes of zeros)."""
        size = length if data is None else len(data)
        if (
            target % BLOCK
            or size % BLOCK
            or not DATA_START <= target <= self.sb.journal_offset - size
        ):
            raise ReplicaError(f"journal entry for {size} bytes at {target} is outside the areas")
        descriptor = _ENTRY.pack(
            JOURNAL_MAGIC,  # marker
            self.seq,  # the checkpoint this entry belongs to
            self.entries,  # index within the round
            ZERO_FLAG if data is None else 0,  # flags
            target,  # where the data goes on this LUN
            size,  # bytes
        ).ljust(BLOCK, b"\0")
        record = descriptor if data is None else b"".join((descriptor, data))  # one copy
        if self.length + len(record) > self.sb.journal_capacity:
            raise ReplicaError(
                f"the round needs more than the journal's {self.sb.journal_capacity} bytes"
            )
        self.disk.write(self.sb.journal_offset + self.length, record)
        self._sha.update(record)
        self.length += len(record)
        self.entries += 1
        faults.crashpoint("replica.staging")

    def committed(self) -> Superblock:
        """The superblock fields of the commit record naming this journal."""
        return replace(
            self.sb,
            journal_length=self.length,
            journal_sha256=self._sha.hexdigest(),
            journal_seq=self.seq,
        )


def _journal_entries(disk: BlockBackend, sb: Superblock) -> Iterator[tuple[int, int, bool, int]]:
    """(target, length, zero, data offset on the LUN) of each committed entry."""
    pos = 0
    index = 0
    while pos < sb.journal_length:
        raw = bytes(disk.read(sb.journal_offset + pos, BLOCK))
        magic, seq, entry, flags, target, length = _ENTRY.unpack_from(raw, 0)
        if magic != JOURNAL_MAGIC or seq != sb.journal_seq or entry != index:
            raise IntegrityError(f"journal entry {index} is damaged")
        if (
            target % BLOCK
            or length % BLOCK
            or not DATA_START <= target <= sb.journal_offset - length
        ):
            raise IntegrityError(f"journal entry {index} points outside the replica's areas")
        zero = bool(flags & ZERO_FLAG)
        yield target, length, zero, sb.journal_offset + pos + BLOCK
        pos += BLOCK + (0 if zero else length)
        index += 1
    if pos != sb.journal_length:
        raise IntegrityError("the journal's last entry runs past its committed length")


def replay(disk: BlockBackend, sb: Superblock) -> tuple[Superblock, int]:
    """Apply a committed journal again (idempotent) and clear it; (superblock, entries).

    Its SHA-256 is checked before a byte is applied: a committed journal was made
    durable before its commit record, so a mismatch means damage, never a torn round."""
    if not sb.journal_length:
        return sb, 0
    sha = hashlib.sha256()
    for pos in range(0, sb.journal_length, RUN):
        sha.update(disk.read(sb.journal_offset + pos, min(RUN, sb.journal_length - pos)))
    if sha.hexdigest() != sb.journal_sha256:
        raise IntegrityError(
            f"the committed journal of checkpoint {sb.journal_seq} fails its SHA-256: "
            "the replica is damaged"
        )
    count = 0
    for target, length, zero, data in _journal_entries(disk, sb):
        if zero:
            disk.unmap(target, length)
        else:
            disk.write(target, disk.read(data, length))
        count += 1
        faults.crashpoint("replica.replaying")
    disk.flush()
    return clear_journal(disk, sb), count


def clear_journal(disk: BlockBackend, sb: Superblock) -> Superblock:
    """Step 3's last write: the areas hold the checkpoint, the journal is free again."""
    return write_superblock(disk, replace(sb, journal_length=0, journal_sha256="", journal_seq=0))


def check_room(sb: Superblock, disk: BlockBackend, what: str) -> None:
    if disk.size < sb.size_needed:
        raise SizeError(
            f"{what} holds {disk.size} bytes; a replica of VM {sb.vm_name!r} needs "
            f"{sb.size_needed} bytes (on the destination: iscsi-vmtarget vm receive "
            f"{sb.vm_name} --size {sb.size_needed}; more leaves its disks room to grow)"
        )
