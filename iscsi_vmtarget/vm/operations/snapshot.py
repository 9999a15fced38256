"""VM snapshots: create, list, revert, delete (merge), open; all from the units alone.

US 9,354,927: the storage layer takes "a snapshot of the virtual machine, including its
execution state and virtual disks", keeps chains of snapshots where each "may contain
only the differences relative to a predecessor", reverts ("binding" the matching
secondary-disk snapshots), and deletes an intermediate snapshot by merging it into its
neighbour. Our objects (all units in the VM's pools, :mod:`..format.header` version 2):

* every volume (the base unit's disk, each secondary's) is a chain of copy-on-write
  layers (:mod:`..layers.cow`); the base unit's header lists the live *top* layer of each
  volume (its ``tops``); a volume without snapshots has no entry and is its own top;
* a snapshot is a *record* unit (role SNAPSHOT) owned by the base unit: its header
  lists, per volume, the frozen layer holding the snapshot's image (plaintext, so
  discovery and merges need no key), and its sealed regions hold the VM's state and
  config at snapshot time plus the snapshot metadata (name, time: SNAPMETA).

The tree needs no parent pointers of its own: a snapshot's parent is the nearest
snapshot whose layer is an ancestor of its layer in the LUN 0 chain (layers a record
names are never merged away). Every change ends in one atomic step - a header commit
of the base unit, a unit renamed into place, or a unit file removed - and whatever a
crash leaves before that step is garbage that :func:`collect` removes (an unreferenced
delta) or finishes (a merge) the next time the VM's pools are repaired.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace

from ...storage.backend import BlockBackend
from .. import faults
from ..format.crypto import Keyring
from ..format.header import RegionKind, Role
from ..layers.cow import GRAIN, ChainBackend, DeltaLayer, LiveVolume
from ..manager import RECOVERY, VmManager
from ..units.scan import FoundUnit, FoundVm
from ..units.unit import Unit
from ..vm_errors import NotFoundError, VmError
from .export_marks import exported
from .snapshot_fill import fill_snapshot, fullness
from .snapshot_tree import (
    SnapshotInfo,
    chain_size,
    check_snapshot_name,
    copy_sealed,
    create_record,
    find_snapshot,
    holding_vm,
    live_top,
    new_delta,
    open_chain,
    record_layer,
    rediscover_vm,
    snapshots,
    vm_volumes,
)


@contextlib.contextmanager
def _settled(manager: VmManager, name: str) -> Iterator[tuple[FoundVm, Keyring]]:
    """VM ``name`` in a session of ``manager``, a revert a crash interrupted finished
    first (what every snapshot change starts from)."""
    with manager.session() as session:
        vm = session.find(name)
        keyring = manager.keyring()
        if finish_revert(manager, vm, keyring):
            vm = rediscover_vm(manager, name)
        yield vm, keyring


def with_fullness(manager: VmManager, vm: FoundVm, info: SnapshotInfo) -> SnapshotInfo:
    return replace(info, fill=fullness(manager, vm, info.record.header))



# -- operations --------------------------------------------------------------------------


def create_snapshot(
    manager: VmManager,
    name: str,
    snap: str,
    *,
    description: str = "",
    live: Mapping[int, LiveVolume] | None = None,
    full: bool = False,
    progress: Callable[[int, int], None] | None = None,
    record_uuid: uuid.UUID | None = None,
) -> SnapshotInfo:
    """Snapshot every volume of VM ``name`` and its state and config, consistently.

    Each volume's top layer is frozen and a new empty delta becomes its top: metadata
    only, whatever the disk size. The commit point is the base unit's header commit
    naming the new tops; a crash before it leaves only garbage (:func:`collect`).

    ``live``: the volumes a server in this process exports for the VM, by LUN (the
    daemon's ``vm.snapshot`` action), each made a chain if it is not one yet. Their
    I/O is quiesced - in-flight commands drain, new ones wait - for the whole
    operation, their layers flushed first, and the new tops are pushed onto them
    before I/O resumes. Without it, a served VM is refused.

    ``full``: then copy into the frozen layers every grain they lack, I/O flowing
    (:func:`~.snapshot_fill.fill_snapshot`, reporting to ``progress``), so the
    snapshot holds all its data rather than its difference against a predecessor.

    ``record_uuid``: the UUID the snapshot's record unit gets, chosen by a caller that
    names it in an intent before the record exists (a clone, :mod:`.clone`).
    """
    check_snapshot_name(snap)
    with _settled(manager, name) as (vm, keyring):
        if any(s.name == snap for s in snapshots(manager, vm, keyring)):
            raise VmError(f"VM {name!r} already has a snapshot named {snap!r}")
        with (
            holding_vm(manager, vm, live) as chains,
            contextlib.closing(manager.open_unit(vm.base)) as base,
        ):
            base.data_key(keyring)  # a wrong key file fails before any change
            volumes = vm_volumes(vm)
            frozen = tuple((v.header.naa, live_top(vm, v)) for v in volumes.values())
            deltas = {n: new_delta(manager, vm, v, live_top(vm, v)) for n, v in volumes.items()}
            new_tops = tuple((v.header.naa, deltas[n].header.unit_uuid) for n, v in volumes.items())
            faults.crashpoint("snapshot.deltas")
            create_record(
                manager,
                vm,
                base,
                keyring,
                frozen,
                {"name": snap, "created": time.time(), "description": description},
                record_uuid,
            )
            base.commit(replace(base.header, tops=new_tops))
            faults.crashpoint("snapshot.committed")
            for number, chain in chains.items():
                found = deltas[number]
                pool = manager.catalog.get(found.pool)
                top = DeltaLayer(pool.open(found.ref), found.header, chain.size)
                chain.rebind([top, *chain.layers])
    if full:
        fill_snapshot(manager, name, snap, progress=progress)
    return snapshot_info(manager, name, snap)


def list_snapshots(manager: VmManager, name: str, *, fullness: bool = False) -> list[SnapshotInfo]:
    """The VM's snapshots (:func:`snapshots`); ``fullness``: with how much of its
    image each holds itself (reads every snapshot layer's allocation map)."""
    with manager.session() as session:
        vm = session.find(name)
        infos = snapshots(manager, vm, manager.keyring())
        return [with_fullness(manager, vm, i) for i in infos] if fullness else infos


def snapshot_info(manager: VmManager, name: str, snap: str) -> SnapshotInfo:
    """Snapshot ``snap`` of VM ``name`` as ``vm snapshot list`` shows it (fullness too)."""
    with manager.session(repair=False) as session:
        vm = session.find(name)
        for info in snapshots(manager, vm, manager.keyring()):
            if info.name == snap:
                return with_fullness(manager, vm, info)
    raise NotFoundError(f"VM {name!r} has no snapshot named {snap!r}")


def revert(
    manager: VmManager,
    name: str,
    snap: str,
    *,
    live: Mapping[int, LiveVolume] | None = None,
) -> SnapshotInfo:
    """Bind VM ``name`` to snapshot ``snap``: every volume gets a new empty top over
    the snapshot's layer (secondary disks included), the state and config come back
    from the record. The live disks' unsnapshotted changes are discarded.

    ``live``: as for :func:`create_snapshot`; the served chains are rebound to the
    snapshot's layers under quiesce (the guest keeps seeing its volume's identity)."""
    with _settled(manager, name) as (vm, keyring):
        record_found = find_snapshot(manager, vm, keyring, snap)
        with (
            holding_vm(manager, vm, live) as chains,
            contextlib.closing(manager.open_unit(vm.base)) as base,
            contextlib.closing(manager.open_unit(record_found)) as record,
        ):
            base.data_key(keyring)
            record.data_key(keyring)
            volumes = vm_volumes(vm)
            deltas = {
                n: new_delta(manager, vm, v, record_layer(record.header, v))
                for n, v in volumes.items()
            }
            new_tops = tuple((v.header.naa, deltas[n].header.unit_uuid) for n, v in volumes.items())
            faults.crashpoint("revert.deltas")
            pending = (PENDING_REVERT, record.header.unit_uuid)
            base.commit(replace(base.header, tops=(*new_tops, pending)))  # the commit point
            faults.crashpoint("revert.committed")
            _restore(base, record, keyring)
            faults.crashpoint("revert.restored")
            if chains:
                vm = rediscover_vm(manager, name)
                for number, chain in chains.items():
                    volume = volumes[number]
                    fresh = open_chain(
                        manager, vm, volume, deltas[number].header.unit_uuid, read_only=False
                    )
                    layers, fresh.layers = fresh.layers, []
                    fresh.close()  # its read-only root only
                    chain.rebind(layers)
        collect(manager, name)
        vm = rediscover_vm(manager, name)
        for info in snapshots(manager, vm, keyring):
            if info.name == snap:
                return info
    raise VmError("snapshot vanished")  # pragma: no cover


def delete_snapshot(
    manager: VmManager,
    name: str,
    snap: str,
    *,
    live: Mapping[int, LiveVolume] | None = None,
) -> None:
    """Delete snapshot ``snap``: its record goes, then its layer is merged into its
    only child (or dropped if nothing depends on it); every other snapshot and the
    live disks read the same bytes as before. While this process serves the VM
    (``live``) layers merge only into frozen children (never into a top the guest
    writes), then the served chains are rebound to the shorter chains under quiesce.
    A snapshot marked for export is refused: its LUN would go on serving a snapshot
    that no longer exists (stop the export first)."""
    if (name, snap) in exported(manager.state.root):
        raise VmError(
            f"snapshot {snap!r} of VM {name!r} is exported as a read-only LUN; stop that "
            f"first: iscsi-vmtarget vm snapshot export {name} {snap} --stop"
        )
    with _settled(manager, name) as (vm, keyring):
        record = find_snapshot(manager, vm, keyring, snap)
        with holding_vm(manager, vm, live):
            manager.catalog.get(record.pool).delete(record.ref)
            faults.crashpoint("snapshot.deleted")
        collect(manager, name, live=live)


def open_snapshot(manager: VmManager, name: str, snap: str, lun: int = 0) -> ChainBackend:
    """A read-only block backend of the snapshot's image of LUN ``lun``."""
    with manager.session(repair=False) as session:
        vm = session.find(name)
        record = find_snapshot(manager, vm, manager.keyring(), snap)
        volume = vm_volumes(vm).get(lun)
        if volume is None:
            raise NotFoundError(f"VM {name!r} has no LUN {lun}")
        return open_chain(manager, vm, volume, record_layer(record.header, volume), read_only=True)


def open_live(manager: VmManager, vm: FoundVm, lun: int = 0) -> BlockBackend:
    """A writable backend of LUN ``lun``'s live disk (offline use: tests, tools)."""
    volume = vm_volumes(vm)[lun]
    top = live_top(vm, volume)
    if top == volume.header.unit_uuid:
        unit = manager.open_unit(volume)
        try:
            return unit.guest_view()
        finally:
            unit.close()
    return open_chain(manager, vm, volume, top, read_only=False)


# -- garbage collection and merges -------------------------------------------------------


#: A tops entry that is no volume: "the state and config of this record are still
#: being restored" (a revert's roll-forward journal, finished by :func:`finish_revert`).
PENDING_REVERT = bytes(15) + b"\x01"


def _restore(base: Unit, record: Unit, keyring: Keyring) -> None:
    """Copy the record's state and config into the base unit, then drop the pending
    mark (idempotent: a crash in between is finished by running it again)."""
    copy_sealed(record, base, keyring, RegionKind.STATE)
    copy_sealed(record, base, keyring, RegionKind.CONFIG)
    tops = tuple((n, t) for n, t in base.header.tops if n != PENDING_REVERT)
    base.commit(replace(base.header, tops=tops))


def finish_revert(manager: VmManager, vm: FoundVm, keyring: Keyring) -> str | None:
    """Finish a revert a crash interrupted after its commit point (state and config
    not yet all restored from the record). Callers hold the pool locks."""
    pending = [t for n, t in vm.base.header.tops if n == PENDING_REVERT]
    if not pending:
        return None
    records = {r.header.unit_uuid: r for r in vm.records}
    with contextlib.closing(manager.open_unit(vm.base)) as base:
        found = records.get(pending[0])
        if found is None:
            tops = tuple((n, t) for n, t in base.header.tops if n != PENDING_REVERT)
            base.commit(replace(base.header, tops=tops))
            return "pending revert dropped: its snapshot record is gone"
        with contextlib.closing(manager.open_unit(found)) as record:
            _restore(base, record, keyring)
    return f"interrupted revert finished (state and config from {found.ref.location})"


def collect(
    manager: VmManager, name: str, *, live: Mapping[int, LiveVolume] | None = None
) -> list[str]:
    """Bring VM ``name``'s layers back to the invariant (callers hold the pool locks):

    * a record naming a live top was cut short before its commit: removed;
    * a delta no top or record depends on: removed;
    * a layer that is neither a top nor a record's, with exactly one child: merged
      into that child (grains the child lacks are copied into it, then the child is
      re-parented, then the layer removed), so the chain stays short.

    While another process exports the VM only removals run (a merge must not race
    guest writes nor change a layer the server has open); merges wait for an offline
    run. ``live``: the chains this process serves (the daemon): merges run, but never
    into a top (the only layer a guest writes; a merge writes only grains its child
    lacks, which the served chain still reads from the merged layer's open file), and
    the chains are rebound to the merged layers afterwards (:func:`_rebind_live`).
    """
    notes: list[str] = []
    try:
        note = finish_revert(manager, rediscover_vm(manager, name), manager.keyring())
    except VmError as exc:  # e.g. no key file here: leave it for a run that has one
        note = f"interrupted revert not finished: {exc}"
    if note:
        notes.append(note)
    while True:
        vm = rediscover_vm(manager, name)
        merges = live is not None or not manager.served(vm)
        step = _collect_step(manager, vm, merges=merges, live=live is not None)
        if step is None:
            break
        notes.append(step)
    if live and notes:
        _rebind_live(manager, name, live)
    return notes


def _rebind_live(manager: VmManager, name: str, live: Mapping[int, LiveVolume]) -> None:
    """Give the served chains their layers as they now are (merged layers gone), under
    quiesce, after their tops were flushed (as :func:`revert` does)."""
    vm = rediscover_vm(manager, name)
    volumes = vm_volumes(vm)
    with holding_vm(manager, vm, live) as chains:
        for number, chain in chains.items():
            volume = volumes[number]
            fresh = open_chain(manager, vm, volume, live_top(vm, volume), read_only=False)
            layers, fresh.layers = fresh.layers, []
            fresh.close()  # its read-only root only
            chain.rebind(layers)


def _collect_step(
    manager: VmManager, vm: FoundVm, *, merges: bool, live: bool = False
) -> str | None:
    volumes = list(vm_volumes(vm).values())
    tops = {live_top(vm, v) for v in volumes}
    for record in vm.records:
        if any(layer in tops for _naa, layer in record.header.tops):
            manager.catalog.get(record.pool).delete(record.ref)
            return f"unfinished snapshot record {record.ref.location} removed"
    record_layers = {layer for r in vm.records for _naa, layer in r.header.tops}
    own = {u.header.unit_uuid for u in (*vm.layers, *volumes)}
    foreign = [  # linked clones' deltas (other VMs) whose parent is one of our units
        u
        for u in vm.index.values()
        if u.header.role is Role.DELTA
        and u.header.owner_uuid != vm.base.header.unit_uuid
        and u.header.parent_uuid in own
    ]
    reachable: set[uuid.UUID] = set()
    by_uuid = {u.header.unit_uuid: u for u in vm.layers}
    anchors = {u.header.parent_uuid for u in foreign if u.header.parent_uuid is not None}
    for start in tops | record_layers | anchors:
        current: uuid.UUID | None = start
        while current is not None and current in by_uuid and current not in reachable:
            reachable.add(current)
            current = by_uuid[current].header.parent_uuid
    for layer in vm.layers:
        if layer.header.unit_uuid not in reachable:
            manager.catalog.get(layer.pool).delete(layer.ref)
            return f"unreferenced layer {layer.ref.location} removed"
    if not merges:
        return None
    children: dict[uuid.UUID, list[FoundUnit]] = {}
    for layer in (*vm.layers, *foreign):
        assert layer.header.parent_uuid is not None
        children.setdefault(layer.header.parent_uuid, []).append(layer)
    mine = vm.base.header.unit_uuid
    for layer in vm.layers:
        lid = layer.header.unit_uuid
        kids = children.get(lid, [])
        if lid in tops or lid in record_layers or len(kids) != 1:
            continue
        if kids[0].header.owner_uuid != mine:  # never write into another VM's layer
            continue
        if live and kids[0].header.unit_uuid in tops:  # the guest writes there
            continue
        kid = kids[0].header.unit_uuid
        _merge_down(manager, layer, kids[0], chain_size(vm, lid), chain_size(vm, kid))
        return f"layer {layer.ref.location} merged into {kids[0].ref.location}"
    for volume in volumes:
        vid = volume.header.unit_uuid
        kids = children.get(vid, [])
        if vid in tops or vid in record_layers or len(kids) != 1:
            continue
        child = kids[0]
        if child.header.unit_uuid in record_layers or child.header.owner_uuid != mine:
            continue
        if live and child.header.unit_uuid in tops:
            continue
        size = chain_size(vm, child.header.unit_uuid)
        if size != volume.header.disk_size and live:
            continue  # the disk grew: the unit must grow first, never under a served chain
        _merge_into_root(manager, vm, volume, child, children.get(child.header.unit_uuid, []), size)
        return f"layer {child.ref.location} merged into its volume {volume.ref.location}"
    return None


def _merge_down(
    manager: VmManager, layer: FoundUnit, child: FoundUnit, size: int, child_size: int
) -> None:
    """Copy the grains of ``layer`` its child lacks into the child (its image is
    unchanged: it read them through ``layer`` before), re-parent the child, drop
    ``layer``. Idempotent, so a crash at any point is finished by the next run. A
    child larger than ``layer`` (the disk grew in between) reads zeros past the
    layer's size both before and after: below ``layer`` nothing is larger than it
    but the volume's unit, zeros there (:class:`~..layers.cow.DeltaLayer`)."""
    src_pool = manager.catalog.get(layer.pool)
    dst_unit = manager.open_unit(child)
    try:
        src = DeltaLayer(src_pool.open(layer.ref), layer.header, size)
        dst = DeltaLayer(manager.catalog.get(child.pool).open(child.ref), child.header, child_size)
        try:
            buf = bytearray(GRAIN)
            for grain in src.allocated():
                if dst.has(grain):
                    continue
                start = grain * GRAIN
                n = min(GRAIN, size - start)
                piece = memoryview(buf)[:n]
                src.read_into(start, piece)
                dst.write(start, piece)
                dst.mark(grain)
                faults.crashpoint("merge.copying")
            dst.flush()
        finally:
            src.close()
            dst.close()
        faults.crashpoint("merge.copied")
        dst_unit.commit(replace(dst_unit.header, parent_uuid=layer.header.parent_uuid))
    finally:
        dst_unit.close()
    src_pool.delete(layer.ref)


def _merge_into_root(
    manager: VmManager,
    vm: FoundVm,
    volume: FoundUnit,
    child: FoundUnit,
    grandchildren: list[FoundUnit],
    size: int,
) -> None:
    """The volume's own unit is referenced by nobody but its single child (of
    ``size`` bytes): write the child's grains into the unit, re-point the child's
    dependents (or the VM's top) at the unit, drop the child. A child larger than the
    unit (the disk grew while it had snapshots) first has the unit grow to its size
    (crash-safe; the new space reads zeros, as it did through the child)."""
    if size > volume.header.disk_size:
        with contextlib.closing(manager.open_unit(volume)) as grown:
            grown.grow(size)
        faults.crashpoint("merge.grown")
    unit = manager.open_unit(volume)
    try:
        view = unit.guest_view()
        src = DeltaLayer(manager.catalog.get(child.pool).open(child.ref), child.header, size)
        try:
            buf = bytearray(GRAIN)
            for grain in src.allocated():
                start = grain * GRAIN
                n = min(GRAIN, size - start)
                piece = memoryview(buf)[:n]
                src.read_into(start, piece)
                view.write(start, piece)
                faults.crashpoint("merge.copying")
            view.flush()
        finally:
            src.close()
            view.close()
    finally:
        unit.close()
    faults.crashpoint("merge.copied")
    for grandchild in grandchildren:
        with contextlib.closing(manager.open_unit(grandchild)) as g:
            g.commit(replace(g.header, parent_uuid=volume.header.unit_uuid))
    if live_top(vm, volume) == child.header.unit_uuid:
        with contextlib.closing(manager.open_unit(vm.base)) as base:
            tops = tuple((n, t) for n, t in base.header.tops if n != volume.header.naa)
            base.commit(replace(base.header, tops=tops))
    manager.catalog.get(child.pool).delete(child.ref)


def describe(infos: list[SnapshotInfo]) -> str:
    """The tree as indented text (``vm snapshot list``)."""
    by_parent: dict[str | None, list[SnapshotInfo]] = {}
    for info in infos:
        by_parent.setdefault(info.parent, []).append(info)
    lines: list[str] = []

    def walk(parent: str | None, depth: int) -> None:
        for info in by_parent.get(parent, []):
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(info.created))
            mark = "  <- current" if info.current else ""
            if info.fill is not None:
                kind = "full" if info.fill.full else "delta"
                mark = f"  {kind} {info.fill.held}/{info.fill.size} bytes{mark}"
            lines.append(
                f"{'  ' * depth}{info.name}  {stamp}  naa.{info.record.header.naa.hex()}{mark}"
            )
            walk(info.name, depth + 1)

    walk(None, 0)
    return "\n".join(lines)


def to_json(infos: list[SnapshotInfo]) -> str:
    return json.dumps([i.to_json() for i in infos], indent=2)


__all__ = [
    "SnapshotInfo",
    "collect",
    "create_snapshot",
    "delete_snapshot",
    "list_snapshots",
    "open_live",
    "open_snapshot",
    "revert",
]


RECOVERY.vm_found.append(lambda manager, vm: collect(manager, vm.name))
