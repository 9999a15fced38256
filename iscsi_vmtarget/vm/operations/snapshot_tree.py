"""The snapshot tree of a VM and the copy-on-write layer chains it is made of: how a
snapshot is named and identified, how a volume's chain is walked from a layer down to
its unit, opened as one block backend, and extended by a new delta or a snapshot
record. The operations on snapshots (:mod:`.snapshot`, :mod:`.snapshot_fill`,
:mod:`.snapshot_resize`, :mod:`.clone`, :mod:`.replicate`, :mod:`.move`) build on it;
the objects are described in :mod:`.snapshot`'s docstring.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from .. import faults
from ..format.crypto import Keyring, new_data_key
from ..format.header import (
    ALIGN,
    SLOT_OFFSETS,
    TAIL_SIZE,
    Mode,
    Region,
    RegionKind,
    RegionStatus,
    Role,
    UnitHeader,
    encode_header,
)
from ..format.layout import align_up
from ..layers.cow import (
    ChainBackend,
    DeltaLayer,
    LiveVolume,
    create_delta,
    delta_header,
    layer_size,
)
from ..manager import VmManager
from ..units import locks
from ..units.scan import FoundUnit, FoundVm, discover
from ..units.unit import Unit, naa_for
from ..vm_errors import NotFoundError, VmError

MAX_SNAPSHOT_NAME = 128


def check_snapshot_name(name: str) -> None:
    if not name or len(name) > MAX_SNAPSHOT_NAME or not name.isprintable() or "/" in name:
        raise VmError(f"bad snapshot name {name!r}: 1-{MAX_SNAPSHOT_NAME} printable characters")


def snapshot_uuid(record: UnitHeader, volume_naa: bytes) -> uuid.UUID:
    """The identity of the snapshot's image of a volume (what its exported LU's
    designator derives from: :mod:`iscsi_vmtarget.server.snapshot_luns`)."""
    return uuid.uuid5(record.unit_uuid, volume_naa.hex())


@dataclass(frozen=True)
class Fullness:
    """How much of its image (all its volumes) a snapshot holds in its own layers."""

    held: int
    size: int

    @property
    def full(self) -> bool:
        return self.held >= self.size


@dataclass(frozen=True)
class SnapshotInfo:
    """One snapshot as ``vm snapshot list`` shows it."""

    name: str
    record: FoundUnit
    created: float
    parent: str | None
    current: bool  # the live disks descend from it directly (what revert last bound)
    #: how much of its image its own layers hold (:mod:`.snapshot_fill`); None: not
    #: looked up (it reads every layer's allocation map)
    fill: Fullness | None = None

    def to_json(self) -> dict[str, object]:
        h = self.record.header
        out: dict[str, object] = {
            "name": self.name,
            "uuid": str(h.unit_uuid),
            "naa": h.naa.hex(),
            "created": self.created,
            "parent": self.parent,
            "current": self.current,
            "layers": {naa.hex(): str(layer) for naa, layer in h.tops},
        }
        if self.fill is not None:  # "bytes": what it holds itself, "size": its images
            out.update(full=self.fill.full, bytes=self.fill.held, size=self.fill.size)
        return out


# -- structure ---------------------------------------------------------------------------


def vm_volumes(vm: FoundVm) -> dict[int, FoundUnit]:
    return vm.lun_map()


def live_top(vm: FoundVm, volume: FoundUnit) -> uuid.UUID:
    return vm.base.header.top_of(volume.header.naa, volume.header.unit_uuid)


def record_layer(record: UnitHeader, volume: FoundUnit) -> uuid.UUID:
    for naa, layer in record.tops:
        if naa == volume.header.naa:
            return layer
    raise VmError(f"snapshot {record.unit_uuid} has no layer for volume {volume.header.naa.hex()}")


def walk_chain(vm: FoundVm, start: uuid.UUID) -> tuple[list[FoundUnit], FoundUnit]:
    """The delta layers from ``start`` down, and the volume unit the chain ends at: the
    volume's own unit, or for a linked clone its source's (:mod:`.clone`)."""
    index = vm.index or {u.header.unit_uuid: u for u in (*vm.units, *vm.layers)}
    out: list[FoundUnit] = []
    current = start
    while True:
        unit = index.get(current)
        if unit is None or len(out) > 100000:
            raise VmError(f"VM {vm.name!r}: layer {current} of a snapshot chain is missing")
        if unit.header.role is not Role.DELTA:
            return out, unit
        out.append(unit)
        assert unit.header.parent_uuid is not None
        current = unit.header.parent_uuid


def delta_layers(vm: FoundVm, volume: FoundUnit, start: uuid.UUID) -> list[FoundUnit]:
    """The delta layers from ``start`` down to (not including) the root volume unit."""
    return walk_chain(vm, start)[0]


def open_chain(
    manager: VmManager,
    vm: FoundVm,
    volume: FoundUnit,
    start: uuid.UUID,
    *,
    read_only: bool,
    on_close: Callable[[], None] | None = None,
) -> ChainBackend:
    """A block backend of ``volume``'s guest disk as the layer ``start`` sees it (its
    size is that layer's: a snapshot keeps the size the disk had). ``on_close`` runs
    once when the chain is closed (a served disk's serve lock and lease go with it)."""
    chain, root_unit = walk_chain(vm, start)
    size = root_unit.header.disk_size  # what layers that do not record a size have
    layers: list[DeltaLayer] = []
    try:
        for found in chain:
            pool = manager.catalog.get(found.pool)
            layers.append(DeltaLayer(pool.open(found.ref), found.header, size))
        unit = Unit.open(manager.catalog.get(root_unit.pool), root_unit.ref, repair=False)
        try:
            root = unit.guest_view(read_only=True)
        finally:
            unit.close()
    except BaseException:
        for layer in layers:
            layer.close()
        raise
    return ChainBackend(layers, root, read_only=read_only, on_close=on_close)


def snapshot_meta(manager: VmManager, keyring: Keyring, record: FoundUnit) -> dict[str, object]:
    with contextlib.closing(manager.open_unit(record)) as unit:
        return unit.read_json(keyring, RegionKind.SNAPMETA)


def snapshots(manager: VmManager, vm: FoundVm, keyring: Keyring) -> list[SnapshotInfo]:
    """The VM's snapshots, oldest first, with their parents (the tree)."""
    lun0 = vm.base
    layer_of = {r.header.unit_uuid: record_layer(r.header, lun0) for r in vm.records}
    record_at = {layer: r for r, layer in ((r, layer_of[r.header.unit_uuid]) for r in vm.records)}
    names = {
        r.header.unit_uuid: str(snapshot_meta(manager, keyring, r).get("name", ""))
        for r in vm.records
    }
    top_chain = delta_layers(vm, lun0, live_top(vm, lun0))
    current_layer = top_chain[0].header.parent_uuid if top_chain else None
    out = []
    for record in vm.records:
        parent = None
        chain = delta_layers(vm, lun0, layer_of[record.header.unit_uuid])
        ancestors = [u.header.parent_uuid for u in chain]
        for ancestor in ancestors:
            if ancestor in record_at:
                parent = names[record_at[ancestor].header.unit_uuid]
                break
        out.append(
            SnapshotInfo(
                names[record.header.unit_uuid],
                record,
                record.header.created,
                parent,
                layer_of[record.header.unit_uuid] == current_layer,
            )
        )
    out.sort(key=lambda s: (s.created, s.name))
    return out


def find_snapshot(manager: VmManager, vm: FoundVm, keyring: Keyring, snap: str) -> FoundUnit:
    for info in snapshots(manager, vm, keyring):
        if info.name == snap:
            return info.record
    raise NotFoundError(f"VM {vm.name!r} has no snapshot named {snap!r}")


# -- creation helpers --------------------------------------------------------------------


def chain_size(vm: FoundVm, start: uuid.UUID) -> int:
    """The size of the image the layer (or volume unit) ``start`` holds."""
    chain, root = walk_chain(vm, start)
    return layer_size(chain[0].header, root.header.disk_size) if chain else root.header.disk_size


def new_delta(
    manager: VmManager,
    vm: FoundVm,
    volume: FoundUnit,
    parent: uuid.UUID,
    size: int | None = None,
) -> FoundUnit:
    """A new empty delta over ``parent``, of the parent's size unless ``size`` (a grown
    disk) says more."""
    unit_uuid = uuid.uuid4()
    header = delta_header(
        unit_uuid=unit_uuid,
        naa=naa_for(unit_uuid),
        name=vm.name,
        owner=vm.base.header.unit_uuid,
        volume_naa=volume.header.naa,
        parent=parent,
        disk_size=size if size is not None else chain_size(vm, parent),
        created=int(time.time()),
    )
    ref = create_delta(manager.catalog.get(volume.pool), header)
    return FoundUnit(volume.pool, ref, header)


def create_record(
    manager: VmManager,
    vm: FoundVm,
    base: Unit,
    keyring: Keyring,
    frozen: tuple[tuple[bytes, uuid.UUID], ...],
    meta: dict[str, object],
    record_uuid: uuid.UUID | None = None,
) -> uuid.UUID:
    """A snapshot record holding a copy of the VM's state and config (sealed with a
    data key of its own) and the metadata; visible only once whole (rename)."""
    record_uuid = record_uuid or uuid.uuid4()
    master = keyring.current
    regions: list[Region] = []
    cursor = 0
    for kind in (RegionKind.CONFIG, RegionKind.SNAPMETA, RegionKind.STATE):
        length = base.header.require_region(kind).length
        regions.append(Region(kind, cursor, length, encrypted=True))
        cursor = align_up(cursor + length, ALIGN)
    regions.append(Region(RegionKind.META, cursor, TAIL_SIZE))
    header = UnitHeader(
        unit_uuid=record_uuid,
        naa=naa_for(record_uuid),
        role=Role.SNAPSHOT,
        mode=Mode.TRUNCATE,
        unit_size=cursor + TAIL_SIZE,
        regions=tuple(regions),
        name=vm.name,
        owner_uuid=vm.base.header.unit_uuid,
        created=int(time.time()),
        key_id=master.key_id,
        wrapped_key=master.wrap(new_data_key()),
        tops=frozen,
        generation=1,
    )
    pool = manager.catalog.get(vm.base.pool)
    ref, backend = pool.allocate(record_uuid, header.unit_size)
    try:
        backend.write(header.meta_offset + SLOT_OFFSETS[0], encode_header(header))
        record = Unit(pool, ref, backend, header, 0)
        copy_sealed(base, record, keyring, RegionKind.STATE)
        copy_sealed(base, record, keyring, RegionKind.CONFIG)
        record.write_json(keyring, RegionKind.SNAPMETA, meta)
        backend.flush()
        faults.crashpoint("snapshot.record")
        pool.commit(ref, backend)
    except BaseException:
        pool.abandon(ref, backend)
        raise
    backend.close()
    return record_uuid


def copy_sealed(src: Unit, dst: Unit, keyring: Keyring, kind: RegionKind) -> None:
    region = src.header.require_region(kind)
    if region.status is RegionStatus.EMPTY:
        dst.write_region(keyring, kind, [], 0)
        return
    dst.write_region(keyring, kind, src.read_region(keyring, kind), region.used)


@contextlib.contextmanager
def holding_vm(
    manager: VmManager, vm: FoundVm, live: Mapping[int, LiveVolume] | None
) -> Iterator[dict[int, ChainBackend]]:
    """Offline: refuse while a server exports the VM; yields no chains. Live (the
    daemon's volumes, by LUN): yields them as chains (:meth:`LiveVolume.chain`: a
    volume served as its plain view becomes one, before any LUN is held), each
    quiesced - in-flight commands drain, new ones wait - and flushed, so the snapshot
    is consistent across all the VM's volumes (US 9,354,927)."""
    chains: dict[int, ChainBackend] = {}
    with contextlib.ExitStack() as stack:
        if live is None:
            for unit in vm.units:
                stack.enter_context(
                    locks.not_served(manager.state.root, unit.header.unit_uuid, f"VM {vm.name!r}")
                )
        else:
            missing = set(vm_volumes(vm)) - set(live)
            if missing:
                raise VmError(f"VM {vm.name!r}: LUNs {sorted(missing)} are not served here")
            chains = {number: volume.chain() for number, volume in sorted(live.items())}
            for chain in chains.values():
                stack.enter_context(chain.quiesce())
                chain.flush_quiesced()
        yield chains


def rediscover_vm(manager: VmManager, name: str) -> FoundVm:
    return manager.find(name, discover(manager.catalog.all(), repair=False))


