"""The daemon's side of unit leases (:mod:`iscsi_vmtarget.vm.units.lease`): fence a VM whose
lease was lost, and serve a VM as soon as the lease it waited for is ours.

A VM whose device-pool unit is leased by a live daemon elsewhere is not exported at
start (its target does not exist: SendTargets does not list it, a login finds no such
target). The keeper's thread keeps watching that lease; once its owner released it,
or its heartbeat stood still for a whole lease duration, the VM is exported the way
``vm.serve`` exports a VM made while the daemon runs. ``status`` lists the leases held
and the VMs waiting, with their owner and expiry. A VM whose lease is lost (taken over
after this daemon failed to renew in time) loses its target at once: its sessions are
dropped and its units closed, and it waits for the lease again.
"""

from __future__ import annotations

import asyncio
import logging

from ..vm import VmError
from ..vm.units.device_lease import LeaseKeeper
from ..vm.units.lease import LeaseHeldError
from .actions.serve_vm import serve_vm_live
from .runtime import Runtime
from .vm_luns import vm_target_name

log = logging.getLogger("iscsi_vmtarget")


def keep_leases(keeper: LeaseKeeper, runtime: Runtime, loop: asyncio.AbstractEventLoop) -> None:
    """Hook ``keeper``'s rounds to this daemon's runtime (call on the event loop)."""
    runtime.loop = loop
    runtime.leases = keeper

    def on_tick(lost: list[str], waiting: list[str]) -> None:
        for name in lost:
            runtime.remove_pool_target(vm_target_name(name))
            keeper.waiting[name] = "its lease was lost"
        for name in waiting:
            try:
                serve_vm_live(keeper.state_dir, runtime, {"name": name})
            except LeaseHeldError:
                pass  # still live elsewhere (logged when its owner changes)
            except VmError as exc:  # e.g. deleted meanwhile
                log.warning("VM %s: no longer waiting for its lease: %s", name, exc)
                keeper.waiting.pop(name, None)

    keeper.on_tick = on_tick
    keeper.start()
