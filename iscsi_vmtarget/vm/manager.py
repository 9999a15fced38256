"""VM operations over the pools of one state directory: what the CLI calls.

A VM is a base unit (state, config, snapshot metadata, primary disk) plus the
secondary-disk units it names by NAA designator (US 9,354,927: the base unit "will identify a
globally unique ID such as SCSI Inquiry VPD page 0x83 for a secondary virtual disk").
Every operation checks its input before changing anything, and every change is a unit
header commit, so a refused command leaves what is stored as it was.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from ..storage import atomic_file
from .format import sealed
from .format.crypto import Keyring, create_key_file, load_key_file, pending_path
from .format.header import Mode, RegionKind, Role, UnitHeader
from .format.layout import check_disk_size
from .units import locks
from .units.device_lease import check_not_leased, leased_elsewhere
from .units.scan import Discovery, FoundUnit, FoundVm, discover
from .units.unit import Unit, create_unit
from .units.unit_pools import DEFAULT_POOL, Pool, PoolCatalog
from .vm_errors import InUseError, NotFoundError, SizeError, VmError

_VM_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
MAX_MEMORY = 1 << 44  # 16 TiB
MIN_MEMORY = 1 << 20

#: Virtual hardware keys of the config region (US 9,354,927: "type of virtual processor type
#: of virtual network card type of virtual storage HBA amount of virtual RAM virtual
#: chipset type and size of a virtual primary disk"), and how ``config set`` parses them.
CONFIG_KEYS: dict[str, type] = {
    "cpus": int,
    "cpu_model": str,
    "nic": str,
    "hba": str,
    "chipset": str,
    "firmware": str,
    "description": str,
}
#: Keys that follow the units and change only through ``vm resize``.
DERIVED_KEYS = ("memory", "disks")


def check_vm_name(name: str) -> None:
    if not _VM_NAME.match(name):
        raise VmError(
            f"bad VM name {name!r}: use 1-63 of a-z, 0-9 and '-', starting with a letter "
            "or digit (it becomes part of the target IQN)"
        )


def check_memory(memory: int) -> None:
    if not MIN_MEMORY <= memory <= MAX_MEMORY:
        raise SizeError(f"memory size {memory} is out of range (1M to 16T)")


def default_config(name: str, memory: int, disks: list[int]) -> dict[str, object]:
    return {
        "name": name,
        "cpus": 1,
        "cpu_model": "host",
        "memory": memory,
        "nic": "virtio-net-pci",
        "hba": "virtio-scsi-pci",
        "chipset": "q35",
        "firmware": "bios",
        "disks": disks,
    }


@dataclass(frozen=True)
class StateDir:
    """Where things live: pools, pool definitions, locks and the master key file."""

    root: str
    key_file: str

    @classmethod
    def at(cls, root: str, key_file: str | None = None) -> StateDir:
        root = os.path.abspath(root)
        return cls(root, os.path.abspath(key_file or os.path.join(root, "master.key")))


@dataclass
class Recovery:
    """What the operations register to finish what a crash left of them: the manager
    runs it without knowing the operations (each registers itself when imported;
    :mod:`iscsi_vmtarget.vm` imports them all)."""

    #: run once every pool lock is held, by rank (:meth:`when_all_locked`): each
    #: returns notes of what it finished or rolled back (interrupted moves, failed clones)
    all_locked: list[tuple[int, Callable[[VmManager], list[str]]]] = field(
        default_factory=list
    )
    #: run by a repairing discovery for every VM a crash may have left half changed
    #: (snapshot layers): notes of what it finished
    vm_found: list[Callable[[VmManager, FoundVm], list[str]]] = field(default_factory=list)
    #: run when a VM is deleted, with its name (records of it kept outside its units)
    deleted: list[Callable[[VmManager, str], None]] = field(default_factory=list)

    def when_all_locked(self, run: Callable[[VmManager], list[str]], *, rank: int) -> None:
        """Register ``run`` for :attr:`all_locked`; lower ranks run first."""
        self.all_locked.append((rank, run))
        self.all_locked.sort(key=lambda item: item[0])


#: The one registry of crash recovery (see :class:`Recovery`).
RECOVERY = Recovery()


class Session:
    """One management command's hold on the pools: every pool locked and discovered
    once. Operations take one from :meth:`VmManager.session` and find VMs and open
    units through it."""

    def __init__(self, manager: VmManager, pools: list[Pool], found: Discovery) -> None:
        self.manager = manager
        self.pools = pools
        self.found = found

    def find(self, name: str) -> FoundVm:
        """VM ``name`` as the session's discovery saw it (NotFoundError if none)."""
        return self.manager.find(name, self.found)

    def rediscover(self) -> Discovery:
        """Discover again (no repair) after a change under the locks."""
        self.found = discover(self.pools, repair=False)
        return self.found

    def open(self, unit: FoundUnit) -> Unit:
        return self.manager.open_unit(unit)


