"""The unit header: encoding, checksum, versions, the two slots, the GPT and layouts."""

from __future__ import annotations

import hashlib
import struct
import uuid
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iscsi_vmtarget.storage import MemoryBackend
from iscsi_vmtarget.vm.format.gpt import TYPE_GUIDS, read_gpt_types, write_gpt
from iscsi_vmtarget.vm.format.header import (
    ALIGN,
    MAGIC,
    SLOT_OFFSETS,
    SLOT_SIZE,
    TAIL_SIZE,
    Extent,
    Mode,
    Move,
    RegionKind,
    Role,
    decode_header,
    encode_header,
    scan_slots,
    write_slot,
)
from iscsi_vmtarget.vm.format.layout import initial_regions, plan_growth
from iscsi_vmtarget.vm.vm_errors import FormatError, NewerFormatError
from tests.vm.helpers import disjoint, make_header

MIB = 1 << 20


def test_round_trip_keeps_every_field() -> None:
    header = replace(
        make_header(Mode.OFFSET, 64 * MIB),
        key_id=b"12345678",
        wrapped_key=bytes(range(40)),
        secondaries=(b"\x61" * 16, b"\x62" * 16),
        moves=(Move(1, 2, 3),),
        scrubs=(Extent(4, 5),),
        generation=7,
        created=1234,
    )
    slot = encode_header(header)
    assert len(slot) == SLOT_SIZE and slot[:8] == MAGIC
    assert decode_header(slot) == header


@settings(max_examples=150, deadline=None)
@given(position=st.integers(0, 2000), bit=st.integers(0, 7))
def test_any_flipped_bit_fails_the_checksum(position: int, bit: int) -> None:
    slot = bytearray(encode_header(make_header(Mode.ALIGNED, 8 * MIB)))
    (length,) = struct.unpack_from("<H", slot, 10)
    position %= length + 32  # the covered bytes and the checksum itself
    slot[position] ^= 1 << bit
    with pytest.raises(FormatError):
        decode_header(slot)


def _rechecksum(slot: bytearray) -> bytearray:
    (length,) = struct.unpack_from("<H", slot, 10)
    slot[length : length + 32] = hashlib.sha256(slot[:length]).digest()
    return slot


def test_newer_format_version_is_named() -> None:
    slot = bytearray(encode_header(make_header(Mode.TRUNCATE, 8 * MIB)))
    struct.pack_into("<H", slot, 8, 4)
    with pytest.raises(NewerFormatError, match="format version 4"):
        decode_header(_rechecksum(slot))


def test_overlapping_regions_are_refused() -> None:
    header = make_header(Mode.TRUNCATE, 8 * MIB)
    disk = header.require_region(RegionKind.DISK)
    bad = header.with_region(replace(disk, length=disk.length + MIB))
    with pytest.raises(FormatError, match="overlap"):
        decode_header(encode_header(bad))


def _unit(mode: Mode = Mode.TRUNCATE) -> tuple[MemoryBackend, object]:
    header = make_header(mode, 8 * MIB)
    backend = MemoryBackend(header.unit_size)
    return backend, header


def test_scan_picks_the_newest_valid_slot_and_survives_a_torn_one() -> None:
    backend, header = _unit()
    write_slot(backend, replace(header, generation=5), 0)
    write_slot(backend, replace(header, generation=6), 1)
    assert scan_slots(backend).header.generation == 6  # type: ignore[union-attr]
    # a torn write of generation 7 into slot A: its first 100 bytes new, the rest old
    torn = encode_header(replace(header, generation=7))[:100]
    backend.write(header.meta_offset + SLOT_OFFSETS[0], torn)  # type: ignore[attr-defined]
    scan = scan_slots(backend)
    assert scan.header is not None and scan.header.generation == 6
    assert scan.problems and "checksum" in scan.problems[0]


def test_scan_tells_foreign_from_damaged() -> None:
    foreign = MemoryBackend(4 * MIB)
    foreign.write(0, b"some file system")
    assert scan_slots(foreign).foreign
    backend, header = _unit()
    write_slot(backend, header, 0)
    backend.write(header.meta_offset + 100, b"\xff")  # type: ignore[attr-defined]
    scan = scan_slots(backend)
    assert scan.header is None and scan.marked and not scan.foreign


