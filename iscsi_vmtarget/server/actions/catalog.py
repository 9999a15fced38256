"""The daemon's actions that list, show, create and delete VMs and list snapshots:
what ``vm list|show|create|delete`` and ``vm snapshot list`` do on the pools, for
the remote management API (:mod:`iscsi_vmtarget.server.api`), which has no pools
of its own to work on offline.

They call the same :class:`iscsi_vmtarget.vm.VmManager` methods as the CLI verbs,
under the same pool locks, and describe a VM with :func:`vm_json`, which the CLI's
``--json`` prints too:

* ``vm.list`` ``{pool?}`` -> ``{"vms": [...]}``; ``vm.show`` ``{name}``;
* ``vm.create`` ``{name, disk, memory, secondaries?, mode?, pool?}``: the VM is
  served at once (:func:`~.serve_vm.serve_vm_live`), deny-by-default until granted;
* ``vm.delete`` ``{name, force?}``: refused while initiators are logged in (unless
  ``force``); the daemon stops serving it (:meth:`~..runtime.Runtime.remove_pool_target`)
  and the units are deleted. The caller drops its grants (``grant.drop``, the
  ``uuid`` in the result), as ``vm delete`` does. ``vm delete --force`` asks it too:
  deleted offline under the daemon, the units would stay open in it;
* ``vm.snapshot.list`` ``{name}`` -> ``{"snapshots": [...]}``.
"""

from __future__ import annotations

import logging
from typing import Any

from ...vm import Mode, StateDir, VmError, VmManager
from ...vm.operations import snapshot as snaps
from ...vm.units.scan import FoundVm
from ..runtime import Args, Runtime
from ..vm_luns import vm_target_name
from .serve_vm import serve_vm_live
from .served import key_args

log = logging.getLogger("iscsi_vmtarget")


def vm_json(vm: FoundVm, manager: VmManager) -> dict[str, Any]:
    """A VM as ``vm show --json`` prints it: its units, LUNs, snapshots, its target,
    and whether a server exports it."""
    return {
        **vm.to_json(),
        "target": vm_target_name(vm.name),
        "served": manager.served(vm),
    }


def _manager(state_dir: str, args: Args) -> VmManager:
    return VmManager(StateDir.at(state_dir, args.get("key_file")))


def list_vms(state_dir: str, runtime: Runtime, args: Args) -> dict[str, Any]:
    with _manager(state_dir, args) as manager:
        found = manager.discover(args.get("pool"), repair=False)
        return {"vms": [vm_json(vm, manager) for vm in found.vms]}


def show_vm(state_dir: str, runtime: Runtime, args: Args) -> dict[str, Any]:
    with _manager(state_dir, args) as manager:
        return vm_json(manager.find(str(args["name"])), manager)


def create_vm(state_dir: str, runtime: Runtime, args: Args) -> dict[str, Any]:
    name = str(args["name"])
    with _manager(state_dir, args) as manager:
        manager.create(
            name,
            disk=int(args["disk"]),
            memory=int(args["memory"]),
            secondaries=tuple(int(s) for s in args.get("secondaries") or ()),
            mode=Mode.parse(str(args.get("mode") or "truncate")),
            pool=str(args.get("pool") or "default"),
        )
    log.info("vm %s: created", name)
    serve_vm_live(state_dir, runtime, {"name": name, **key_args(args)})
    with _manager(state_dir, args) as manager:
        return vm_json(manager.find(name), manager)


def delete_vm(state_dir: str, runtime: Runtime, args: Args) -> dict[str, Any]:
    name = str(args["name"])
    force = bool(args.get("force"))
    iqn = vm_target_name(name)
    with _manager(state_dir, args) as manager:
        vm = manager.find(name)  # a clear "no VM named" first
    sessions = runtime.on_loop(lambda: len(runtime.registry.connections_of(iqn.lower())))
    if sessions and not force:
        raise VmError(
            f"VM {name!r} has {sessions} session(s) logged in; log them out first or give force"
        )
    # stop serving it first: its LUNs close and their served locks go, so the units
    # can be deleted (and no session reads a deleted unit)
    runtime.remove_pool_target(iqn)
    with _manager(state_dir, args) as manager:
        vm = manager.delete(name, force=force)
    log.info("vm %s: deleted (%d units)", name, len(vm.units))
    return {"name": vm.name, "units": len(vm.units), "uuid": str(vm.base.header.unit_uuid)}


def list_snapshots(state_dir: str, runtime: Runtime, args: Args) -> dict[str, Any]:
    with _manager(state_dir, args) as manager:
        infos = snaps.list_snapshots(manager, str(args["name"]), fullness=True)
        return {"snapshots": [i.to_json() for i in infos]}
