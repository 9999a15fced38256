"""VM clones (US 9,354,927: "a clone ... a snapshot that is unlinked from its parent").

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

Crash safety: the new VM is built under a temporary name ``c-<12 hex digits>`` and
only renamed to ``dst`` - one header commit of its base unit - when every byte is in
place. An intent file ``<state-dir>/conf/clones/<temp>.json``, written first and held
by an :func:`~..units.locks.operation` lock while the clone runs, names the temporary VM and
the snapshot a clone of live disks takes (its record UUID, chosen before the snapshot
exists); a clone that fails, or is killed, leaves an intent nobody holds, and
:func:`finish_clones` (run with every pool lock, so at the next repair or
``discover``) deletes the temporary VM and that snapshot.

**Live** (the daemon's ``vm.clone`` and ``vm.unlink`` actions, for a VM it serves):
a clone of the live disks takes its snapshot with the source's LUNs quiesced, as
``vm snapshot`` does (``live`` chains), so the guest notices nothing; the linked clone
is then metadata over that snapshot's frozen layers. :func:`unlink` of a served clone
copies the frozen image its chains rest on into its own units while its guest writes
(only into its own top layers, never read by the copy), then commits and rebinds the
served chains onto its own units under quiesce.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace

from ...storage import atomic_file
from ...storage.backend import BlockBackend
from .. import faults
from ..format.header import RegionKind
from ..layers.cow import ChainBackend, LiveVolume, is_zero
from ..manager import RECOVERY, VmManager, check_vm_name
from ..units.scan import FoundUnit, FoundVm, discover
from ..units.unit import Unit
from ..vm_errors import VmError
from . import intents
from .snapshot import collect, create_snapshot, delete_snapshot, list_snapshots, open_live
from .snapshot_tree import chain_size, copy_sealed, find_snapshot, new_delta, open_chain, walk_chain

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
    live: Mapping[int, LiveVolume] | None = None,
) -> str | None:
    """Clone VM ``src`` (its live disks, or snapshot ``from_snapshot``) as ``dst``.

    ``full``: copy every block. Otherwise a linked clone: each of the clone's volumes
    gets a delta over the snapshot's layer of the source volume - no data copied - until
    :func:`unlink`; a linked clone of the live disks first takes a snapshot of the
    source named ``clone-DST`` (with the time appended if that name is taken).

    ``live``: the volumes this process serves for ``src``, by LUN (the daemon's
    ``vm.clone``, :class:`~..layers.cow.LiveVolume`): that snapshot is taken with them
    quiesced, so a served VM clones too - a full clone then copies from the snapshot
    and deletes it afterwards.
    Returns the name of the snapshot taken and kept (a linked clone's), else None."""
    check_vm_name(dst)
    found = discover(manager.catalog.all(), repair=False)
    if found.find(dst) is not None:
        raise VmError(f"a VM named {dst!r} already exists")
    # no such VM or snapshot: refused before the intent is written (nothing to undo)
    vm = manager.find(src, found)
    keyring = manager.keyring()  # an unusable key file, too
    if from_snapshot is not None:
        find_snapshot(manager, vm, keyring, from_snapshot)
    temp = f"c-{uuid.uuid4().hex[:12]}"
    snapshot_first = from_snapshot is None and (not full or live is not None)
    intent = {"temp": temp, "src": src, "dst": dst}
    with intents.held(manager, KIND, temp, intent):
        if snapshot_first:
            from_snapshot = _snapshot_name(manager, src, dst)
            record = uuid.uuid4()  # named before it exists: no crash point escapes the intent
            intent.update(snapshot=str(record), snapshot_name=from_snapshot)
            atomic_file.write_json(intents.intent_path(manager, KIND, temp), intent)
            create_snapshot(manager, src, from_snapshot, live=live, record_uuid=record)
            faults.crashpoint("clone.snapshotted")
        _build(manager, src, dst, temp, from_snapshot, full, progress)
    if snapshot_first and full:
        assert from_snapshot is not None
        delete_snapshot(manager, src, from_snapshot, live=live)
    return from_snapshot if snapshot_first and not full else None


def _snapshot_name(manager: VmManager, src: str, dst: str) -> str:
    """``clone-DST``, or ``clone-DST-<UTC time>`` when ``src`` has a snapshot of that
    name already (kept from an earlier clone named DST, deleted since)."""
    name = f"clone-{dst}"
    if any(info.name == name for info in list_snapshots(manager, src)):
        name += time.strftime("-%Y%m%dT%H%M%SZ", time.gmtime())
    return name


def _build(
    manager: VmManager,
    src: str,
    dst: str,
    temp: str,
    from_snapshot: str | None,
    full: bool,
    progress: Progress | None,
) -> None:
    """Make VM ``temp`` the clone, then rename it ``dst`` (the commit point)."""
    with manager.session(repair=False) as session:
        found = session.found
        if found.find(dst) is not None:
            raise VmError(f"a VM named {dst!r} already exists")
        vm = manager.find(src, found)
        keyring = manager.keyring()
        record = find_snapshot(manager, vm, keyring, from_snapshot) if from_snapshot else None
        if record is None and manager.served(vm):
            raise VmError(f"VM {src!r} is being served: clone a snapshot of it (--from-snapshot)")
        luns = vm.lun_map()
        sizes = [  # the snapshot's sizes (the disks may have grown since), or the live ones
            chain_size(
                vm,
                dict(record.header.tops)[luns[n].header.naa]
                if record is not None
                else vm.base.header.top_of(luns[n].header.naa, luns[n].header.unit_uuid),
            )
            for n in sorted(luns)
        ]
        memory_region = vm.base.header.require_region(RegionKind.STATE)
    manager.create(
        temp,
        disk=sizes[0],
        memory=1 << 20,
        secondaries=tuple(sizes[1:]),
        mode=vm.base.header.mode,
        pool=vm.base.pool,
    )
    faults.pause("clone.created")  # between two pool-lock sections (a repair may run)
    with manager.session(repair=False) as session:
        new = session.find(temp)
        total = sum(sizes)
        done = 0
        linked: list[tuple[bytes, uuid.UUID]] = []
        new_luns = new.lun_map()
        for number, volume in sorted(luns.items()) if not full else ():
            assert record is not None  # a linked clone always rests on a snapshot
            parent = dict(record.header.tops)[volume.header.naa]
            delta = new_delta(manager, new, new_luns[number], parent)
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
                    if not is_zero(piece):
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
            contextlib.closing(manager.open_unit(new.base)) as base,
            contextlib.closing(manager.open_unit(record if record is not None else vm.base)) as old,
        ):
            if base.header.require_region(RegionKind.STATE).length < memory_region.length:
                base.grow(state_length=memory_region.length)
            copy_sealed(old, base, keyring, RegionKind.STATE)
            config = old.read_json(keyring, RegionKind.CONFIG)
            config["name"] = dst
            base.write_json(keyring, RegionKind.CONFIG, config)
            faults.crashpoint("clone.copied")
            if linked:
                base.commit(replace(base.header, tops=tuple(linked)))
            for unit in new.units:  # the rename: the base unit last (the commit point)
                if unit is new.base:
                    continue
                with contextlib.closing(manager.open_unit(unit)) as u:
                    u.commit(replace(u.header, name=dst))
            base.commit(replace(base.header, name=dst))
            faults.crashpoint("clone.committed")


