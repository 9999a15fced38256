"""A GPT naming every region of a unit, with partition types of our own.

US 9,354,927 marks units "by writing a partition type into a root partition" so that
discovery and standard tools can tell VM units apart (US 9,354,927: provisioning, marking).
``offset`` and ``aligned`` units keep LBA 0 for us, so they carry a protective MBR,
a primary GPT at LBA 1-33 and the backup GPT in the last 33 LBAs (UEFI 2.10 §5.2.3,
§5.3): ``partx --show``, ``sgdisk -p`` or ``blkid -p`` on a raw unit list the regions.
``truncate`` units have none: there the guest owns LBA 0.

The GPT is derived data. Discovery trusts the unit header (:mod:`.header`), which is
what updates crash-atomically; the GPT is rewritten after every layout change.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from typing import Final

from ...storage.backend import BlockBackend
from .header import BLOCK, Region, RegionKind, UnitHeader

#: Partition type GUIDs of iscsi-vmtarget regions (random, registered nowhere).
TYPE_GUIDS: Final = {
    RegionKind.DISK: uuid.UUID("da41a053-e447-475c-815b-5277604ab0f0"),
    RegionKind.STATE: uuid.UUID("2584855c-f60e-4568-9c0e-7af9f5df0ad7"),
    RegionKind.CONFIG: uuid.UUID("f617713d-7fbd-4b86-96b8-b6a858a6da77"),
    RegionKind.SNAPMETA: uuid.UUID("2ab8c12a-ce89-4dd3-8961-10bd5b99ff96"),
    RegionKind.GUEST_HEAD: uuid.UUID("104ea01f-e99d-42b5-8ddd-bb803e297d46"),
    RegionKind.META: uuid.UUID("04eca348-015f-496f-b967-25af85459d07"),
}
PARTITION_NAMES: Final = {kind: f"ivmt-{kind.name.lower().replace('_', '')}" for kind in TYPE_GUIDS}

_ENTRIES: Final = 128
_ENTRY_SIZE: Final = 128
_ENTRY_BLOCKS: Final = _ENTRIES * _ENTRY_SIZE // BLOCK  # 32
_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
_ENTRY = struct.Struct("<16s16sQQQ72s")


def _mbr(total_blocks: int) -> bytes:
    """Protective MBR (UEFI 2.10 §5.2.3): one partition of type 0xEE over the disk."""
    mbr = bytearray(BLOCK)
    struct.pack_into(
        "<B3sB3sII",
        mbr,
        446,
        0x00,  # BootIndicator: not bootable
        b"\x00\x02\x00",  # StartingCHS
        0xEE,  # OSType: GPT protective
        b"\xff\xff\xff",  # EndingCHS
        1,  # StartingLBA
        min(total_blocks - 1, 0xFFFFFFFF),  # SizeInLBA
    )
    mbr[510:512] = b"\x55\xaa"  # signature
    return bytes(mbr)


def _entries(header: UnitHeader, last_usable: int) -> bytes:
    out = bytearray(_ENTRIES * _ENTRY_SIZE)
    regions = [r for r in header.regions if r.kind in TYPE_GUIDS]
    for index, region in enumerate(sorted(regions, key=lambda r: r.offset)):
        first, last = _span(region, last_usable)
        _ENTRY.pack_into(
            out,
            index * _ENTRY_SIZE,
            TYPE_GUIDS[region.kind].bytes_le,  # PartitionTypeGUID
            uuid.uuid5(header.unit_uuid, region.kind.name).bytes_le,  # UniquePartitionGUID
            first,  # StartingLBA
            last,  # EndingLBA (inclusive)
            0,  # Attributes
            PARTITION_NAMES[region.kind].encode("utf-16-le"),  # PartitionName
        )
    return bytes(out)


def _span(region: Region, last_usable: int) -> tuple[int, int]:
    first = region.offset // BLOCK
    last = region.end // BLOCK - 1
    return first, min(last, last_usable)  # META keeps the backup GPT out of its partition


def _header(
    header: UnitHeader, my_lba: int, alternate: int, entries_lba: int, entries_crc: int
) -> bytes:
    total = header.unit_size // BLOCK
    fields = [
        b"EFI PART",  # Signature
        0x00010000,  # Revision 1.0
        _HEADER.size,  # HeaderSize (92)
        0,  # HeaderCRC32, computed below with this field zero
        0,  # Reserved
        my_lba,  # MyLBA
        alternate,  # AlternateLBA
        2 + _ENTRY_BLOCKS,  # FirstUsableLBA (34)
        total - 2 - _ENTRY_BLOCKS,  # LastUsableLBA
        header.unit_uuid.bytes_le,  # DiskGUID: the unit UUID
        entries_lba,  # PartitionEntryLBA
        _ENTRIES,  # NumberOfPartitionEntries
        _ENTRY_SIZE,  # SizeOfPartitionEntry
        entries_crc,  # PartitionEntryArrayCRC32
    ]
    raw = _HEADER.pack(*fields)
    fields[3] = zlib.crc32(raw)
    return _HEADER.pack(*fields).ljust(BLOCK, b"\0")


def write_gpt(backend: BlockBackend, header: UnitHeader) -> None:
    """Write the protective MBR, primary and backup GPT for ``header``'s regions."""
    total = header.unit_size // BLOCK
    last_usable = total - 2 - _ENTRY_BLOCKS
    entries = _entries(header, last_usable)
    crc = zlib.crc32(entries)
    backend.write(0, _mbr(total) + _header(header, 1, total - 1, 2, crc) + entries)
    backup_entries = total - 1 - _ENTRY_BLOCKS
    backend.write(
        backup_entries * BLOCK,
        entries + _header(header, total - 1, 1, backup_entries, crc),
    )


def read_gpt_types(backend: BlockBackend) -> list[tuple[uuid.UUID, int, int]]:
    """(type GUID, first LBA, last LBA) of every used entry of the primary GPT, or []
    when LBA 1 holds no valid GPT header (used by discovery as a second marker)."""
    raw = backend.read(BLOCK, BLOCK * (1 + _ENTRY_BLOCKS))
    fields = list(_HEADER.unpack_from(raw, 0))
    if fields[0] != b"EFI PART":
        return []
    stored = fields[3]
    fields[3] = 0
    if zlib.crc32(_HEADER.pack(*fields)) != stored or fields[12] != _ENTRY_SIZE:
        return []
    out = []
    for index in range(min(fields[11], _ENTRIES)):
        type_le, _uniq, first, last, _attr, _name = _ENTRY.unpack_from(
            raw, BLOCK + index * _ENTRY_SIZE
        )
        if type_le != bytes(16):
            out.append((uuid.UUID(bytes_le=type_le), first, last))
    return out
