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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import BinaryIO

from ..storage import atomic_file
from . import locks, sealed
from .cow import ChainBackend
from .crypto import Keyring, create_key_file, load_key_file, pending_path
from .discovery import Discovery, FoundUnit, FoundVm, discover
from .errors import InUseError, NotFoundError, SizeError, VmError
from .format import Mode, RegionKind, Role, UnitHeader
from .layout import check_disk_size, state_capacity_for
from .lease_device import check_not_leased, leased_elsewhere
from .pool import DEFAULT_POOL, Pool, PoolCatalog
from .unit import Unit, create_unit
from .view import GuestView

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
    def _locked(self, pools: list[Pool]) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for pool in sorted(pools, key=lambda p: p.name):
                stack.enter_context(locks.pool_lock(self.state.root, pool.name))
            if len(pools) == len(self.catalog.names()):  # all locks held: finish moves
                from .clone import finish_clones  # and roll back failed clones
                from .move import finish_moves

                self.finished = finish_moves(self) + finish_clones(self)
            yield

    # -- discovery ----------------------------------------------------------------------------

    def pools(self, name: str | None = None) -> list[Pool]:
        return [self.catalog.get(name)] if name else self.catalog.all()

    def discover(self, pool: str | None = None, *, repair: bool = True) -> Discovery:
        pools = self.pools(pool)
        if not repair:
            return discover(pools, repair=False)
        with self._locked(pools):
            found = discover(pools, repair=True, may_repair=self._may_repair)
            for note in self.finished:  # moves finished and clones rolled back just now
                found.repaired.append({"location": self.state.root, "action": note})
            self.finished = []
            from .snapshot import collect  # finish what a crash left of snapshot changes

            changed = False
            for vm in found.vms:
                if (vm.layers or vm.records) and self._may_repair(vm.base.header):
                    for note in collect(self, vm.name):
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

    def _open(self, unit: FoundUnit) -> Unit:
        """Open a unit found by a discovery run under the pool locks (callers hold them:
        opening may finish an interrupted resize, which writes). Refused while a daemon
        elsewhere holds the unit's lease (a device pool several hosts see)."""
        pool = self.catalog.get(unit.pool)
        check_not_leased(self.state.root, pool, unit.ref, unit.header.unit_uuid, unit.header.name)
        return Unit.open(pool, unit.ref)

    def check_leases(self, vm: FoundVm) -> None:
        """LeaseHeldError if a daemon elsewhere serves ``vm`` (a live lease on one of
        its device-pool units): for commands that write a VM's units without
        :meth:`_open` (offline move, unlink)."""
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
        all_pools = self.catalog.all()
        with self._locked(all_pools):
            found = discover(all_pools, repair=False)
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
        pools = self.catalog.all()
        with self._locked(pools):
            vm = self.find(name, discover(pools, repair=True))
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
            from .replicate import forget_acks

            forget_acks(self.state.root, name)
        return vm

    # -- resize ----------------------------------------------------------------------------

    def resize(
        self,
        name: str,
        *,
        disk: int | None = None,
        memory: int | None = None,
        secondaries: Mapping[int, int] | None = None,
        live: Mapping[uuid.UUID, GuestView] | None = None,
        chains: Mapping[int, ChainBackend] | None = None,
    ) -> FoundVm:
        """Grow the primary disk, the state region (for ``memory``) and/or secondary
        disks (``{LUN: size}``). Every plan is checked before the first unit changes;
        each unit then grows crash-safely on its own. A disk with snapshots grows by a
        new top layer of the new size (:mod:`.snapshot_resize`): every snapshot keeps
        the size it had, and a revert to it brings that size back.

        ``live``: guest views a server in this process exports; they take the new
        layout and fire their capacity listeners (CAPACITY DATA HAS CHANGED); with
        ``chains`` (its copy-on-write chains, by LUN) a disk with snapshots takes its
        new top live. Without them, a VM exported by a running server is refused.
        """
        secondaries = dict(secondaries or {})
        if disk is None and memory is None and not secondaries:
            raise VmError("give --disk, --memory and/or --secondary LUN=SIZE")
        if memory is not None:
            check_memory(memory)
        pools = self.catalog.all()
        with self._locked(pools):
            from . import snapshot_resize as layered
            from .snapshot import finish_revert

            vm = self.find(name, discover(pools, repair=True))
            if vm.layers and finish_revert(self, vm, self.keyring()):
                vm = self.find(name, discover(pools, repair=False))
            luns = vm.lun_map()
            for number in secondaries:
                if number == 0 or number not in luns:
                    known = ", ".join(str(n) for n in sorted(luns) if n) or "none"
                    raise NotFoundError(f"VM {name!r} has no secondary LUN {number} ({known})")
            sizes = {n: s for n, s in {0: disk, **secondaries}.items() if s is not None}
            for number, new_size in sizes.items():
                check_disk_size(new_size, "disk" if number == 0 else f"LUN {number}")
            tops = layered.live_sizes(vm, list(sizes))
            if tops:  # a disk with snapshots: against its top
                layered.check_growth(vm, sizes)
            with contextlib.ExitStack() as stack:
                units: dict[int, Unit] = {}
                for number in [0, *sorted(secondaries)]:
                    if live is None:
                        stack.enter_context(
                            locks.not_served(
                                self.state.root, luns[number].header.unit_uuid, f"VM {name!r}"
                            )
                        )
                    units[number] = stack.enter_context(
                        contextlib.closing(self._open(luns[number]))
                    )
                base = units[0]
                keyring = self.keyring()
                config = base.read_json(keyring, RegionKind.CONFIG)  # wrong key: stop here
                state_length = None
                if memory is not None:
                    wanted = sealed.length_for(state_capacity_for(memory))
                    current = base.header.require_region(RegionKind.STATE).length
                    state_length = max(wanted, current)
                unit_size = {n: s for n, s in sizes.items() if n not in tops}  # else a new top
                growth = {
                    0: (unit_size.get(0), state_length),
                    **{n: (unit_size.get(n), None) for n in secondaries},
                }
                for number, (size, state) in growth.items():  # SizeError before any change
                    units[number].plan(size, state)
                disks = list(config.get("disks") or [])  # type: ignore[call-overload]
                for number, (size, state) in growth.items():
                    unit = units[number]
                    view = (live or {}).get(unit.header.unit_uuid)
                    if view is None:
                        unit.grow(size, state)
                    else:
                        with view.quiesce():  # no guest I/O while a guest segment moves
                            unit.grow(size, state)
                            view.update(unit.header)
                layered.grow_tops(self, vm, base, sizes, chains)
                for number, new_size in sizes.items():
                    if number < len(disks):
                        disks[number] = new_size
                if memory is not None:
                    config["memory"] = memory
                config["disks"] = disks
                base.write_json(keyring, RegionKind.CONFIG, config)
        return self.find(name)

    # -- state and config (the management plane's path to hidden data) -----------------

    def write_state(self, name: str, source: BinaryIO, length: int) -> None:
        pools = self.catalog.all()
        with self._locked(pools):
            vm = self.find(name, discover(pools, repair=True))
            with contextlib.closing(self._open(vm.base)) as unit:
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
        pools = self.catalog.all()
        with self._locked(pools):
            vm = self.find(name, discover(pools, repair=True))
            unit = self._open(vm.base)
            try:
                yield from unit.read_region(self.keyring(), RegionKind.STATE)
            finally:
                unit.close()

    def config(self, name: str) -> dict[str, object]:
        pools = self.catalog.all()
        with self._locked(pools):
            vm = self.find(name, discover(pools, repair=True))
            with contextlib.closing(self._open(vm.base)) as unit:
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
        pools = self.catalog.all()
        with self._locked(pools):
            vm = self.find(name, discover(pools, repair=True))
            with contextlib.closing(self._open(vm.base)) as unit:
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
        pools = self.catalog.all()
        with self._locked(pools):
            found = discover(pools, repair=True)
            for unit_info in [u for vm in found.vms for u in (vm.base, *vm.records)]:
                try:
                    with contextlib.closing(self._open(unit_info)) as unit:
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
