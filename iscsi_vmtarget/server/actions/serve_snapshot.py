"""The daemon's ``vm.snapshot.export`` action: a snapshot's read-only target, live.

``vm snapshot export NAME SNAP`` marks the snapshot for every later ``serve``
(:mod:`iscsi_vmtarget.vm.operations.export_marks`); a running daemon that exports the VM
also opens the snapshot's LUNs and adds its target at once - SendTargets lists it
from then on (RFC 7143 §12.3) to the initiators the VM is granted (its grants
follow it into the export, :mod:`..grants`), read-only. ``--stop`` unmarks it and
removes the target, logging its sessions out as ``target delete`` does.
"""

from __future__ import annotations

import logging
from typing import Any

from ...vm import StateDir, VmManager
from ...vm.operations.export_marks import set_exported
from .. import snapshot_luns as exports
from ..runtime import Args, Runtime
from .serve_vm import add_vm_target
from .served import served_vm_target

log = logging.getLogger("iscsi_vmtarget")


def export_snapshot_live(state_dir: str, runtime: Runtime, args: Args) -> dict[str, Any]:
    """Mark (or unmark) the snapshot and add (or remove) its target in the registry;
    the registry changes on the event loop (:meth:`Runtime.on_loop`)."""
    name, snap, stop = str(args["name"]), str(args["snapshot"]), bool(args.get("stop"))
    served_vm_target(runtime, name)  # refuses a VM this daemon does not export
    iqn = exports.snapshot_target_name(name, snap)
    with VmManager(StateDir.at(state_dir, args.get("key_file"))) as manager:
        if stop:
            set_exported(manager, name, snap, False)
            removed = runtime.remove_pool_target(iqn)
            log.info("vm %s: export of snapshot %s stopped", name, snap)
            return {"target": iqn, "exported": False, "was_served": removed}
        if iqn.lower() in runtime.registry.targets:  # exported already: mark it only
            set_exported(manager, name, snap, True)
            return {"target": iqn, "exported": True, "was_served": True}
        add_vm_target(state_dir, runtime, exports.open_exported(manager, name, snap))
        try:
            set_exported(manager, name, snap, True)
        except BaseException:  # not marked: not served either
            runtime.remove_pool_target(iqn)
            raise
    log.info("vm %s: snapshot %s exported read-only as %s", name, snap, iqn)
    return {"target": iqn, "exported": True, "was_served": False}
