"""Exports: the SCSI logical units a server shows for each VM.

One target per VM, ``<base IQN>:vm.<name>``; LUN 0 the primary disk, LUN n the n-th
secondary disk the base unit names. Each LUN is a
:class:`~iscsi_vmtarget.scsi.LogicalUnit` over a :class:`~.view.GuestView` and reports
the NAA designator stored in its unit header in VPD 0x83 (SPC-4 §7.8.6). The VM layer
knows nothing of iSCSI: the server wraps these into targets.

A read-only raw-view LU per unit is offered too, for ACLs that grant ``view = "raw"``:
the unit as it would be with its disk's snapshot chain flattened now (:mod:`.flat`).
Each exported unit's serve lock (:mod:`.locks`) is held until its guest view is closed,
so management commands know the VM is in use.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ..scsi import LogicalUnit, UnitIdentity
from ..storage.backend import BlockBackend
from .cow import ChainBackend
from .discovery import FoundUnit, FoundVm
from .errors import VmError
from .flat import FlatView, live_flat, reopen_live
from .format import UnitHeader
from .lease import LeaseHeldError
from .lease_device import keeper as lease_keeper
from .locks import ServeLock
from .pool import PoolCatalog
from .unit import Unit
from .view import GuestView, RawView

DEFAULT_BASE_IQN = "iqn.2026-11.org.iscsi-vmtarget"
log = logging.getLogger("iscsi_vmtarget")


def vm_target_name(name: str, base_iqn: str = DEFAULT_BASE_IQN) -> str:
    return f"{base_iqn}:vm.{name}"


def vm_of_target(target: str, base_iqn: str = DEFAULT_BASE_IQN) -> str | None:
    """The VM a target is derived from: ``NAME`` of ``<base>:vm.NAME`` and of every
    ``<base>:vm.NAME.<suffix>`` (a snapshot export...); VM names hold no dot. None for
    any other target."""
    prefix = f"{base_iqn}:vm.".lower()
    if not target.lower().startswith(prefix):
        return None
    return target[len(prefix) :].split(".", 1)[0].lower() or None


def capacity_listener(lu: LogicalUnit) -> Callable[[int, int], None]:
    """A GuestView capacity listener queueing CAPACITY DATA HAS CHANGED (2Ah/09h,
    SBC-3 §4.9) for every I_T nexus of ``lu``, so initiators re-read the capacity."""

    def listener(old: int, new: int) -> None:
        lu.check_capacity()  # the LU tracks its capacity itself: it decides once

    return listener


@dataclass
class VmLuns:
    """What a server exports for one VM: guest-view LUs (every initiator's default) and
    read-only raw-view LUs (for an ACL granting ``view = "raw"``: a backup host sees the
    whole unit, its hidden regions as ciphertext), both by LUN number."""

    name: str
    guest: dict[int, LogicalUnit] = field(default_factory=dict)
    raw: dict[int, LogicalUnit] = field(default_factory=dict)
    vm_uuid: uuid.UUID | None = (
        None  # the VM's identity (base unit UUID): whose grants mask this export
    )
    #: the state and config LUNs of a hypervisor view (server/hypervisor_view.py)
    regions: dict[int, LogicalUnit] = field(default_factory=dict)

    def close(self) -> None:
        for lu in (*self.guest.values(), *self.raw.values(), *self.regions.values()):
            lu.backend.close()


def raw_identity(unit: Unit) -> UnitIdentity:
    """A raw view is another logical unit (other size, other content): it gets its own
    designator, derived from the unit UUID, so a host seeing both never merges them."""
    return raw_identity_of(unit.header.unit_uuid)


def raw_identity_of(ident: uuid.UUID) -> UnitIdentity:
    """The raw view's designator and serial for the LU whose identity is ``ident``
    (a unit's UUID, a snapshot volume's :func:`~.snapshot.snapshot_identity` UUID)."""
    return UnitIdentity.from_uuid(uuid.uuid5(ident, "raw"), f"{ident.hex}-raw")


def export_vm(vm: FoundVm, catalog: PoolCatalog, state_dir: str) -> VmLuns:
    """Open a guest-view and a raw-view LU per unit of ``vm``; closing a guest LU's
    backend releases the unit's serve lock and its lease. LeaseHeldError (a VmError)
    if a unit in a device pool is leased by a live owner elsewhere (:mod:`.lease`)."""
    leases = lease_keeper(state_dir)
    unleased = leases.acquire_vm(vm, catalog)
    out = VmLuns(vm.name, vm_uuid=vm.base.header.unit_uuid)
    try:
        for number, found in vm.lun_map().items():
            lock = ServeLock(state_dir, found.header.unit_uuid)
            unleased.discard(found.header.unit_uuid)
            release = leases.releaser(lock.release, found.header.unit_uuid)
            try:
                unit = Unit.open(catalog.get(found.pool), found.ref, repair=False)
                try:
                    handle = catalog.get(found.pool).open(found.ref)
                    try:
                        view = _live_view(vm, found, unit, catalog, state_dir, release)
                    except BaseException:
                        handle.close()
                        raise
                    raw = live_flat(handle, unit.header, view)  # reads through the chain
                finally:
                    unit.close()
            except BaseException:
                release()
                raise
            options = _lu_options(state_dir, found.header.unit_uuid)
            lu = LogicalUnit(
                view,
                unit.identity(),
                block_size=unit.header.block_size,
                **options,  # type: ignore[arg-type]
            )
            view.add_capacity_listener(capacity_listener(lu))
            out.guest[number] = lu
            options.pop("pr_state_path", None)
            out.raw[number] = raw_lu = LogicalUnit(
                raw,
                raw_identity(unit),
                block_size=unit.header.block_size,
                read_only=True,
                **options,  # type: ignore[arg-type]
            )
            view.add_capacity_listener(capacity_listener(raw_lu))  # a grown top grows it
    except BaseException:
        out.close()
        leases.release(unleased)
        raise
    return out


def _live_view(
    vm: FoundVm,
    volume: FoundUnit,
    unit: Unit,
    catalog: PoolCatalog,
    state_dir: str,
    on_close: Callable[[], None],
) -> ChainBackend:
    """The guest's live disk: a copy-on-write chain (:mod:`.cow`) over the unit's guest
    view - with no layers until the VM has snapshots - so a daemon can snapshot or
    revert it in place. Either way the LU keeps the unit's own identity (VPD 0x83 and
    0x80), so a guest never notices it runs on a snapshot's descendant (US 9,354,927)."""
    top = vm.base.header.top_of(volume.header.naa, volume.header.unit_uuid)
    if top == volume.header.unit_uuid:
        return ChainBackend([], unit.guest_view(), on_close=on_close)
    from .manager import StateDir, VmManager
    from .snapshot import open_chain

    manager = VmManager(StateDir.at(state_dir))
    manager.catalog = catalog
    chain = open_chain(manager, vm, volume, top, read_only=False)
    chain._on_close = on_close  # its root (read-only) is only ever read: writes go on top
    return chain


