"""``vm replicate``: push consistent checkpoints of a VM to a replica on another target.

US 9,354,927: continuous data protection is the move "24 7 without the final suspend resume",
with "periodic check points ... coincident with the replica updates", so the VM "may be
resumed at the destination ... based on the last coherent replica". One *round*:

1. read the destination's superblock (:mod:`.replica`): which checkpoint it holds; a
   journal an interrupted round committed is applied first;
2. take a checkpoint: a snapshot named ``replica.<tag>.<seq>`` through the ordinary
   snapshot machinery (:mod:`.snapshot`; the caller's :class:`Checkpointer` goes
   through the daemon when one serves the VM, so its LUNs are quiesced). ``<tag>`` names
   the destination, so one VM may replicate to several;
3. work out what changed since the checkpoint the destination holds, from the layers
   alone: the union of the allocation maps of the layers between the two snapshots'
   layers and their nearest common ancestor (:mod:`..layers.cow`) - a superset of the grains
   whose bytes differ, found without reading a byte of data, plus every grain past the
   older checkpoint's end (the disk grew in between: :mod:`.snapshot_resize`). With no
   such checkpoint on the source (first round, or it was deleted) every grain is sent;
4. send the changed grains, their hashes and - only where the plaintext changed (told by
   the base unit's region generations, else by comparing the two checkpoints'
   plaintexts) - the checkpoint's sealed state and config, as ciphertext: staged in the
   journal, committed, applied (the protocol of :mod:`.replica`); the first round
   writes directly;
5. delete the source's older checkpoints of this destination (their layers merge away),
   so the chain does not grow.

Each disk's image is as large as the checkpoint's chain (what the guest saw), which
outgrows its unit once the disk grew while it had snapshots. A new replica's layout
gives each disk the room the destination LUN has to spare (:func:`.replica.plan`); a
later round whose disk outgrew its area - or whose VM changed shape otherwise - is
refused before any checkpoint, saying how large a new replica must be.

``disk_only`` pushes one guest disk's bytes to a plain LUN (any target, e.g. tgtd) at
offset 0, with no superblock and no journal: a mirror that is coherent only when a round
has finished; the source then remembers the acknowledged checkpoint itself
(``<state-dir>/conf/replication/<vm>.json``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from itertools import zip_longest
from typing import Protocol

from ...storage import atomic_file
from ...storage.backend import BlockBackend
from .. import faults
from ..format import sealed
from ..format.crypto import Keyring
from ..format.header import Region, RegionKind, RegionStatus, UnitHeader
from ..layers.cow import GRAIN, ChainBackend, DeltaLayer, grains_of, is_zero
from ..manager import RECOVERY, VmManager
from ..units.scan import FoundUnit, FoundVm
from ..units.unit import Unit
from ..vm_errors import SizeError, VmError
from . import snapshot as snaps
from .replica import (
    BLOCK,
    HASH_BYTES,
    RUN,
    JournalWriter,
    ReplicaError,
    SealedArea,
    Superblock,
    VolumeArea,
    align_block,
    check_room,
    clear_journal,
    grain_hash,
    plan,
    read_superblock,
    replay,
    write_superblock,
)
from .snapshot_tree import chain_size, find_snapshot, open_chain, record_layer, walk_chain

CHECKPOINT_PREFIX = "replica."
SEALED_KINDS = (RegionKind.STATE, RegionKind.CONFIG)
Progress = Callable[[int, int], None]


def destination_tag(url: str, disk_only: bool = False) -> str:
    """8 hex digits naming a destination (its URL and mode) in checkpoint names."""
    return hashlib.sha256(f"{url.lower()}|{'disk' if disk_only else 'vm'}".encode()).hexdigest()[:8]


def checkpoint_name(tag: str, seq: int) -> str:
    return f"{CHECKPOINT_PREFIX}{tag}.{seq}"


class Checkpointer(Protocol):
    """Takes and deletes the snapshots a round uses (through a daemon or offline)."""

    def take(self, snap: str, description: str) -> None: ...

    def delete(self, snap: str) -> None: ...


@dataclass
class OfflineCheckpointer:
    """Snapshots taken on the pools directly (refused while a server exports the VM)."""

    manager: VmManager
    name: str

    def take(self, snap: str, description: str) -> None:
        snaps.create_snapshot(self.manager, self.name, snap, description=description)

    def delete(self, snap: str) -> None:
        snaps.delete_snapshot(self.manager, self.name, snap)


@dataclass
class RoundReport:
    """What one round did (printed by the CLI, asserted by the tests)."""

    seq: int
    checkpoint: str
    full: bool  # every grain was considered (no earlier checkpoint to diff against)
    grains: int = 0  # grains sent (changed, or all on a full round)
    payload: int = 0  # bytes of data pieces (grains, hash sectors, sealed regions)
    zeroed: int = 0  # bytes sent as "reads as zeros" (no data on the wire)
    sealed: list[str] = field(default_factory=list)  # sealed regions sent
    replayed: int = 0  # journal entries of an interrupted round applied first
    deleted: list[str] = field(default_factory=list)  # older checkpoints deleted

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__)


# -- what changed ------------------------------------------------------------------------


def _layer_bits(manager: VmManager, found: FoundUnit, size: int) -> int:
    layer = DeltaLayer(
        manager.catalog.get(found.pool).open(found.ref, read_only=True), found.header, size
    )
    try:
        return int.from_bytes(layer.bits, "little")
    finally:
        layer.close()


def changed_grains(
    manager: VmManager, vm: FoundVm, new_layer: uuid.UUID, prev_layer: uuid.UUID | None
) -> list[int] | None:
    """Grains of the image at ``new_layer`` whose bytes may differ from the image at
    ``prev_layer`` (None: unknown, send everything). Every grain outside the layers
    above the two layers' nearest common ancestor reads from that ancestor in both
    images - except past the end of the image at ``prev_layer`` when the disk grew in
    between: those grains are all changed (the replica holds nothing of them)."""
    if prev_layer is None:
        return None
    new_path, new_root = walk_chain(vm, new_layer)
    prev_path, prev_root = walk_chain(vm, prev_layer)
    if new_root.header.unit_uuid != prev_root.header.unit_uuid:
        return None  # e.g. unlinked from a clone source since: no common image
    prev_ids = {u.header.unit_uuid for u in prev_path}
    fallback = new_root.header.disk_size  # the size of layers that record none
    union = 0
    common: uuid.UUID | None = None
    for unit in new_path:
        if unit.header.unit_uuid in prev_ids:
            common = unit.header.unit_uuid
            break
        union |= _layer_bits(manager, unit, fallback)
    for unit in prev_path:
        if unit.header.unit_uuid == common:
            break
        union |= _layer_bits(manager, unit, fallback)
    count = grains_of(chain_size(vm, new_layer))
    old_end = chain_size(vm, prev_layer) // GRAIN  # the grain holding its end
    raw = union.to_bytes(-(-count // 8) or 1, "little")
    return [
        byte * 8 + bit
        for byte, value in enumerate(raw)
        if value
        for bit in range(8)
        if value >> bit & 1 and byte * 8 + bit < min(count, old_end)
    ] + list(range(old_end, count))


def _same_plaintext(a: Unit, b: Unit, keyring: Keyring, kind: RegionKind) -> bool:
    """Whether two snapshot records hold the same plaintext in region ``kind``."""
    ra, rb = a.header.require_region(kind), b.header.require_region(kind)
    if (ra.status, ra.used) != (rb.status, rb.used):
        return False
    pairs = zip_longest(a.read_region(keyring, kind), b.read_region(keyring, kind))
    return all(x == y for x, y in pairs)


# -- one round's material ----------------------------------------------------------------


@dataclass
class _Volume:
    area: VolumeArea
    chain: ChainBackend
    grains: list[int] | None
    hash_sectors: dict[int, bytearray] = field(default_factory=dict)


@dataclass
class _Sealed:
    area: SealedArea
    unit: Unit  # the checkpoint's snapshot record (shared by both regions)
    region: Region
    send: bool


@dataclass
class _Round:
    record: UnitHeader
    volumes: list[_Volume]
    sealed: list[_Sealed]
    layout: Superblock | None
    record_unit: Unit | None = None
    generations: dict[str, int] | None = None  # sealed_generations, when exact

    def close(self) -> None:
        for volume in self.volumes:
            volume.chain.close()
        if self.record_unit is not None:
            self.record_unit.close()


def sealed_generations(vm: FoundVm) -> dict[str, int]:
    """The generations of the base unit's state and config regions: each rewrite bumps
    them, and they never go back, so two equal readings mean the same plaintext."""
    return {
        kind.name.lower(): vm.base.header.require_region(kind).generation
        for kind in SEALED_KINDS
    }


def _sealed_lengths(header: UnitHeader) -> tuple[int, int]:
    """The lengths of the state and config regions of a base unit or snapshot record
    (a record's are its base unit's when it was taken)."""
    state, config = (header.require_region(kind).length for kind in SEALED_KINDS)
    return state, config


def replica_layout(vm: FoundVm, room: int = 0) -> Superblock:
    """Where a new replica of ``vm`` on a LUN of ``room`` bytes keeps each volume and
    sealed region (:func:`.replica.plan`); ``size_needed`` is what it needs at least."""
    luns = vm.lun_map()
    volumes = [(luns[n].header, vm.disk_size(luns[n])) for n in sorted(luns)]
    return plan(vm.name, volumes, *_sealed_lengths(vm.base.header), room=room)


def _too_small(what: str, size: int, vm: FoundVm, lun: int, needed: int) -> SizeError:
    return SizeError(
        f"{what} holds {size} bytes; LUN {lun} of VM {vm.name!r} is {needed} bytes: "
        "mirror it to a LUN at least that large"
    )


def _check_destination(
    vm: FoundVm, disk: BlockBackend, sb: Superblock | None, what: str, disk_only: bool, lun: int
) -> Superblock | VolumeArea:
    """Refuse, before any checkpoint is taken, a destination that cannot take the VM;
    what the round lays out: a disk-only mirror's one area, else the replica's layout
    (a new one using the whole LUN, or the one the replica has, with today's sizes)."""
    if vm.missing:
        raise VmError(f"VM {vm.name!r} misses secondary units {[n.hex() for n in vm.missing]}")
    luns = vm.lun_map()
    if disk_only:
        if lun not in luns:
            raise VmError(f"VM {vm.name!r} has no LUN {lun}")
        size = vm.disk_size(luns[lun])
        if disk.size < size:
            raise _too_small(what, disk.size, vm, lun, size)
        return VolumeArea(luns[lun].header, 0, -1, size, disk.size)
    fresh = replica_layout(vm)
    if sb is None:
        check_room(fresh, disk, what)
        return replica_layout(vm, room=disk.size)
    volumes = [(area.header, area.size) for area in fresh.volumes]
    problem = sb.misfit(volumes, *_sealed_lengths(vm.base.header))
    if problem:
        raise ReplicaError(_no_longer_fits(vm.name, what, problem, fresh.size_needed))
    check_room(sb, disk, what)
    return sb.holding(volumes)


def _no_longer_fits(name: str, what: str, problem: str, needed: int) -> str:
    return (
        f"VM {name!r} no longer fits the replica on {what} ({problem}): a replica keeps "
        f"the layout it was made with (it still holds its last checkpoint). Replicate to "
        f"a new one of at least {needed} bytes (more leaves its disks room to grow): on "
        "the destination, stop receiving this one ('iscsi-vmtarget target delete' of its "
        f"target, then remove its file replicas/{name}.replica) and run 'iscsi-vmtarget "
        f"vm receive {name} --size {needed}'; the first round to it copies everything"
    )


def _prepare(
    manager: VmManager,
    name: str,
    snap: str,
    prev_uuid: uuid.UUID | None,
    planned: Superblock | VolumeArea,
    *,
    lun: int,
    what: str,
    before: dict[str, int] | None = None,
    known: dict[str, int] | None = None,
) -> _Round:
    """Under the pool locks: the checkpoint's images and what changed since the
    previous one (the layers' files stay open: nothing of them moves under us), laid
    out as ``planned`` (:func:`_check_destination`) with the checkpoint's sizes, which
    are checked against it again (a disk may have grown since it was planned).

    ``before``: :func:`sealed_generations` read just before the checkpoint was taken;
    ``known``: those of the previous checkpoint, when they were as exact. A sealed
    region whose generation equals both is unchanged: not decrypted to be compared."""
    with manager.session(repair=False) as session:
        vm = session.find(name)
        keyring = manager.keyring()
        record = find_snapshot(manager, vm, keyring, snap)
        prev = next((r for r in vm.records if r.header.unit_uuid == prev_uuid), None)
        luns = vm.lun_map()
        mirror = isinstance(planned, VolumeArea)  # a disk-only mirror of LUN ``lun``
        numbers = [lun] if mirror else sorted(luns)
        areas = [planned] if isinstance(planned, VolumeArea) else list(planned.volumes)
        out = _Round(record.header, [], [], None)
        now = sealed_generations(vm)
        out.generations = now if now == before else None  # exact for this checkpoint
        try:
            for index, number in enumerate(numbers):
                volume = luns[number]
                new_layer = record_layer(record.header, volume)
                prev_layer = record_layer(prev.header, volume) if prev else None
                grains = changed_grains(manager, vm, new_layer, prev_layer)
                chain = open_chain(manager, vm, volume, new_layer, read_only=True)
                area = replace(areas[index], header=volume.header, size=chain.size)
                out.volumes.append(_Volume(area, chain, grains))
            if isinstance(planned, VolumeArea):
                size = out.volumes[0].area.size
                if planned.capacity < size:
                    raise _too_small(what, planned.capacity, vm, lun, size)
            else:
                volumes = [(v.area.header, v.area.size) for v in out.volumes]
                problem = planned.misfit(volumes, *_sealed_lengths(record.header))
                if problem:
                    raise ReplicaError(
                        _no_longer_fits(vm.name, what, problem, replica_layout(vm).size_needed)
                    )
                layout = out.layout = planned.holding(volumes)
                new_unit = out.record_unit = manager.open_unit(record)
                with contextlib.ExitStack() as stack:
                    prev_unit = (
                        stack.enter_context(contextlib.closing(manager.open_unit(prev)))
                        if prev
                        else None
                    )
                    for sealed_area in (layout.state, layout.config):
                        kind = sealed_area.kind
                        region = new_unit.header.require_region(kind)
                        key = kind.name.lower()
                        same = (
                            prev_unit is not None
                            and out.generations is not None
                            and known is not None
                            and known.get(key) == out.generations[key]
                        )
                        send = not same and (
                            prev_unit is None
                            or not _same_plaintext(prev_unit, new_unit, keyring, kind)
                        )
                        sealer = replace(sealed_area, sealer=new_unit.header)
                        out.sealed.append(_Sealed(sealer, new_unit, region, send))
        except BaseException:
            out.close()
            raise
        return out


# -- pieces: (offset on the destination LUN, data or None for zeros, length) ------------

#: data is a view of a buffer read for this piece alone (never reused): no copy
Piece = tuple[int, bytes | bytearray | memoryview | None, int]


def _grain_runs(grains: list[int] | None, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) runs of whole grains, each at most RUN bytes."""
    per_run = RUN // GRAIN
    wanted = range(grains_of(size)) if grains is None else grains
    start = prev = -2
    count = 0
    for grain in wanted:
        if grain == prev + 1 and count < per_run:
            prev, count = grain, count + 1
            continue
        if start >= 0:
            yield start * GRAIN, min((prev + 1) * GRAIN, size) - start * GRAIN
        start = prev = grain
        count = 1
    if start >= 0:
        yield start * GRAIN, min((prev + 1) * GRAIN, size) - start * GRAIN


def _note_hash(volume: _Volume, disk: BlockBackend, grain: int, data: memoryview) -> None:
    """Record ``grain``'s hash in its hash sector (loaded from the destination first
    when only some of the sector's grains are sent this round)."""
    sector, within = divmod(grain * HASH_BYTES, BLOCK)
    block = volume.hash_sectors.get(sector)
    if block is None:
        if volume.grains is None:  # every grain is sent: every entry is rewritten
            block = bytearray(BLOCK)
        else:
            block = bytearray(disk.read(volume.area.hashes + sector * BLOCK, BLOCK))
        volume.hash_sectors[sector] = block
    block[within : within + HASH_BYTES] = grain_hash(data)


def _prefetch_hashes(volume: _Volume, disk: BlockBackend) -> None:
    """Read the hash sectors a round rewrites in part before staging: one command per
    cluster of sectors (gaps up to 32 KiB read through), not one per sector."""
    assert volume.grains is not None
    per_sector = BLOCK // HASH_BYTES
    wanted = sorted({grain // per_sector for grain in volume.grains})
    gap, most = 64, RUN // BLOCK
    i = 0
    while i < len(wanted):
        j = i + 1
        while j < len(wanted) and wanted[j] - wanted[j - 1] <= gap and wanted[j] - wanted[i] < most:
            j += 1
        first, last = wanted[i], wanted[j - 1]
        data = disk.read(volume.area.hashes + first * BLOCK, (last - first + 1) * BLOCK)
        for sector in wanted[i:j]:
            at = (sector - first) * BLOCK
            volume.hash_sectors[sector] = bytearray(data[at : at + BLOCK])
        i = j


def _volume_pieces(volume: _Volume, disk: BlockBackend, stage: bool) -> Iterator[Piece]:
    """The volume's changed grains (runs of zero grains as None), then its grain-hash
    sectors. The staging pass computes the sectors; the apply pass reuses them."""
    area = volume.area
    size = area.size
    hashing = stage and area.hashes >= 0
    if hashing and volume.grains:
        _prefetch_hashes(volume, disk)
    for offset, length in _grain_runs(volume.grains, size):
        data = memoryview(volume.chain.read(offset, length))
        zeros = []
        for pos in range(0, length, GRAIN):
            grain = data[pos : pos + GRAIN]
            zeros.append(is_zero(grain))
            if hashing:
                _note_hash(volume, disk, (offset + pos) // GRAIN, grain)
        start = 0
        while start < len(zeros):  # one piece per run of zero or of non-zero grains
            end = start + 1
            while end < len(zeros) and zeros[end] == zeros[start]:
                end += 1
            lo, hi = start * GRAIN, min(end * GRAIN, length)
            piece = None if zeros[start] else data[lo:hi]
            yield area.image + offset + lo, piece, hi - lo
            start = end
    sectors = sorted(volume.hash_sectors)
    i = 0
    while i < len(sectors):  # contiguous sectors as one piece, up to RUN bytes
        j = i + 1
        while j < len(sectors) and sectors[j] == sectors[j - 1] + 1 and (j - i) * BLOCK < RUN:
            j += 1
        run = b"".join(volume.hash_sectors[s] for s in sectors[i:j])
        yield area.hashes + sectors[i] * BLOCK, run, len(run)
        i = j


def _sealed_pieces(item: _Sealed) -> Iterator[Piece]:
    """The record region's chunk table and chunks in use, byte for byte (ciphertext)."""
    region = item.region
    if not item.send or region.status is not RegionStatus.VALID or not region.used:
        return
    chunks = sealed.chunks_of(region.used)
    spans = [
        (0, align_block(chunks * sealed.ENTRY)),
        (sealed.table_bytes(region.length), align_block(region.used)),
    ]
    for start, length in spans:
        for pos in range(start, start + length, RUN):
            n = min(RUN, start + length - pos)
            yield item.area.offset + pos, item.unit.backend.read(region.offset + pos, n), n


def _pieces(rnd: _Round, disk: BlockBackend, stage: bool) -> Iterator[Piece]:
    for volume in rnd.volumes:
        yield from _volume_pieces(volume, disk, stage)
    for item in rnd.sealed:
        yield from _sealed_pieces(item)


# -- the acknowledged checkpoint of a disk-only mirror -----------------------------------


def _acks_path(state_root: str, name: str) -> str:
    return os.path.join(state_root, "conf", "replication", f"{name}.json")


def load_acks(state_root: str, name: str) -> dict[str, dict[str, object]]:
    try:
        with open(_acks_path(state_root, name)) as fh:
            value = json.load(fh)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise VmError(f"{_acks_path(state_root, name)}: {exc}") from exc
    return dict(value)


def forget_acks(state_root: str, name: str) -> None:
    """Remove what the source remembers of VM ``name``'s replicas (``vm delete``: a
    later VM of that name starts its own)."""
    with contextlib.suppress(FileNotFoundError):
        atomic_file.remove(_acks_path(state_root, name))


def _save_ack(state_root: str, name: str, tag: str, ack: dict[str, object]) -> None:
    acks = load_acks(state_root, name)
    acks[tag] = ack
    atomic_file.write_json(_acks_path(state_root, name), acks)


# -- a round -----------------------------------------------------------------------------


def replicate_round(
    manager: VmManager,
    name: str,
    disk: BlockBackend,
    checkpointer: Checkpointer,
    *,
    url: str,
    disk_only: bool = False,
    lun: int = 0,
    progress: Progress | None = None,
) -> RoundReport:
    """One round to the replica on ``disk`` (module docstring); returns its report."""
    tag = destination_tag(url, disk_only)
    what = f"the destination {url}"
    vm = manager.find(name)
    sb: Superblock | None = None
    replayed = 0
    ack = load_acks(manager.state.root, name).get(tag) or {}
    if disk_only:
        acked = uuid.UUID(str(ack["record"])) if ack.get("record") else None
        seq = int(ack.get("seq", 0)) + 1  # type: ignore[call-overload]
    else:
        sb = read_superblock(disk)
        if sb is not None:
            if sb.base.unit_uuid != vm.base.header.unit_uuid:
                raise ReplicaError(
                    f"{what} holds a replica of VM {sb.vm_name!r} (base unit "
                    f"{sb.base.unit_uuid}), not of this VM {name!r}: give it a LUN of its own"
                )
            if sb.journal_length:
                sb, replayed = replay(disk, sb)
        acked = sb.record_uuid if sb is not None and sb.seq else None
        seq = (sb.seq if sb is not None else 0) + 1
    planned = _check_destination(vm, disk, sb, what, disk_only, lun)
    snap = checkpoint_name(tag, seq)
    names = [s.name for s in snaps.list_snapshots(manager, name)]
    if snap in names:  # left by a round that never reached its commit
        checkpointer.delete(snap)
    before = sealed_generations(manager.find(name))
    checkpointer.take(snap, f"replication checkpoint {seq} to {url}")
    faults.crashpoint("replicate.checkpoint")
    known = ack.get("generations") if ack.get("record") == str(acked) else None
    rnd = _prepare(
        manager,
        name,
        snap,
        acked,
        planned,
        lun=lun,
        what=what,
        before=before,
        known=known if isinstance(known, dict) else None,
    )
    report = RoundReport(
        seq, snap, full=any(v.grains is None for v in rnd.volumes), replayed=replayed
    )
    report.grains = sum(
        grains_of(v.area.size) if v.grains is None else len(v.grains) for v in rnd.volumes
    )
    report.sealed = [i.area.kind.name.lower() for i in rnd.sealed if i.send and i.region.used]
    try:
        _push(rnd, disk, sb, report, disk_only=disk_only, progress=progress)
    finally:
        rnd.close()
    _save_ack(
        manager.state.root,
        name,
        tag,
        {
            "url": url,
            "seq": seq,
            "checkpoint": snap,
            "record": str(rnd.record.unit_uuid),
            "generations": rnd.generations,
            "time": time.time(),
        },
    )
    prefix = checkpoint_name(tag, 0)[:-1]
    for old in snaps.list_snapshots(manager, name):
        if old.name.startswith(prefix) and old.name != snap:
            checkpointer.delete(old.name)
            report.deleted.append(old.name)
    return report


def _push(
    rnd: _Round,
    disk: BlockBackend,
    sb: Superblock | None,
    report: RoundReport,
    *,
    disk_only: bool,
    progress: Progress | None,
) -> None:
    """Write the round's pieces: staged, committed, applied (:mod:`.replica`); the
    first round, and a disk-only mirror, straight to their places."""
    total = report.grains * GRAIN
    writer = None if disk_only or sb is None else JournalWriter(disk, sb, report.seq)
    done = 0
    for target, data, length in _pieces(rnd, disk, stage=True):
        if data is None:
            report.zeroed += length
        else:
            report.payload += length
        if writer is not None:
            writer.add(target, data, length)
        elif data is None:
            disk.unmap(target, length)
        else:
            disk.write(target, data)
            faults.crashpoint("replicate.writing")
        done = min(total, done + length)
        if progress is not None:
            progress(done, total)
    disk.flush()
    if disk_only:
        return
    assert rnd.layout is not None
    committed = replace(
        writer.committed() if writer is not None else (sb or rnd.layout),
        seq=report.seq,
        record_uuid=rnd.record.unit_uuid,
        checkpoint=report.checkpoint,
        taken=time.time(),
        volumes=rnd.layout.volumes,
        state=_sealed_area(rnd, RegionKind.STATE, sb),
        config=_sealed_area(rnd, RegionKind.CONFIG, sb),
    )
    faults.crashpoint("replicate.staged")
    committed = write_superblock(disk, committed)  # the commit point
    faults.crashpoint("replicate.committed")
    if writer is None:
        return
    for target, data, length in _pieces(rnd, disk, stage=False):
        if data is None:
            disk.unmap(target, length)
        else:
            disk.write(target, data)
        faults.crashpoint("replicate.applying")
    disk.flush()
    clear_journal(disk, committed)


def _sealed_area(rnd: _Round, kind: RegionKind, sb: Superblock | None) -> SealedArea:
    """The sealed area the commit names: the new record's where it was sent, else the
    one the destination already holds (same plaintext, sealed by an older record)."""
    for item in rnd.sealed:
        if item.area.kind is kind:
            if item.send or sb is None:
                return item.area
            return sb.state if kind is RegionKind.STATE else sb.config
    raise VmError(f"no {kind.name.lower()} area")  # pragma: no cover


def replicate(
    manager: VmManager,
    name: str,
    connect: Callable[[], BlockBackend],
    checkpointer: Checkpointer,
    *,
    url: str,
    disk_only: bool = False,
    lun: int = 0,
    interval: float | None = None,
    on_round: Callable[[RoundReport], None] | None = None,
    on_error: Callable[[Exception], None] | None = None,
    progress: Progress | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """One round, or with ``interval`` a round every ``interval`` seconds until
    interrupted (continuous data protection). Connection trouble in continuous mode is
    reported through ``on_error`` and retried at the next interval. Returns rounds done."""
    rounds = 0
    while True:
        started = time.monotonic()
        try:
            disk = connect()
            try:
                report = replicate_round(
                    manager,
                    name,
                    disk,
                    checkpointer,
                    url=url,
                    disk_only=disk_only,
                    lun=lun,
                    progress=progress,
                )
            finally:
                with contextlib.suppress(Exception):
                    disk.close()
            rounds += 1
            if on_round is not None:
                on_round(report)
        except Exception as exc:  # a VmError (wrong VM, too small, ...) never heals by itself
            if interval is None or on_error is None or isinstance(exc, VmError):
                raise
            on_error(exc)
        if interval is None:
            return rounds
        sleep(max(0.0, interval - (time.monotonic() - started)))


RECOVERY.deleted.append(lambda manager, name: forget_acks(manager.state.root, name))