class VmManager:
    """Create, find, change and delete VMs in the pools of one state directory."""

    def __init__(self, state: StateDir) -> None:
        self.state = state
        self.catalog = PoolCatalog(state.root)
        #: what the last locking of every pool finished or rolled back (moves, clones)
        self.finished: list[str] = []

    def close(self) -> None:
        self.catalog.close()

    def __enter__(self) -> VmManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- keys and locks ----------------------------------------------------------------------

    def keyring(self, *, create: bool = False) -> Keyring:
        return Keyring.load(self.state.key_file, create=create)

    @contextlib.contextmanager
    def locked(self, pools: list[Pool]) -> Iterator[None]:
        """Hold the locks of ``pools``; with all of them, first finish what a crash
        left of operations (:data:`RECOVERY`: moves finished, clones rolled back)."""
        with contextlib.ExitStack() as stack:
            for pool in sorted(pools, key=lambda p: p.name):
                stack.enter_context(locks.pool_lock(self.state.root, pool.name))
            if len(pools) == len(self.catalog.names()):
                self.finished = [note for _rank, run in RECOVERY.all_locked for note in run(self)]
            yield

    @contextlib.contextmanager
    def session(self, *, repair: bool = True) -> Iterator[Session]:
        """Lock every pool and discover once (repairing unless ``repair`` is False):
        the opening of every command that changes a VM."""
        pools = self.catalog.all()
        with self.locked(pools):
            yield Session(self, pools, discover(pools, repair=repair))

    # -- discovery ----------------------------------------------------------------------------

    def pools(self, name: str | None = None) -> list[Pool]:
        return [self.catalog.get(name)] if name else self.catalog.all()

    def discover(self, pool: str | None = None, *, repair: bool = True) -> Discovery:
        pools = self.pools(pool)
        if not repair:
            return discover(pools, repair=False)
        with self.locked(pools):
            found = discover(pools, repair=True, may_repair=self._may_repair)
            for note in self.finished:  # moves finished and clones rolled back just now
                found.repaired.append({"location": self.state.root, "action": note})
            self.finished = []
            changed = False
            for vm in found.vms:  # finish what a crash left of snapshot changes
                if not ((vm.layers or vm.records) and self._may_repair(vm.base.header)):
                    continue
                for run in RECOVERY.vm_found:
                    for note in run(self, vm):
                        found.repaired.append({"location": vm.base.ref.location, "action": note})
                        changed = True
            if changed:
                repaired = found.repaired
                found = discover(pools, repair=False)
                found.repaired = repaired
            return found

    def _may_repair(self, header: UnitHeader) -> bool:
        """Not a unit of a VM a daemon on another host serves from a shared device
        pool: that daemon finishes its own interrupted changes."""
        return not leased_elsewhere(self.state.root, self.catalog, header)

    def find(self, name: str, found: Discovery | None = None) -> FoundVm:
        found = found or self.discover(repair=False)
        vm = found.find(name)
        if vm is None:
            known = ", ".join(v.name for v in found.vms) or "none"
            unreadable = "".join(
                f"; {item['location']} could not be read: {item['reason']}"
                for item in found.damaged
            )
            raise NotFoundError(f"no VM named {name!r} (VMs: {known}){unreadable}")
        return vm

    def open_unit(self, unit: FoundUnit) -> Unit:
        """Open a unit found by a discovery run under the pool locks (callers hold them:
        opening may finish an interrupted resize, which writes). Refused while a daemon
        elsewhere holds the unit's lease (a device pool several hosts see)."""
        pool = self.catalog.get(unit.pool)
        check_not_leased(self.state.root, pool, unit.ref, unit.header.unit_uuid, unit.header.name)
        return Unit.open(pool, unit.ref)

    def check_leases(self, vm: FoundVm) -> None:
        """LeaseHeldError if a daemon elsewhere serves ``vm`` (a live lease on one of
        its device-pool units): for commands that write a VM's units without
        :meth:`open_unit` (offline move, unlink)."""
        for unit in vm.lun_map().values():
            pool = self.catalog.get(unit.pool)
            check_not_leased(self.state.root, pool, unit.ref, unit.header.unit_uuid, vm.name)

    def served(self, vm: FoundVm) -> bool:
        return any(locks.is_served(self.state.root, u.header.unit_uuid) for u in vm.units)

    # -- create / delete -------------------------------------------------------------------

    def create(
        self,
        name: str,
        *,
        disk: int,
        memory: int,
        secondaries: tuple[int, ...] = (),
        mode: Mode = Mode.TRUNCATE,
        pool: str = DEFAULT_POOL,
    ) -> FoundVm:
        """Allocate the secondary units, then the base unit naming them."""
        check_vm_name(name)
        check_disk_size(disk)
        for index, size in enumerate(secondaries, 1):
            check_disk_size(size, f"secondary disk {index}")
        check_memory(memory)
        if len(secondaries) > 62:
            raise SizeError("at most 62 secondary disks")
        target = self.catalog.get(pool)
        with self.session(repair=False) as session:
            found = session.found
            clash = found.find(name)
            if clash is not None:
                raise VmError(f"a VM named {name!r} already exists ({clash.base.ref.location})")
            keyring = self.keyring(create=True)
            base_uuid = uuid.uuid4()
            created: list[FoundUnit] = []
            try:
                naas = []
                for size in secondaries:
                    ref, header = create_unit(
                        target,
                        mode=mode,
                        role=Role.SECONDARY,
                        disk_size=size,
                        name=name,
                        owner=base_uuid,
                    )
                    created.append(FoundUnit(target.name, ref, header))
                    naas.append(header.naa)
                create_unit(
                    target,
                    mode=mode,
                    role=Role.BASE,
                    disk_size=disk,
                    name=name,
                    memory=memory,
                    secondaries=tuple(naas),
                    master=keyring.current,
                    config=default_config(name, memory, [disk, *secondaries]),
                    unit_uuid=base_uuid,
                )
            except BaseException:
                for unit in created:  # leave nothing of a VM that was not made
                    target.delete(unit.ref)
                raise
        return self.find(name)

    def delete(self, name: str, *, force: bool = False) -> FoundVm:
        """Delete the base unit (crypto-erasing state and config with its wrapped key),
        then the secondaries, and the record of its replicas' acknowledged checkpoints
        (``conf/replication/<name>.json``). Refused while a server exports the VM unless
        ``force``."""
        with self.session() as session:
            vm = session.find(name)
            mine = {u.header.unit_uuid for u in vm.all_units}
            for unit in vm.index.values():
                if unit.header.parent_uuid in mine and unit.header.unit_uuid not in mine:
                    owner = vm.index.get(unit.header.owner_uuid or unit.header.unit_uuid)
                    other = owner.header.name if owner else unit.header.name
                    raise InUseError(
                        f"VM {other!r} is a linked clone of VM {name!r}: run "
                        f"'iscsi-vmtarget vm unlink {other}' (or delete it) first"
                    )
            with contextlib.ExitStack() as stack:
                for unit in vm.units:
                    try:
                        stack.enter_context(
                            locks.not_served(self.state.root, unit.header.unit_uuid, f"VM {name!r}")
                        )
                    except InUseError:
                        if not force:
                            raise
                    pool = self.catalog.get(unit.pool)  # --force never overrides a lease
                    check_not_leased(self.state.root, pool, unit.ref, unit.header.unit_uuid, name)
                for unit in vm.all_units:  # base first: the rest is unreachable after it
                    self.catalog.get(unit.pool).delete(unit.ref)
            for run in RECOVERY.deleted:
                run(self, name)
        return vm

    # -- state and config (the management plane's path to hidden data) -----------------

    def write_state(self, name: str, source: BinaryIO, length: int) -> None:
        with self.session() as session:
            vm = session.find(name)
            with contextlib.closing(self.open_unit(vm.base)) as unit:
                keyring = self.keyring()
                unit.data_key(keyring)  # a wrong key file fails before any change

                def pieces() -> Iterator[bytes]:
                    while True:
                        piece = source.read(sealed.CHUNK)
                        if not piece:
                            return
                        yield piece

                unit.write_region(keyring, RegionKind.STATE, _exact(pieces()), length)

    def read_state(self, name: str) -> Iterator[bytes]:
        """The plaintext state image, chunk by chunk; IntegrityError on tampering.

        Holds the pool locks while it streams, so no resize or state write of another
        command interleaves (and an interrupted resize is finished first)."""
        with self.session() as session:
            vm = session.find(name)
            unit = self.open_unit(vm.base)
            try:
                yield from unit.read_region(self.keyring(), RegionKind.STATE)
            finally:
                unit.close()

    def config(self, name: str) -> dict[str, object]:
        with self.session() as session:
            vm = session.find(name)
            with contextlib.closing(self.open_unit(vm.base)) as unit:
                return unit.read_json(self.keyring(), RegionKind.CONFIG)

    def set_config(self, name: str, assignments: list[str]) -> dict[str, object]:
        """Apply ``KEY=VALUE`` pairs to the config region (all checked first)."""
        updates: dict[str, object] = {}
        for item in assignments:
            key, sep, raw = item.partition("=")
            key = key.strip()
            if not sep or not key:
                raise VmError(f"{item!r} is not KEY=VALUE")
            if key in DERIVED_KEYS:
                raise VmError(f"{key} follows the units: change it with 'vm resize'")
            kind = CONFIG_KEYS.get(key)
            if kind is None:
                raise VmError(f"unknown config key {key!r} (known: {', '.join(CONFIG_KEYS)})")
            if kind is int:
                if not raw.strip().isdigit() or not 1 <= int(raw) <= 4096:
                    raise VmError(f"{key} must be a whole number from 1 to 4096")
                updates[key] = int(raw)
            else:
                updates[key] = raw
        with self.session() as session:
            vm = session.find(name)
            with contextlib.closing(self.open_unit(vm.base)) as unit:
                keyring = self.keyring()
                config = unit.read_json(keyring, RegionKind.CONFIG)
                config.update(updates)
                unit.write_json(keyring, RegionKind.CONFIG, config)
                return config

    # -- key rotation --------------------------------------------------------------------

    def rotate_key(self, *, force: bool = False) -> dict[str, object]:
        """Re-wrap every unit's data key under a new master key; no data is re-encrypted.

        The new key waits in ``<key file>.new`` until every unit is re-wrapped, then
        replaces the key file; an interrupted rotation is finished by running it again.
        """
        path = self.state.key_file
        keyring = self.keyring()
        pending = pending_path(path)
        new_key = load_key_file(pending) if os.path.exists(pending) else create_key_file(pending)
        keyring = Keyring([*[k for k in keyring.keys if k.key_id != new_key.key_id], new_key])
        rewrapped: list[str] = []
        already: list[str] = []
        failed: list[dict[str, str]] = []
        with self.session() as session:
            found = session.found
            for unit_info in [u for vm in found.vms for u in (vm.base, *vm.records)]:
                try:
                    with contextlib.closing(self.open_unit(unit_info)) as unit:
                        changed = unit.rewrap(keyring, new_key)
                except VmError as exc:
                    failed.append({"location": unit_info.ref.location, "reason": str(exc)})
                    continue
                (rewrapped if changed else already).append(unit_info.ref.location)
            for item in found.damaged:
                failed.append({"location": item["location"], "reason": item["reason"]})
            if failed and not force:
                raise VmError(
                    "key rotation left unfinished: "
                    + "; ".join(f"{f['location']}: {f['reason']}" for f in failed)
                    + f" (the new key stays in {pending}; fix them and run it again, or "
                    "--force to finish without them)"
                )
            atomic_file.replace(pending, path)
        return {
            "key_file": path,
            "key_id": new_key.key_id.hex(),
            "rewrapped": rewrapped,
            "already_current": already,
            "skipped": failed,
        }


def _exact(pieces: Iterator[bytes]) -> Iterator[bytes]:
    """Re-cut a stream into CHUNK pieces (a pipe may return short reads)."""
    buffer = bytearray()
    for piece in pieces:
        buffer += piece
        while len(buffer) >= sealed.CHUNK:
            yield bytes(buffer[: sealed.CHUNK])
            del buffer[: sealed.CHUNK]
    if buffer:
        yield bytes(buffer)
