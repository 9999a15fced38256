"""The daemon's ``vm.serve`` action: export a VM that appeared while the daemon runs.

``serve`` exports every VM its pools hold when it starts (:func:`serve_vms`); a VM
made later - ``vm create``, ``vm clone``, ``vm promote`` - is added by this action at
once instead of at the next start: its units are opened and locked as at start, and
its target joins the registry on the event loop, masked by the VM's grants and the
default grants (:mod:`..grants`; nobody else gets in) and with any CHAP overlay the
managed configuration holds for that name; SendTargets lists it from then on to
those it admits (RFC 7143 §12.3).
"""

from __future__ import annotations

import logging
from typing import Any

from ...vm import StateDir, VmManager
from ..config import vm_target
from ..hypervisor_view import attach_regions
from ..persist import ConfigStore
from ..runtime import Args, Runtime
from ..vm_luns import VmLuns, export_vm, vm_target_name

log = logging.getLogger("iscsi_vmtarget")


def serve_vm_live(state_dir: str, runtime: Runtime, args: Args) -> dict[str, Any]:
    """Export VM ``name`` now; nothing to do if this daemon exports it already."""
    name = str(args["name"])
    iqn = vm_target_name(name)
    if iqn.lower() in runtime.registry.targets:
        return {"target": iqn, "was_served": True}
    with VmManager(StateDir.at(state_dir, args.get("key_file"))) as manager:
        vm = manager.find(name, manager.discover(repair=False))
        luns = export_vm(vm, manager.catalog, manager.state.root)
    try:
        attach_regions(state_dir, [luns], args.get("key_file"))
    except BaseException:
        luns.close()
        raise
    add_vm_target(state_dir, runtime, luns)
    log.info("vm %s: now served as %s", name, iqn)
    return {"target": iqn, "was_served": False}


def add_vm_target(state_dir: str, runtime: Runtime, luns: VmLuns) -> None:
    """Serve opened VM (or snapshot) LUNs as their target, masked by the grants of the
    VM ``luns.vm_uuid`` names (every VM-derived export goes through here); the LUNs
    are closed again if that fails."""
    try:
        target = vm_target(luns)
        overlay = ConfigStore(state_dir).load()
        runtime.on_loop(lambda: runtime.add_pool_target(target, overlay))
    except BaseException:
        luns.close()
        raise