def test_scan_refuses_a_newer_unit_even_next_to_an_older_slot() -> None:
    backend, header = _unit()
    write_slot(backend, header, 0)
    slot = bytearray(encode_header(replace(header, generation=9)))
    struct.pack_into("<H", slot, 8, 4)
    backend.write(header.meta_offset + SLOT_OFFSETS[1], _rechecksum(slot))  # type: ignore[attr-defined]
    with pytest.raises(NewerFormatError):
        scan_slots(backend)


# -- layouts ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize("role", list(Role))
def test_initial_layout(mode: Mode, role: Role) -> None:
    disk = 10 * MIB + 512
    regions, size = initial_regions(mode, role, disk, 64 * MIB)
    assert disjoint([(r.offset, r.end) for r in regions])
    assert all(r.offset % ALIGN == 0 for r in regions)
    assert regions[-1].kind is RegionKind.META and regions[-1].end == size
    header = replace(make_header(mode, disk), regions=regions, unit_size=size, role=role)
    assert header.disk_size == disk
    kinds = {r.kind for r in regions}
    assert (RegionKind.STATE in kinds) == (role is Role.BASE)
    assert (RegionKind.LABEL in kinds) == (mode is not Mode.TRUNCATE)
    if mode is Mode.TRUNCATE:
        assert header.require_region(RegionKind.DISK).offset == 0
    if mode is Mode.OFFSET:
        disk_region = header.require_region(RegionKind.DISK)
        assert all(r.end <= disk_region.offset for r in regions if r.encrypted)
    if mode is Mode.ALIGNED:
        assert (
            header.require_region(RegionKind.DISK).offset == MIB
        )  # guest LBA 2048 = unit LBA 2048


@pytest.mark.parametrize("mode", list(Mode))
@settings(max_examples=40, deadline=None)
@given(grow_disk=st.integers(0, 200 * MIB // 512), grow_state=st.integers(0, 40))
def test_growth_plan_never_overwrites_a_source(mode: Mode, grow_disk: int, grow_state: int) -> None:
    header = make_header(mode, 8 * MIB)
    state = header.require_region(RegionKind.STATE)
    plan = plan_growth(header, 8 * MIB + grow_disk * 512, state.length + grow_state * MIB)
    new = replace(header, regions=plan.regions, unit_size=plan.unit_size)
    assert new.disk_size == 8 * MIB + grow_disk * 512
    assert disjoint([(r.offset, r.end) for r in plan.regions])
    for move in plan.moves:
        assert move.dst >= header.unit_size  # fresh space past the old end
        assert move.src + move.length <= header.unit_size
    assert (
        Extent(header.meta_offset, TAIL_SIZE) in plan.scrubs or plan.unit_size == header.unit_size
    )
    for extent in plan.scrubs:  # nothing scrubbed is hidden data of the new layout
        for region in plan.regions:
            if region.kind not in (RegionKind.DISK,):
                assert extent.offset + extent.length <= region.offset or extent.offset >= region.end


def test_shrinking_is_refused() -> None:
    header = make_header(Mode.TRUNCATE, 8 * MIB)
    with pytest.raises(Exception, match="shrinking"):
        plan_growth(header, 4 * MIB)


# -- GPT --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [Mode.OFFSET, Mode.ALIGNED])
def test_gpt_names_every_region_with_our_types(mode: Mode) -> None:
    header = make_header(mode, 8 * MIB)
    backend = MemoryBackend(header.unit_size)
    write_gpt(backend, header)
    found = read_gpt_types(backend)
    expected = {r.kind for r in header.regions if r.kind in TYPE_GUIDS}
    assert {type_guid for type_guid, _, _ in found} == {TYPE_GUIDS[k] for k in expected}
    disk = header.require_region(RegionKind.DISK)
    assert (TYPE_GUIDS[RegionKind.DISK], disk.offset // 512, disk.end // 512 - 1) in found
    last_lba = header.unit_size // 512 - 1
    assert bytes(backend.read(last_lba * 512, 8)) == b"EFI PART"  # backup header
    assert bytes(backend.read(510, 2)) == b"\x55\xaa"  # protective MBR


def test_header_identity_fields() -> None:
    header = make_header(Mode.TRUNCATE, 8 * MIB)
    assert header.naa[0] >> 4 == 6 and len(header.naa) == 16
    assert isinstance(header.unit_uuid, uuid.UUID)