DEMO_VM = "demo"
DEMO_DISK = 1 << 30
DEMO_MEMORY = 256 << 20


def _lu_options(state_dir: str, unit_uuid: uuid.UUID) -> dict[str, object]:
    """Keyword options of LogicalUnit this version of the SCSI layer offers.

    Guest views support UNMAP (holes read as zeros) and report allocation, so the LU is
    thin provisioned; persistent reservations persist under ``<state-dir>/pr`` (never
    in a pool, where discovery would list them as foreign units).
    """
    accepted = inspect.signature(LogicalUnit).parameters
    wanted: dict[str, object] = {
        "thin_provisioning": True,
        "pr_state_path": os.path.join(state_dir, "pr", f"{unit_uuid}.pr"),
        "clock": time.monotonic,
        "sleep": time.sleep,
    }
    if "pr_state_path" in accepted:
        os.makedirs(os.path.join(state_dir, "pr"), exist_ok=True)
    return {k: v for k, v in wanted.items() if k in accepted}


def serve_vms(state_dir: str, *, demo: bool = False) -> list[VmLuns]:
    """What a server exports at start: every VM discovery finds in the pools of
    ``state_dir`` (finishing interrupted resizes first), after provisioning the demo VM
    when ``demo`` is set and it does not exist yet."""
    from .manager import StateDir, VmManager

    out: list[VmLuns] = []
    with VmManager(StateDir.at(state_dir)) as manager:
        found = manager.discover(repair=True)
        if demo and found.find(DEMO_VM) is None:
            manager.create(DEMO_VM, disk=DEMO_DISK, memory=DEMO_MEMORY)
            found = manager.discover(repair=False)
        for item in found.damaged:
            log.warning("pool unit %s not exported: %s", item["location"], item["reason"])
        from .snapshot_export import serve_exported

        out.extend(serve_exported(manager, found))
        try:
            for vm in found.vms:
                for naa in vm.missing:
                    log.warning("VM %s: secondary unit naa %s is missing", vm.name, naa.hex())
                try:
                    out.append(export_vm(vm, manager.catalog, manager.state.root))
                except LeaseHeldError:
                    continue  # served elsewhere: the lease keeper logged it and waits
                except VmError as exc:  # e.g. deleted by a command since the scan
                    log.warning("VM %s not exported: %s", vm.name, exc)
        except BaseException:
            for luns in out:
                luns.close()
            raise
    return out


def resize_live(
    state_dir: str,
    name: str,
    guest: Mapping[int, LogicalUnit],
    raw: Mapping[int, LogicalUnit] | None = None,
    *,
    disk: int | None = None,
    memory: int | None = None,
    secondaries: Mapping[int, int] | None = None,
    key_file: str | None = None,
) -> FoundVm:
    """Resize a VM this process exports (what a daemon's ``vm.resize`` admin operation
    runs): guest I/O pauses while a guest segment moves, the guest views take the new
    layout and their initiators get CAPACITY DATA HAS CHANGED; raw views reopen on the
    grown unit."""
    from .manager import StateDir, VmManager

    views = {}
    chains = {}
    for number, lu in guest.items():
        backend = lu.backend
        if isinstance(backend, ChainBackend):
            chains[number] = backend  # a disk with snapshots grows by a new top
            backend = backend.root
        if isinstance(backend, GuestView):
            views[backend.unit_uuid] = backend
    with VmManager(StateDir.at(state_dir, key_file)) as manager:
        vm = manager.resize(
            name, disk=disk, memory=memory, secondaries=secondaries, live=views, chains=chains
        )
        for number, found in vm.lun_map().items():
            raw_lu = (raw or {}).get(number)
            if raw_lu is not None:
                handle = manager.catalog.get(found.pool).open(found.ref)
                for old in reopen_raw(raw_lu, handle, found.header):
                    old.close()
    return vm


def reopen_raw(lu: LogicalUnit, handle: BlockBackend, header: UnitHeader) -> list[BlockBackend]:
    """Give a raw-view LU a new handle on its unit (grown by a resize, moved to another
    pool) with ``header``'s layout; it goes on reading the disk through the same chain.
    Returns what it replaced, for the caller to close; initiators are told of a new
    capacity (CAPACITY DATA HAS CHANGED)."""
    backend = lu.backend
    if isinstance(backend, FlatView):
        retired = reopen_live(backend, handle, header)
    else:
        retired = [backend]
        lu.replace_backend(RawView(handle))
    lu.check_capacity()
    return retired
