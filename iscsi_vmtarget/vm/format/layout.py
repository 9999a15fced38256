"""Where each region of a unit goes, per concealment mode, and how a unit grows.

Initial layouts (every region MiB aligned; META is always the last MiB)::

    truncate  | DISK ............ | STATE | CONFIG | SNAPMETA | META |
    offset    | LABEL | CONFIG | SNAPMETA | STATE | DISK ....... | META |
    aligned   | LABEL | DISK (from 1 MiB) ...... | GUEST_HEAD | CONFIG | SNAPMETA | STATE | META |

``truncate`` (US 9,354,927: "the size ... is truncated when reported to a guest to hide the
region occupied by non disk data"): guest LBA n is unit LBA n, the hidden data lies
after the disk. ``offset`` (US 9,354,927: the I/O handler "subtracts an offset"): hidden data
first, guest LBAs shifted by the DISK offset. ``aligned`` (US 9,354,927: "a partition table for
the virtual disk is stored in a non disk data partition. When a guest requests access
to the beginning of the storage the second partition table is fetched"): guest LBA n
is unit LBA n from 1 MiB on; the guest's first MiB lives in GUEST_HEAD, while LBA 0 of
the unit carries the unit's own GPT.

Growth (US 9,354,927: "extending the unit ... updating a top level partition data structure
and moving the data around"): the DISK region grows in place; every region in its way,
and every non-disk region that grows, moves to fresh space past the old end of the
unit, so no move ever overwrites a source (the patent's "fragmented model", which frees
us from ordering copies). The vacated ranges are scrubbed before the guest may see them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..vm_errors import SizeError
from . import sealed
from .header import (
    ALIGN,
    BLOCK,
    LABEL_SIZE,
    MIB,
    TAIL_SIZE,
    Extent,
    Mode,
    Move,
    Region,
    RegionKind,
    Role,
    UnitHeader,
)

MIN_DISK = 2 * MIB
MAX_DISK = 1 << 50  # 1 PiB
CONFIG_CAPACITY = 256 * 1024
SNAPMETA_CAPACITY = 256 * 1024
#: State headroom over the VM's memory (US 9,354,927: "over allocate space to accommodate the
#: growth"): device state, video memory and a little growth.
STATE_HEADROOM_MIN = 16 * MIB


def align_up(value: int, to: int = ALIGN) -> int:
    return -(-value // to) * to


def check_disk_size(size: int, what: str = "disk") -> None:
    if size % BLOCK:
        raise SizeError(f"{what} size {size} is not a multiple of the {BLOCK}-byte block")
    if size < MIN_DISK:
        raise SizeError(f"{what} size {size} is below the minimum of {MIN_DISK} bytes (2M)")
    if size > MAX_DISK:
        raise SizeError(f"{what} size {size} is above the maximum of {MAX_DISK} bytes (1P)")


def state_capacity_for(memory: int) -> int:
    """Plaintext capacity of the state region for a VM with ``memory`` bytes of RAM."""
    return memory + max(memory // 8, STATE_HEADROOM_MIN)


def _disk_region(mode: Mode, disk_size: int, offset: int) -> Region:
    if mode is Mode.ALIGNED:
        return Region(RegionKind.DISK, LABEL_SIZE, disk_size - LABEL_SIZE)
    return Region(RegionKind.DISK, offset, disk_size)


def _hidden(kind: RegionKind, length: int) -> Region:
    return Region(kind, 0, length, encrypted=True)


def initial_regions(
    mode: Mode, role: Role, disk_size: int, memory: int = 0
) -> tuple[tuple[Region, ...], int]:
    """The regions of a new unit and its size in bytes."""
    check_disk_size(disk_size)
    hidden: list[Region] = []
    if role is Role.BASE:
        hidden = [
            _hidden(RegionKind.CONFIG, sealed.length_for(CONFIG_CAPACITY)),
            _hidden(RegionKind.SNAPMETA, sealed.length_for(SNAPMETA_CAPACITY)),
            _hidden(RegionKind.STATE, sealed.length_for(state_capacity_for(memory))),
        ]
    ordered: list[Region] = []
    cursor = 0
    if mode is not Mode.TRUNCATE:
        ordered.append(Region(RegionKind.LABEL, 0, LABEL_SIZE))
        cursor = LABEL_SIZE
    if mode is Mode.TRUNCATE:
        ordered.append(_disk_region(mode, disk_size, 0))
        cursor = align_up(disk_size)
    elif mode is Mode.ALIGNED:
        ordered.append(_disk_region(mode, disk_size, 0))
        cursor = align_up(disk_size)
        ordered.append(Region(RegionKind.GUEST_HEAD, cursor, LABEL_SIZE))
        cursor += LABEL_SIZE
    for region in hidden:
        ordered.append(replace(region, offset=cursor))
        cursor += region.length
    if mode is Mode.OFFSET:
        ordered.append(_disk_region(mode, disk_size, cursor))
        cursor = align_up(cursor + disk_size)
    ordered.append(Region(RegionKind.META, cursor, TAIL_SIZE))
    return tuple(ordered), cursor + TAIL_SIZE


@dataclass(frozen=True)
class GrowthPlan:
    """A resize: the new regions and size, the copies it owes and the ranges to zero."""

    regions: tuple[Region, ...]
    unit_size: int
    moves: tuple[Move, ...]
    scrubs: tuple[Extent, ...]


def plan_growth(
    header: UnitHeader, disk_size: int | None = None, state_length: int | None = None
) -> GrowthPlan:
    """Plan growing the guest disk to ``disk_size`` and/or the STATE region to
    ``state_length`` bytes (region length, see :func:`sealed.length_for`)."""
    old_end = header.unit_size
    disk = header.require_region(RegionKind.DISK)
    new_disk = disk
    if disk_size is not None:
        check_disk_size(disk_size)
        if disk_size < header.disk_size:
            raise SizeError(
                f"the disk is {header.disk_size} bytes; shrinking it to {disk_size} would "
                "cut off guest data and is not supported"
            )
        new_disk = replace(disk, length=disk.length + disk_size - header.disk_size)
    grow_state: Region | None = None
    if state_length is not None:
        state = header.require_region(RegionKind.STATE)
        if state_length < state.length:
            raise SizeError("shrinking the state region is not supported")
        if state_length > state.length:
            grow_state = replace(state, length=state_length)
    moving: list[tuple[Region, Region]] = []  # (old, new with length, offset pending)
    kept: list[Region] = []
    for region in header.regions:
        if region.kind is RegionKind.DISK:
            kept.append(new_disk)
        elif region.kind is RegionKind.META:
            continue
        elif grow_state is not None and region.kind is RegionKind.STATE:
            moving.append((region, grow_state))
        elif region.kind is not RegionKind.LABEL and (
            region.offset < new_disk.end and region.end > new_disk.offset
        ):
            moving.append((region, region))  # in the way of the grown disk
        else:
            kept.append(region)
    if new_disk == disk and not moving:
        return GrowthPlan(header.regions, header.unit_size, (), ())
    cursor = align_up(max(old_end, new_disk.end))
    moves: list[Move] = []
    scrubs: list[Extent] = []
    for old, new in sorted(moving, key=lambda pair: pair[0].offset):
        placed = replace(new, offset=cursor)
        cursor += placed.length
        kept.append(placed)
        if old.encrypted:
            moves.extend(sealed.move_plan(old, placed))
        else:
            moves.append(Move(old.offset, placed.offset, old.length))
        scrubs.append(Extent(old.offset, old.length))
    scrubs.append(Extent(old_end - TAIL_SIZE, TAIL_SIZE))  # the old META region
    kept.append(Region(RegionKind.META, cursor, TAIL_SIZE))
    regions = tuple(sorted(kept, key=lambda r: r.offset))
    return GrowthPlan(regions, cursor + TAIL_SIZE, tuple(moves), tuple(scrubs))
