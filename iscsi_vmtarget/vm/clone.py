"""VM clones (seed: "a clone ... a snapshot that is unlinked from its parent").

``clone`` makes a new VM from the live disks of another, or from one of its snapshots:
new units, hence new identities (UUIDs, NAA designators, serials) for every volume,
never those of the source; the state and config are copied sealed under the new base
unit's own data key.

* a *linked* clone (the default) shares the source snapshot's grains copy-on-write:
  each of its volumes gets a delta whose parent is the snapshot's layer of the source
  volume (chains may cross VMs; discovery indexes every unit by UUID), so it costs
  metadata only. The source VM cannot be deleted while a linked clone rests on it,
  and its garbage collection never merges into or drops what a clone still reads.
  :func:`unlink` copies the shared image into the clone's own units (``vm unlink``).
* a *full* clone (``--full``) reads each volume's image through its chain and writes
  it into the new units (runs of zeros skipped, so they stay sparse).

Crash safety: the new VM is built under a temporary name and only renamed to ``dst``
- one header commit of its base unit - when every byte is in place; a crash before
leaves a VM named ``c-<12 hex digits>`` that ``vm delete`` removes.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable
from dataclasses import replace

from ..storage.backend import BlockBackend
from . import faults
from .discovery import discover
from .errors import VmError
from .format import RegionKind
from .manager import VmManager, check_vm_name
from .snapshot import _copy_sealed, _new_delta, _walk, collect, find_snapshot, open_chain, open_live

Progress = Callable[[int, int], None]
_STEP = 1 << 20


def clone(
    manager: VmManager,
    src: str,
    dst: str,
    *,
    from_snapshot: str | None = None,
    full: bool = True,
    progress: Progress | None = None,
) -> None:
    """Clone VM ``src`` (its live disks, or snapshot ``from_snapshot``) as ``dst``.

    ``full``: copy every block. Otherwise a linked clone: each of the clone's volumes
    gets a delta over the snapshot's layer of the source volume - no data copied - until
    :func:`unlink`; a linked clone of the live disks first takes a snapshot named
    ``clone-DST`` of the source."""
    check_vm_name(dst)
    if not full and from_snapshot is None:
        from .snapshot import create_snapshot

        from_snapshot = f"clone-{dst}"
        create_snapshot(manager, src, from_snapshot)
    pools = manager.catalog.all()
    with manager._locked(pools):
        found = discover(pools, repair=False)
        if found.find(dst) is not None:
            raise VmError(f"a VM named {dst!r} already exists")
        vm = manager.find(src, found)
        keyring = manager.keyring()
        record = find_snapshot(manager, vm, keyring, from_snapshot) if from_snapshot else None
        if record is None and manager.served(vm):
            raise VmError(f"VM {src!r} is being served: clone a snapshot of it (--from-snapshot)")
        luns = vm.lun_map()
        sizes = [luns[n].header.disk_size for n in sorted(luns)]
        memory_region = vm.base.header.require_region(RegionKind.STATE)
    temp = f"c-{uuid.uuid4().hex[:12]}"
    manager.create(
        temp,
        disk=sizes[0],
        memory=1 << 20,
        secondaries=tuple(sizes[1:]),
        mode=vm.base.header.mode,
        pool=vm.base.pool,
    )
    with manager._locked(pools):
        new = manager.find(temp, discover(pools, repair=False))
        total = sum(sizes)
        done = 0
        linked: list[tuple[bytes, uuid.UUID]] = []
        new_luns = new.lun_map()
        for number, volume in sorted(luns.items()) if not full else ():
            assert record is not None  # a linked clone always rests on a snapshot
            parent = dict(record.header.tops)[volume.header.naa]
            delta = _new_delta(manager, new, new_luns[number], parent)
            linked.append((new_luns[number].header.naa, delta.header.unit_uuid))
            faults.crashpoint("clone.linking")
        for number, volume in sorted(luns.items()) if full else ():
            source: BlockBackend
            if record is not None:
                layer = dict(record.header.tops)[volume.header.naa]
                source = open_chain(manager, vm, volume, layer, read_only=True)
            else:
                source = open_live(manager, vm, number)
            target = open_live(manager, new, number)
            try:
                for offset in range(0, source.size, _STEP):
                    n = min(_STEP, source.size - offset)
                    piece = source.read(offset, n)
                    if piece.count(0) != n:
                        target.write(offset, piece)
                    done += n
                    if progress is not None:
                        progress(done, total)
                    faults.crashpoint("clone.copying")
                target.flush()
            finally:
                source.close()
                target.close()
        with (
            contextlib.closing(manager._open(new.base)) as base,
            contextlib.closing(manager._open(record if record is not None else vm.base)) as old,
        ):
            if base.header.require_region(RegionKind.STATE).length < memory_region.length:
                base.grow(state_length=memory_region.length)
            _copy_sealed(old, base, keyring, RegionKind.STATE)
            config = old.read_json(keyring, RegionKind.CONFIG)
            config["name"] = dst
            base.write_json(keyring, RegionKind.CONFIG, config)
            faults.crashpoint("clone.copied")
            if linked:
                base.commit(replace(base.header, tops=tuple(linked)))
            for unit in new.units:  # the rename: the base unit last (the commit point)
                if unit is new.base:
                    continue
                with contextlib.closing(manager._open(unit)) as u:
                    u.commit(replace(u.header, name=dst))
            base.commit(replace(base.header, name=dst))


def unlink(manager: VmManager, name: str, progress: Progress | None = None) -> bool:
    """Make linked clone ``name`` independent: the source image each volume's chain
    rests on is copied into the clone's own volume unit, then the clone's lowest layer
    is re-parented onto it (the commit point; a crash before it leaves an unused,
    partly written unit that the next run overwrites). False if already independent."""
    pools = manager.catalog.all()
    changed = False
    with manager._locked(pools):
        vm = manager.find(name, discover(pools, repair=False))
        if manager.served(vm):
            raise VmError(f"VM {name!r} is being served: unlink it offline")
        mine = vm.base.header.unit_uuid
        for number, volume in sorted(vm.lun_map().items()):
            top = vm.base.header.top_of(volume.header.naa, volume.header.unit_uuid)
            chain, root = _walk(vm, top)
            if root.header.unit_uuid == volume.header.unit_uuid:
                continue
            own = [u for u in chain if u.header.owner_uuid == mine]
            if not own:
                raise VmError(f"VM {name!r}: LUN {number} has no layer of its own")
            lowest = own[-1]
            assert lowest.header.parent_uuid is not None
            source = open_chain(manager, vm, volume, lowest.header.parent_uuid, read_only=True)
            unit = manager._open(volume)
            try:
                target = unit.guest_view()
                try:
                    for offset in range(0, source.size, _STEP):
                        n = min(_STEP, source.size - offset)
                        piece = source.read(offset, n)
                        if piece.count(0) != n:  # the unit is fresh zeros: keep it sparse
                            target.write(offset, piece)
                        if progress is not None:
                            progress(offset + n, source.size)
                        faults.crashpoint("unlink.copying")
                    target.flush()
                finally:
                    target.close()
            finally:
                unit.close()
                source.close()
            with contextlib.closing(manager._open(lowest)) as layer:
                layer.commit(replace(layer.header, parent_uuid=volume.header.unit_uuid))
            faults.crashpoint("unlink.committed")
            changed = True
        for other in discover(pools, repair=False).vms:
            if other.name != name and (other.layers or other.records):
                collect(manager, other.name)  # the source's layers may be free now
        collect(manager, name)
    return changed
