"""The daemon's ``vm.resize`` action: grow a VM it exports, live.

Guest I/O pauses while a region moves, the guest views take the new layout and
initiators get CAPACITY DATA HAS CHANGED (SBC-3 §4.10); see
:func:`iscsi_vmtarget.vm.resize_live`.
"""

from __future__ import annotations

import logging
from typing import Any

from ..runtime import Args, Runtime
from ..vm_luns import resize_live
from .served import served_vm_target, vm_disks

log = logging.getLogger("iscsi_vmtarget")


def resize_vm_live(state_dir: str, runtime: Runtime, args: Args) -> dict[str, Any]:
    """``vm.resize`` ``{name, disk?, memory?, secondaries?: {LUN: size}}``."""
    name = str(args["name"])
    target = served_vm_target(runtime, name)
    secondaries = {int(k): int(v) for k, v in dict(args.get("secondaries") or {}).items()}
    with vm_disks(runtime, name) as disks:
        vm = resize_live(
            state_dir,
            name,
            disks,
            target.raw_luns,
            disk=args.get("disk"),
            memory=args.get("memory"),
            secondaries=secondaries or None,
        )
    log.info("vm %s resized live", name)
    return {"vm": vm.to_json()}
