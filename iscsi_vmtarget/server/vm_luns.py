"""Exports: the SCSI logical units a server shows for each VM.

One target per VM, ``<base IQN>:vm.<name>``; LUN 0 the primary disk, LUN n the n-th
secondary disk the base unit names. Each LUN is a
:class:`~iscsi_vmtarget.scsi.LogicalUnit` over a :class:`~.view.GuestView` (a disk
without snapshots) or the copy-on-write chain of its layers over it, held as a
:class:`~.live_disk.LiveDisk` (which makes a plain view a chain when a live operation
needs one), and reports the NAA designator stored in its unit header in VPD 0x83
(SPC-4 §7.8.6). The VM layer knows nothing of iSCSI: the server wraps these into
targets.

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
from ..scsi.pr_store import FilePrStore
from ..storage import BackendError
from ..storage.rbd import RbdBackend
from ..storage.rbd_pr import RadosPrStore
from ..vm.format.header import UnitHeader
from ..vm.layers.cow import ChainBackend
from ..vm.layers.flat import live_flat, reopen_raw
from ..vm.layers.view import GuestView
from ..vm.manager import StateDir, VmManager
from ..vm.operations.resize import resize_vm
from ..vm.operations.snapshot_tree import open_chain
from ..vm.units.device_lease import keeper as lease_keeper
from ..vm.units.locks import ServeLock
from ..vm.units.rbd_pool import KIND as RBD_KIND
from ..vm.units.scan import FoundUnit, FoundVm
from ..vm.units.unit import Unit
from ..vm.units.unit_pools import PoolCatalog
from ..vm.vm_errors import VmError
from .live_disk import LiveDisk

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
    #: the live disk behind each guest LU, by LUN (none for a snapshot export)
    disks: dict[int, LiveDisk] = field(default_factory=dict)

    def close(self) -> None:
        for lu in (*self.guest.values(), *self.raw.values(), *self.regions.values()):
            lu.backend.close()


def unit_identity(header: UnitHeader) -> UnitIdentity:
    """A guest LU's INQUIRY identity: the NAA designator stored in the unit header (VPD
    0x83, SPC-4 §7.8.6), the unit UUID as serial number (VPD 0x80, §7.8.16)."""
    return UnitIdentity(naa=header.naa, serial=header.unit_uuid.hex)


def raw_identity(unit: Unit) -> UnitIdentity:
    """A raw view is another logical unit (other size, other content): it gets its own
    designator, derived from the unit UUID, so a host seeing both never merges them."""
    return raw_identity_of(unit.header.unit_uuid)


def raw_identity_of(ident: uuid.UUID) -> UnitIdentity:
    """The raw view's designator and serial for the LU whose identity is ``ident``
    (a unit's UUID, a snapshot volume's :func:`~.snapshot_luns.snapshot_identity` UUID)."""
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
            options = _lu_options(state_dir, found.header.unit_uuid)
            try:
                release = _with_shared_reservations(catalog, found, options, release)
            except BaseException:
                release()
                raise
            try:
                unit = Unit.open(catalog.get(found.pool), found.ref, repair=False)
                try:
                    handle = catalog.get(found.pool).open(found.ref)
                    try:
                        served = _live_backend(vm, found, unit, catalog, state_dir, release)
                    except BaseException:
                        handle.close()
                        raise
                finally:
                    unit.close()
            except BaseException:
                release()
                raise
            try:
                lu = LogicalUnit(
                    served,
                    unit_identity(unit.header),
                    block_size=unit.header.block_size,
                    **options,  # type: ignore[arg-type]
                )
            except BaseException:
                served.close()  # and with it the lock, the lease, the reservations' handle
                handle.close()
                raise
            served.add_capacity_listener(capacity_listener(lu))
            out.guest[number] = lu
            disk = out.disks[number] = LiveDisk(lu)
            raw = live_flat(handle, unit.header, disk)  # reads what the guest LU serves
            options.pop("pr_state_path", None)
            options.pop("pr_shared", None)
            out.raw[number] = raw_lu = LogicalUnit(
                raw,
                raw_identity(unit),
                block_size=unit.header.block_size,
                read_only=True,
                **options,  # type: ignore[arg-type]
            )
            served.add_capacity_listener(capacity_listener(raw_lu))  # a grown top grows it
    except BaseException:
        out.close()
        leases.release(unleased)
        raise
    return out


def _live_backend(
    vm: FoundVm,
    volume: FoundUnit,
    unit: Unit,
    catalog: PoolCatalog,
    state_dir: str,
    on_close: Callable[[], None],
) -> GuestView | ChainBackend:
    """The guest's live disk: the unit's guest view while the volume has no layers
    (its :class:`~.live_disk.LiveDisk` makes it a chain when a live snapshot needs
    one), else the copy-on-write chain (:mod:`.cow`) of its layers, so a daemon can
    snapshot or revert it in place. Either way the LU keeps the unit's own identity
    (VPD 0x83 and 0x80), so a guest never notices it runs on a snapshot's descendant
    (US 9,354,927)."""
    top = vm.base.header.top_of(volume.header.naa, volume.header.unit_uuid)
    if top == volume.header.unit_uuid:
        return unit.guest_view(on_close=on_close)
    manager = VmManager(StateDir.at(state_dir))
    manager.catalog = catalog
    # its root (read-only) is only ever read: writes go on top
    return open_chain(manager, vm, volume, top, read_only=False, on_close=on_close)


def _with_shared_reservations(
    catalog: PoolCatalog,
    found: FoundUnit,
    options: dict[str, object],
    release: Callable[[], None],
) -> Callable[[], None]:
    """A unit in an rbd pool keeps its LU's persistent reservations in RADOS beside its
    image (:mod:`~iscsi_vmtarget.storage.rbd_pr`), where a daemon that takes the VM over
    finds them, instead of under this daemon's state directory (whose file, if any, is
    taken over once). The store rides on a read-only handle of the unit's image, closed
    by the returned ``release``."""
    pool = catalog.get(found.pool)
    if pool.kind != RBD_KIND or "pr_shared" not in inspect.signature(LogicalUnit).parameters:
        return release
    handle = pool.open(found.ref, read_only=True)
    if not isinstance(handle, RbdBackend):
        handle.close()
        return release
    try:
        path = options.pop("pr_state_path", None)
        legacy = FilePrStore(path) if isinstance(path, str) else None
        options["pr_shared"] = RadosPrStore(handle, legacy=legacy)
    except BackendError as exc:
        handle.close()
        raise VmError(f"unit {found.header.unit_uuid}: {exc}") from exc

    def closing() -> None:
        try:
            handle.close()
        finally:
            release()

    return closing


def _lu_options(state_dir: str, unit_uuid: uuid.UUID) -> dict[str, object]:
    """Keyword options of LogicalUnit this version of the SCSI layer offers.

    Guest views support UNMAP (holes read as zeros) and report allocation, so the LU is
    thin provisioned; persistent reservations persist under ``<state-dir>/pr`` (never
    in a pool, where discovery would list them as foreign units) - but a unit in an
    rbd pool keeps them in RADOS beside its image (:func:`_with_shared_reservations`).
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


def resize_live(
    state_dir: str,
    name: str,
    disks: Mapping[int, LiveDisk],
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
    grown unit. ``disks``: the VM's live disks, by LUN (a disk without layers grows
    with its unit, one with layers by a new top)."""
    views = {}
    chains = {}
    for number, live in disks.items():
        chain, view = live.layered, live.view
        if chain is not None:
            chains[number] = chain  # a disk with snapshots grows by a new top
        if view is not None:
            views[view.unit_uuid] = view
    with VmManager(StateDir.at(state_dir, key_file)) as manager:
        vm = resize_vm(
            manager,
            name, disk=disk, memory=memory, secondaries=secondaries, live=views, chains=chains
        )
        for number, found in vm.lun_map().items():
            raw_lu = (raw or {}).get(number)
            if raw_lu is not None:
                handle = manager.catalog.get(found.pool).open(found.ref)
                for old in reopen_raw(raw_lu, handle, found.header):
                    old.close()
    return vm
