"""The daemon's ``vm.move`` action: move a VM it exports to another pool while its
LUNs serve.

Copy, catch up on the writes made meanwhile, then switch with the LUNs quiesced; see
:func:`iscsi_vmtarget.vm.operations.move.move_live`. Other served chains reading the VM's units
(linked clones, exported snapshots) follow, and the units' leases move with them.
"""

from __future__ import annotations

import logging
from typing import Any

from ...vm import StateDir, VmManager
from ...vm.operations.move import move_live
from ...vm.units.device_lease import keeper as lease_keeper
from ...vm.units.lease import LeaseHeldError
from ..hypervisor_view import rebind_regions
from ..runtime import Args, Runtime
from .served import PROGRESS_ARG, other_chains, served_vm_target, vm_disks

log = logging.getLogger("iscsi_vmtarget")


def move_vm_live(state_dir: str, runtime: Runtime, args: Args) -> dict[str, Any]:
    """``vm.move`` ``{name, pool, key_file?}``."""
    name, pool = str(args["name"]), str(args["pool"])
    own = served_vm_target(runtime, name)
    followers = other_chains(runtime, own, raw=True)
    with (
        vm_disks(runtime, name) as disks,
        VmManager(StateDir.at(state_dir, args.get("key_file"))) as manager,
    ):
        report = move_live(
            manager,
            name,
            pool,
            disks,
            raw=own.raw_luns or {},
            followers=followers,
            progress=args.get(PROGRESS_ARG),
        )
        _lease_moved(state_dir, runtime, manager, name)
    rebind_regions(state_dir, own.region_luns or {}, name, args.get("key_file"))
    log.info("vm %s moved live to pool %s: %s", name, pool, report)
    return {"moved": report.to_json()}


def _lease_moved(state_dir: str, runtime: Runtime, manager: VmManager, name: str) -> None:
    """A unit's lease lives in its own META region (:mod:`...vm.units.device_lease`), so it
    moves with the unit: given up at the old places, taken at the new ones (a unit
    moved into a device pool is leased from then on). Should another host hold it
    there, this daemon stops serving the VM, as when a lease is lost."""
    vm = manager.find(name)
    leases = lease_keeper(state_dir)
    leases.release(u.header.unit_uuid for u in vm.lun_map().values())
    try:
        leases.acquire_vm(vm, manager.catalog)
    except LeaseHeldError as exc:
        log.error("vm %s: no longer serving it, its moved units are leased: %s", name, exc)
        runtime.remove_pool_target(served_vm_target(runtime, name).name)
