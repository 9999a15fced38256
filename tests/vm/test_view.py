"""GuestView, RawView and SliceBackend as block backends: where each guest byte lands per
concealment mode, the one bounds check, capacity listeners."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iscsi_vmtarget.storage import BackendError, MemoryBackend
from iscsi_vmtarget.vm.format.header import LABEL_SIZE, Mode, RegionKind, UnitState
from iscsi_vmtarget.vm.format.layout import plan_growth
from iscsi_vmtarget.vm.layers.view import GuestView, RawView, SliceBackend
from tests.vm.helpers import HIDDEN_BYTE, ViewUnit

MIB = 1 << 20
DISK = 4 * MIB


def test_truncate_is_the_identity() -> None:
    unit = ViewUnit.create(Mode.TRUNCATE, DISK)
    unit.view.write(0, b"first")
    unit.view.write(DISK - 4, b"last")
    assert bytes(unit.raw.read(0, 5)) == b"first"
    assert bytes(unit.raw.read(DISK - 4, 4)) == b"last"
    assert unit.raw.read(DISK, 1)[0] == HIDDEN_BYTE  # the hidden data starts right after


def test_offset_shifts_every_lba() -> None:
    unit = ViewUnit.create(Mode.OFFSET, DISK)
    shift = unit.header.require_region(RegionKind.DISK).offset
    assert shift > 0
    unit.view.write(0, b"first")
    assert bytes(unit.raw.read(shift, 5)) == b"first"
    assert unit.raw.read(0, 1)[0] == HIDDEN_BYTE


def test_aligned_serves_the_hidden_partition_table_at_lba_0() -> None:
    unit = ViewUnit.create(Mode.ALIGNED, DISK)
    head = unit.header.require_region(RegionKind.GUEST_HEAD)
    mbr = b"\x00" * 446 + b"\x80" + b"\x00" * 63 + b"\x55\xaa"
    unit.view.write(0, mbr)  # the guest's partition table
    assert bytes(unit.raw.read(head.offset, 512)) == mbr  # kept in the hidden area
    assert unit.raw.read(0, 1)[0] == HIDDEN_BYTE  # the unit's own label is untouched
    unit.view.write(LABEL_SIZE, b"partition 1")  # from 1 MiB on: same LBA in the unit
    assert bytes(unit.raw.read(LABEL_SIZE, 11)) == b"partition 1"
    # one request across the seam is split between the two places
    unit.view.write(LABEL_SIZE - 3, b"abcdef")
    assert bytes(unit.raw.read(head.offset + LABEL_SIZE - 3, 3)) == b"abc"
    assert bytes(unit.raw.read(LABEL_SIZE, 3)) == b"def"
    assert bytes(unit.view.read(LABEL_SIZE - 3, 6)) == b"abcdef"


@pytest.mark.parametrize("mode", list(Mode))
@settings(max_examples=30, deadline=None)
@given(
    offset=st.one_of(st.integers(-2, LABEL_SIZE + 2), st.integers(DISK - 70_000, DISK + 2)),
    length=st.integers(0, 80_000),
)
def test_the_bound_is_checked_in_the_view(mode: Mode, offset: int, length: int) -> None:
    if mode not in _UNITS:
        _UNITS[mode] = ViewUnit.create(mode, DISK)
    unit = _UNITS[mode]
    inside = offset >= 0 and offset + length <= DISK
    for call in (
        lambda: unit.view.read(offset, length),
        lambda: unit.view.write(offset, bytes(length)),
        lambda: unit.view.unmap(offset, length),
    ):
        if inside:
            call()
        else:
            with pytest.raises(ValueError, match="outside backend"):
                call()
    assert unit.hidden_intact()


_UNITS: dict[Mode, ViewUnit] = {}


def test_unmap_and_allocation_are_translated() -> None:
    unit = ViewUnit.create(Mode.OFFSET, DISK)
    unit.view.unmap(0, 8192)
    shift = unit.header.require_region(RegionKind.DISK).offset
    assert unit.view.allocated_ranges(4096, 4096) == [(4096, 4096)]  # MemoryBackend: all
    assert bytes(unit.raw.read(shift, 8192)) == bytes(8192)


def test_resize_and_capacity_listeners() -> None:
    unit = ViewUnit.create(Mode.ALIGNED, DISK)
    seen: list[tuple[int, int]] = []
    unit.view.add_capacity_listener(lambda old, new: seen.append((old, new)))
    plan = plan_growth(unit.header, 2 * DISK)
    grown = replace(unit.header, regions=plan.regions, unit_size=plan.unit_size)
    unit.raw.resize(plan.unit_size)
    unit.view.update(grown)
    assert unit.view.size == 2 * DISK and seen == [(DISK, 2 * DISK)]
    unit.view.update(grown)  # same size: no second notice
    assert seen == [(DISK, 2 * DISK)]
    with pytest.raises(BackendError):
        unit.view.resize(3 * DISK)
    with pytest.raises(BackendError):
        unit.view.update(replace(grown, state=UnitState.RESIZING))


def test_unfinished_resize_cannot_be_viewed() -> None:
    unit = ViewUnit.create(Mode.TRUNCATE, DISK)
    with pytest.raises(BackendError, match="unfinished resize"):
        GuestView(unit.raw, replace(unit.header, state=UnitState.SCRUBBING))


def test_read_only_guest_and_raw_views() -> None:
    unit = ViewUnit.create(Mode.TRUNCATE, DISK)
    view = GuestView(unit.raw, unit.header, read_only=True)
    with pytest.raises(BackendError, match="read-only"):
        view.write(0, b"x")
    raw = RawView(unit.raw)
    assert raw.read_only and raw.size == unit.header.unit_size
    with pytest.raises(BackendError, match="read-only"):
        raw.write(0, b"x")
    assert RawView(unit.raw, writable=True).read_only is False


def test_slice_backend_window() -> None:
    base = MemoryBackend(8 * MIB)
    window = SliceBackend(base, 2 * MIB, MIB)
    window.write(0, b"abc")
    assert bytes(base.read(2 * MIB, 3)) == b"abc"
    with pytest.raises(ValueError):
        window.read(MIB - 1, 2)
    with pytest.raises(ValueError):
        SliceBackend(base, 7 * MIB, 2 * MIB)
    window.set_length(2 * MIB)
    assert window.size == 2 * MIB
    with pytest.raises(BackendError):
        window.resize(3 * MIB)