# -- the intent: what a failed or killed clone leaves, and its removal -----------------------


KIND = "clones"  # the intents' directory under conf/ (:mod:`.intents`)


def finish_clones(manager: VmManager) -> list[str]:
    """Roll back every clone that failed or was killed (callers hold all pool locks):
    delete its temporary VM and the snapshot it took of its source, unless the clone
    reached its rename (then only the intent is left to drop)."""
    notes = []
    for temp, intent in intents.leftovers(manager, KIND):
        found = discover(manager.catalog.all(), repair=False)
        vm = found.find(temp)
        notes += intents.remove_temp_vm(manager, found, temp, "clone", f"VM {intent['src']}")
        source = found.find(str(intent["src"]))
        taken = [
            r
            for r in (source.records if source is not None else [])
            if str(r.header.unit_uuid) == intent.get("snapshot")
        ]
        if taken and (vm is not None or found.find(str(intent["dst"])) is None):
            manager.catalog.get(taken[0].pool).delete(taken[0].ref)
            snap = intent.get("snapshot_name", f"clone-{intent['dst']}")
            notes.append(f"snapshot {snap} of VM {intent['src']} removed")
            notes.extend(collect(manager, str(intent["src"])))
    return notes


def unlink(
    manager: VmManager,
    name: str,
    progress: Progress | None = None,
    *,
    live: Mapping[int, LiveVolume] | None = None,
    followers: Iterable[ChainBackend] = (),
) -> bool:
    """Make linked clone ``name`` independent: the source image each volume's chain
    rests on is copied into the clone's own volume unit, then the clone's lowest layer
    is re-parented onto it (the commit point; a crash before it leaves an unused,
    partly written unit that the next run overwrites). False if already independent.

    ``live``: the volumes this process serves for VM ``name``, by LUN (the daemon's
    ``vm.unlink``; module docstring); ``followers``: other served chains, those that
    read through the clone's layers (an exported snapshot of it, a clone of it) are
    rebound too. Without ``live`` a served VM is refused."""
    changed = False
    with manager.session(repair=False) as session:
        vm = session.find(name)
        if live is None and manager.served(vm):
            raise VmError(
                f"VM {name!r} is being served: the daemon serving it unlinks it live "
                "(run 'vm unlink' with the same --state-dir while it runs)"
            )
        manager.check_leases(vm)  # nor by a daemon on another host (a shared device pool)
        missing = set(vm.lun_map()) - set(live if live is not None else vm.lun_map())
        if missing:
            raise VmError(f"VM {name!r}: LUNs {sorted(missing)} are not served here")
        todo = _shared_volumes(vm)
        total = sum(chain_size(vm, lowest.header.parent_uuid) for _n, _v, lowest in todo)
        done = 0
        for number, volume, lowest in todo:
            assert lowest.header.parent_uuid is not None
            source = open_chain(manager, vm, volume, lowest.header.parent_uuid, read_only=True)
            unit = manager.open_unit(volume)
            try:
                target = unit.guest_view()
                try:
                    for offset in range(0, source.size, _STEP):
                        n = min(_STEP, source.size - offset)
                        piece = source.read(offset, n)
                        if not is_zero(piece):  # the unit is fresh zeros: keep it sparse
                            target.write(offset, piece)
                        done += n
                        if progress is not None:
                            progress(done, total)
                        faults.pause("unlink.copying")
                        faults.crashpoint("unlink.copying")
                    target.flush()
                finally:
                    target.close()
            finally:
                unit.close()
                source.close()
            chains = [live[number].chain(), *followers] if live is not None else []
            _rest_on(manager, volume, lowest, chains)
            changed = True
        for other in session.rediscover().vms:
            if other.name != name and (other.layers or other.records):
                collect(manager, other.name)  # the source's layers may be free now
        collect(manager, name, live=live)
    return changed


