"""``vm move NAME --pool P2``: move every unit of a VM (disks, snapshot layers and
records) to another pool (US 9,354,927: "moving a virtual machine ... to a different storage
pool" done by the storage layer), offline or while its LUNs keep serving.

Crash safety, with an intent file ``<state-dir>/conf/moves/<vm>.json``:

1. every unit is copied (sparse: zero runs skipped) into a staged copy in the
   destination pool, invisible to discovery: a temporary file of a directory pool, an
   extent of a device pool that its unit table does not list yet; a crash here leaves
   only those, which the next repair removes;
2. the intent names the units and their copies;
3. the copies are published - the temporaries renamed into place, or in a device pool
   all the extents entered into its table in one commit - then the originals deleted,
   then the intent.

:func:`finish_moves` runs under the pool locks before every VM operation: with an
intent, a move whose copies can all be published is rolled forward, otherwise rolled
back, so discovery never sees a unit in two pools. In a directory pool the intent is
the commit point (every temporary it names is whole); in a device pool the table
commit is (before it, free space may have been reused: the copies are dropped and
scrubbed). Unit UUIDs and designators do not change, so chains, linked clones and
identities stay valid. A unit of a device pool is a fixed extent of the unit's size
where a directory pool has a sparse file: the copy is the same, block for block.

**Live move** (:func:`move_live`, the daemon's ``vm.move`` action): the same steps
while the VM's LUNs serve. Before the copy, each LUN's chain (a LUN served as its plain
guest view gets one first) is flushed and gets a dirty-grain hook (:mod:`..layers.dirty`);
the units are copied whole, then the grains written meanwhile are copied again in
passes until few are left (or a pass limit is hit).
Then every LUN of the VM is quiesced (in-flight commands drain, new ones wait - the
snapshot code's quiesce), the last dirty grains are copied, the copies flushed, the
intent written and the copies published; the LUNs' chains are rebound onto the new
units in place (same LogicalUnit, same designator and serial), I/O resumes, and the
originals are deleted. A kill -9 before the commit point leaves the source whole
(every acknowledged write is there, and I/O was held from the last copy on); after
it, the copies hold every acknowledged write and the roll-forward keeps them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Protocol

from ...storage import atomic_file
from ...storage.backend import BlockBackend
from .. import faults
from ..format.header import UnitHeader
from ..layers.cow import ChainBackend, DeltaLayer, LiveVolume, is_zero
from ..layers.dirty import DirtyGrains, copy_dirty
from ..layers.flat import FlatView, ServedRaw, reopen_raw
from ..manager import RECOVERY, VmManager
from ..units.device_pool import DevicePool
from ..units.rbd_pool import RbdPool
from ..units.scan import FoundUnit, FoundVm
from ..units.unit import Unit
from ..units.unit_pools import DirectoryPool, Pool, UnitRef
from ..vm_errors import InUseError, VmError
from .snapshot_tree import holding_vm

log = logging.getLogger("iscsi_vmtarget")
Progress = Callable[[int, int], None]
_STEP = 4 << 20
#: Flush a copy every this many bytes written: one fsync of a whole large unit at the
#: end stalls the served LUNs' own flushes (FUA, SYNCHRONIZE CACHE) for a long while.
_FLUSH_EVERY = 32 << 20
#: A live move stops catching up and holds I/O once this few grains are dirty...
HOLD_BELOW_GRAINS = 64  # 4 MiB: the copy made while I/O is held
#: ... or after this many passes (a writer faster than the copy never lets it shrink).
MAX_PASSES = 8


# -- the intent ---------------------------------------------------------------------------


def _intent_dir(state_root: str) -> str:
    return os.path.join(state_root, "conf", "moves")


class _Staging(Protocol):
    """How a destination pool holds the copies of a move until they become its units.

    Each copy is an intent entry: ``key`` (the unit's key once published) and
    ``temp`` (the copy's key before), besides where the original is."""

    pool: Pool

    def stage(self, found: FoundUnit) -> tuple[dict[str, str], BlockBackend]:
        """A copy of ``found``'s size to write: its entry and a writable backend."""
        ...

    def sync(self) -> None:
        """Make the staged copies durable where they are (data already flushed)."""
        ...

    def publish(self, units: list[dict[str, str]]) -> None:
        """Make the copies the pool's units (idempotent)."""
        ...

    def complete(self, units: list[dict[str, str]]) -> bool:
        """After a crash: whether :meth:`publish` can still finish the move."""
        ...

    def undo(self, units: list[dict[str, str]]) -> None:
        """Remove the copies, staged or published."""
        ...


class _DirectoryStaging:
    """Copies are hidden temporary files (``.<uuid>.unit.tmp``), renamed into place."""

    def __init__(self, pool: DirectoryPool) -> None:
        self.pool = pool

    def _file(self, key: str) -> str:
        return os.path.join(self.pool.path, key)

    def stage(self, found: FoundUnit) -> tuple[dict[str, str], BlockBackend]:
        ref, backend = self.pool.allocate(found.header.unit_uuid, found.header.unit_size)
        return {"key": f"{found.header.unit_uuid}.unit", "temp": ref.key}, backend

    def sync(self) -> None:
        atomic_file.fsync_dir(self.pool.path)

    def publish(self, units: list[dict[str, str]]) -> None:
        for u in units:
            if not os.path.exists(self._file(u["key"])):
                os.rename(self._file(u["temp"]), self._file(u["key"]))
        self.sync()

    def complete(self, units: list[dict[str, str]]) -> bool:
        """Every copy is whole once the intent names it: renamed or not yet."""
        exists = os.path.exists
        return all(exists(self._file(u["key"])) or exists(self._file(u["temp"])) for u in units)

    def undo(self, units: list[dict[str, str]]) -> None:
        for u in units:
            for key in (u["key"], u["temp"]):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._file(key))
        if os.path.isdir(self.pool.path):
            self.sync()


class _DeviceStaging:
    """Copies are extents the pool allocated but its table does not list; one table
    commit publishes them all (:meth:`~..units.device_pool.DevicePool.publish`)."""

    def __init__(self, pool: DevicePool) -> None:
        self.pool = pool

    def stage(self, found: FoundUnit) -> tuple[dict[str, str], BlockBackend]:
        ref, backend = self.pool.allocate(found.header.unit_uuid, found.header.unit_size)
        return {"key": str(found.header.unit_uuid), "temp": ref.key}, backend

    def sync(self) -> None:
        pass  # extents of the device: flushed as written; the table commit flushes itself

    def publish(self, units: list[dict[str, str]]) -> None:
        self.pool.publish([UnitRef(self.pool.name, u["temp"]) for u in units])

    def _listed(self) -> set[str]:
        self.pool.reload()
        return {ref.key for ref in self.pool.candidates()}

    def complete(self, units: list[dict[str, str]]) -> bool:
        """Only once the table lists them: free space may have been reused since."""
        listed = self._listed()
        return all(u["key"] in listed for u in units)

    def undo(self, units: list[dict[str, str]]) -> None:
        listed = self._listed()
        for u in units:
            if u["key"] in listed:
                self.pool.delete(UnitRef(self.pool.name, u["key"]))  # scrubs it
            else:
                self.pool.discard(UnitRef(self.pool.name, u["temp"]))


class _RbdStaging:
    """Copies are hidden temporary images (``.<uuid>.unit.tmp``), renamed into place
    (RBD renames atomically)."""

    def __init__(self, pool: RbdPool) -> None:
        self.pool = pool

    def stage(self, found: FoundUnit) -> tuple[dict[str, str], BlockBackend]:
        ref, backend = self.pool.allocate(found.header.unit_uuid, found.header.unit_size)
        return {"key": f"{found.header.unit_uuid}.unit", "temp": ref.key}, backend

    def sync(self) -> None:
        pass  # every write is on the OSDs when it completes (the copies were flushed)

    def publish(self, units: list[dict[str, str]]) -> None:
        for u in units:
            if not self.pool.exists(u["key"]):
                self.pool.publish(u["temp"])

    def complete(self, units: list[dict[str, str]]) -> bool:
        """Every copy is whole once the intent names it: renamed or not yet."""
        exists = self.pool.exists
        return all(exists(u["key"]) or exists(u["temp"]) for u in units)

    def undo(self, units: list[dict[str, str]]) -> None:
        for u in units:
            for key in (u["key"], u["temp"]):
                if self.pool.exists(key):
                    self.pool.delete(UnitRef(self.pool.name, key))


def _staging(pool: Pool) -> _Staging:
    if isinstance(pool, DirectoryPool):
        return _DirectoryStaging(pool)
    if isinstance(pool, DevicePool):
        return _DeviceStaging(pool)
    if isinstance(pool, RbdPool):
        return _RbdStaging(pool)
    raise VmError(f"vm move: pool {pool.name!r} ({pool.kind}) cannot be a destination")


def finish_moves(manager: VmManager) -> list[str]:
    """Roll every interrupted move forward or back (callers hold all pool locks)."""
    directory = _intent_dir(manager.state.root)
    if not os.path.isdir(directory):
        return []
    notes = []
    for entry in sorted(os.listdir(directory)):
        path = os.path.join(directory, entry)
        if not entry.endswith(".json"):
            os.unlink(path)  # a half-written intent: the move never reached its commit
            continue
        with open(path) as fh:
            intent = json.load(fh)
        dest = _staging(manager.catalog.get(str(intent["to"])))
        units = list(intent["units"])
        if dest.complete(units):
            dest.publish(units)
            for u in units:
                src = manager.catalog.get(str(u["pool"]))
                ref = UnitRef(src.name, str(u["src_key"]))
                if ref in src.candidates():
                    src.delete(ref)
            notes.append(f"move of VM {intent['vm']} to pool {dest.pool.name} finished")
        else:
            dest.undo(units)
            notes.append(f"interrupted move of VM {intent['vm']} rolled back")
        os.unlink(path)
    return notes


# -- copying ------------------------------------------------------------------------------


def _copy_units(
    manager: VmManager, units: list[FoundUnit], dest: _Staging, progress: Progress | None
) -> list[dict[str, str]]:
    """Copy ``units`` whole into staged copies in ``dest``; the intent's unit list."""
    total = sum(u.header.unit_size for u in units)
    done = 0
    plan = []
    try:
        for found in units:
            source = manager.catalog.get(found.pool).open(found.ref, read_only=True)
            try:
                entry, target = dest.stage(found)
            except BaseException:
                source.close()
                raise
            plan.append({"pool": found.pool, "src_key": found.ref.key, **entry})
            written = 0
            try:
                for offset in range(0, found.header.unit_size, _STEP):
                    n = min(_STEP, found.header.unit_size - offset)
                    piece = source.read(offset, n)
                    if not is_zero(piece):
                        target.write(offset, piece)
                        written += n
                    if written >= _FLUSH_EVERY:  # small write-backs, not one huge one
                        target.flush()
                        written = 0
                    done += n
                    if progress is not None:
                        progress(done, total)
                    faults.pause("move.copying")
                    faults.crashpoint("move.copying")
                target.flush()
            finally:
                target.close()
                source.close()
    except BaseException:
        dest.undo(plan)
        raise
    dest.sync()
    return plan


def _commit(manager: VmManager, name: str, dest: _Staging, plan: list[dict[str, str]]) -> None:
    """Write the intent naming the copies (module docstring)."""
    faults.crashpoint("move.copied")
    intent = {"vm": name, "to": dest.pool.name, "units": plan}
    atomic_file.write_json(_intent_path(manager, name), intent)
    faults.crashpoint("move.committed")


def _publish(dest: _Staging, plan: list[dict[str, str]]) -> None:
    dest.publish(plan)
    faults.crashpoint("move.published")


def move(manager: VmManager, name: str, pool: str, progress: Progress | None = None) -> int:
    """Move VM ``name``'s units to ``pool`` offline; returns how many units moved."""
    dest = _staging(manager.catalog.get(pool))
    with manager.session() as session:
        vm = session.find(name)
        if manager.served(vm):
            raise InUseError(
                f"VM {name!r} is being served: the daemon serving it moves it live "
                "(run 'vm move' with the same --state-dir while it runs)"
            )
        manager.check_leases(vm)  # nor by a daemon on another host (a shared device pool)
        units = [u for u in vm.all_units if u.pool != pool]
        if not units:
            return 0  # already there: no intent to write (and none left behind)
        plan = _copy_units(manager, units, dest, progress)
        _commit(manager, name, dest, plan)
        _publish(dest, plan)
        finish_moves(manager)
    return len(units)


# -- live move ----------------------------------------------------------------------------


@dataclass(frozen=True)
class MoveReport:
    """What a live move did: units moved, catch-up passes run, bytes copied again
    while the LUNs served, bytes copied while they were held, and for how long I/O
    was held (milliseconds: the final copy, flushes, the commit and the switch)."""

    units: int
    passes: int
    recopied: int
    held: int
    held_ms: float = 0.0

    def to_json(self) -> dict[str, int]:
        return asdict(self)


Locate = Callable[[uuid.UUID], tuple[Pool, UnitRef]]


def _open_layers(
    chain: ChainBackend, locate: Locate, keep: Callable[[uuid.UUID], bool]
) -> tuple[list[DeltaLayer], BlockBackend | None]:
    """The layers and root of ``chain`` opened at ``locate``'s places, except those
    ``keep`` says stay as they are (the same objects; the root then None)."""
    layers: list[DeltaLayer] = []
    root: BlockBackend | None = None
    try:
        for layer in chain.layers:
            if keep(layer.unit_uuid):
                layers.append(layer)
                continue
            pool, ref = locate(layer.unit_uuid)
            layers.append(DeltaLayer(pool.open(ref), layer.header, layer.size))
        root_uuid = chain.root.unit_uuid  # type: ignore[attr-defined]
        if not keep(root_uuid):
            pool, ref = locate(root_uuid)
            unit = Unit.open(pool, ref, repair=False)
            try:
                root = unit.guest_view(read_only=chain.root.read_only)
            finally:
                unit.close()
    except BaseException:
        for layer in layers:
            if not keep(layer.unit_uuid):
                layer.close()
        raise
    return layers, root


def _locator(
    vm: FoundVm,
    dest: Pool,
    plan: list[dict[str, str]],
    key: str,
    pools: Mapping[str, Pool],
) -> Locate:
    """Where each unit is: its copy in ``dest`` (``key``: "temp", or "key" for the
    final name) if the move moves it, else where discovery found it."""
    moved = {_uuid_of(u): u[key] for u in plan}

    def locate(unit_uuid: uuid.UUID) -> tuple[Pool, UnitRef]:
        if unit_uuid in moved:
            return dest, UnitRef(dest.name, moved[unit_uuid])
        found = vm.index.get(unit_uuid)
        if found is None:
            raise VmError(f"VM {vm.name!r}: unit {unit_uuid} of a served chain is gone")
        return pools[found.pool], found.ref

    return locate


def _uuid_of(entry: dict[str, str]) -> uuid.UUID:
    return uuid.UUID(entry["key"].removesuffix(".unit"))


def move_live(
    manager: VmManager,
    name: str,
    pool: str,
    live: Mapping[int, LiveVolume],
    *,
    raw: Mapping[int, ServedRaw] | None = None,
    followers: Iterable[ChainBackend | FlatView] = (),
    progress: Progress | None = None,
) -> MoveReport:
    """Move VM ``name`` to ``pool`` while this process serves it (module docstring).

    ``live``: the VM's served volumes, by LUN number, each made a chain here (the
    write hook tracks their writes, the switch rebinds their roots); ``raw``: its raw
    view LUs (rebound to the new units); ``followers``: other served chains that may
    read units of this VM (a linked clone, an exported snapshot and its raw views),
    rebound too."""
    dest = _staging(manager.catalog.get(pool))
    with manager.session() as session:
        by_name = {p.name: p for p in session.pools}
        vm = session.find(name)
        missing = set(vm.lun_map()) - set(live)
        if missing:
            raise VmError(f"VM {name!r}: LUNs {sorted(missing)} are not served here")
        units = [u for u in vm.all_units if u.pool != pool]
        if not units:
            return MoveReport(0, 0, 0, 0)
        chains = {n: volume.chain() for n, volume in live.items()}
        tracked = {n: DirtyGrains() for n in chains}
        for chain in chains.values():  # most of the flush before I/O is held for the rest
            chain.flush()
        with holding_vm(manager, vm, chains):  # every earlier write (and its map bits) on disk
            for number, chain in chains.items():
                chain.write_hook = tracked[number].mark
        copies: dict[int, ChainBackend] = {}
        plan: list[dict[str, str]] = []
        try:
            plan = _copy_units(manager, units, dest, progress)
            temps = _locator(vm, dest.pool, plan, "temp", by_name)
            for number, chain in chains.items():
                layers, root = _open_layers(chain, temps, lambda _u: False)
                assert root is not None
                copies[number] = ChainBackend(layers, root)
            passes = recopied = 0
            while passes < MAX_PASSES and sum(map(len, tracked.values())) > HOLD_BELOW_GRAINS:
                for number, chain in chains.items():
                    grains = tracked[number].take()
                    recopied += copy_dirty(chain.read_into, copies[number], grains, chain.size)
                    faults.crashpoint("move.catchup")
                passes += 1
            for copy in copies.values():  # likewise: little left to flush while held
                copy.flush()
            with holding_vm(manager, vm, chains):
                hold_start = time.monotonic()
                held = 0
                for number, chain in chains.items():
                    grains = tracked[number].take()
                    held += copy_dirty(chain.read_quiesced, copies[number], grains, chain.size)
                    copies[number].flush()
                dest.sync()
                moved = {_uuid_of(u) for u in plan}
                final = _locator(vm, dest.pool, plan, "key", by_name)
                retired = _switch(manager, name, dest, plan, vm, chains, raw or {}, final, moved)
                faults.crashpoint("move.switched")
                held_ms = (time.monotonic() - hold_start) * 1000
        except BaseException:
            for chain in chains.values():
                chain.write_hook = None
            if not os.path.exists(_intent_path(manager, name)):
                dest.undo(plan)
            raise
        finally:
            for copy in copies.values():
                copy.close()
        for chain in followers:
            try:
                _follow(chain, final, moved)
            except (VmError, OSError, ValueError) as exc:  # it reads the unlinked originals
                log.warning("a served chain over VM %s stays on the old units: %s", name, exc)
        finish_moves(manager)  # the originals go
        for old in retired:
            old.close()
    return MoveReport(len(units), passes, recopied, held, round(held_ms, 1))


def _intent_path(manager: VmManager, name: str) -> str:
    return os.path.join(_intent_dir(manager.state.root), f"{name}.json")


def _switch(
    manager: VmManager,
    name: str,
    dest: _Staging,
    plan: list[dict[str, str]],
    vm: FoundVm,
    live: Mapping[int, ChainBackend],
    raw: Mapping[int, ServedRaw],
    final: Locate,
    moved: set[uuid.UUID],
) -> list[BlockBackend]:
    """Commit, publish the copies and rebind the (held) chains and raw LUs onto
    them; returns the raw views replaced. Everything that can fail - opening the
    new units - runs before the first rebind: on a failure the commit is undone
    (copies deleted, then the intent: a crash in between rolls back too) and the
    chains go on with the originals, which no I/O has touched since the commit."""
    _commit(manager, name, dest, plan)
    opened: list[tuple[ChainBackend, list[DeltaLayer], BlockBackend | None]] = []
    views: dict[int, tuple[BlockBackend, UnitHeader]] = {}
    try:
        _publish(dest, plan)
        for chain in live.values():
            opened.append((chain, *_open_layers(chain, final, lambda u: u not in moved)))
        for number, volume in vm.lun_map().items():
            if number in raw and volume.header.unit_uuid in moved:
                pool, ref = final(volume.header.unit_uuid)
                views[number] = (pool.open(ref), volume.header)
    except BaseException:
        for _chain, layers, root in opened:
            for layer in layers:
                if layer.unit_uuid in moved:
                    layer.close()
            if root is not None:
                root.close()
        for handle, _header in views.values():
            handle.close()
        dest.undo(plan)
        atomic_file.remove(_intent_path(manager, name))
        raise
    for chain, layers, root in opened:
        chain.write_hook = None
        chain.rebind(layers, root)
    retired: list[BlockBackend] = []
    for number, (handle, header) in views.items():
        retired.extend(reopen_raw(raw[number], handle, header))
    return retired


def _follow(chain: ChainBackend | FlatView, final: Locate, moved: set[uuid.UUID]) -> None:
    """Rebind a served chain that reads moved units onto their new places (or a raw
    view, which reads its disk through such a chain: the units it reads besides)."""
    if isinstance(chain, FlatView):
        for old in chain.follow(final, moved):
            old.close()
        return
    uses = {layer.unit_uuid for layer in chain.layers} | {getattr(chain.root, "unit_uuid", None)}
    if not uses & moved:
        return
    with chain.quiesce():
        chain.rebind(*_open_layers(chain, final, lambda u: u not in moved))


RECOVERY.when_all_locked(finish_moves, rank=1)