def _shared_volumes(vm: FoundVm) -> list[tuple[int, FoundUnit, FoundUnit]]:
    """(LUN, volume, the clone's lowest own layer) of each volume whose chain ends
    at another VM's unit."""
    mine = vm.base.header.unit_uuid
    out = []
    for number, volume in sorted(vm.lun_map().items()):
        top = vm.base.header.top_of(volume.header.naa, volume.header.unit_uuid)
        chain, root = walk_chain(vm, top)
        if root.header.unit_uuid == volume.header.unit_uuid:
            continue
        own = [u for u in chain if u.header.owner_uuid == mine]
        if not own:
            raise VmError(f"VM {vm.name!r}: LUN {number} has no layer of its own")
        out.append((number, volume, own[-1]))
    return out


def _rest_on(
    manager: VmManager, volume: FoundUnit, lowest: FoundUnit, chains: list[ChainBackend]
) -> None:
    """Re-parent ``lowest`` onto ``volume`` (which now holds the image below it) and
    rebind each served chain reading through ``lowest`` to end at ``volume`` instead:
    the same image, so the guest sees no change; the first chain (the clone's own, if
    served) is held across the commit. Every new root is opened before anything
    changes."""
    lid = lowest.header.unit_uuid
    rebinds: list[tuple[ChainBackend, int, BlockBackend]] = []
    try:
        for chain in chains:
            ids = [layer.unit_uuid for layer in chain.layers]
            if lid in ids:
                unit = Unit.open(manager.catalog.get(volume.pool), volume.ref, repair=False)
                try:
                    rebinds.append((chain, ids.index(lid) + 1, unit.guest_view(read_only=True)))
                finally:
                    unit.close()
    except BaseException:
        for _chain, _keep, root in rebinds:
            root.close()
        raise
    with contextlib.ExitStack() as held:
        if rebinds:
            held.enter_context(rebinds[0][0].quiesce())
        with contextlib.closing(manager.open_unit(lowest)) as layer:
            layer.commit(replace(layer.header, parent_uuid=volume.header.unit_uuid))
        faults.crashpoint("unlink.committed")
        for index, (chain, keep, root) in enumerate(rebinds):
            with chain.quiesce() if index else contextlib.nullcontext():
                chain.rebind(chain.layers[:keep], root)


RECOVERY.when_all_locked(finish_clones, rank=2)  # after an interrupted move is finished
