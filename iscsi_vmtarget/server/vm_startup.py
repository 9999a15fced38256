"""What a server exports when it starts: every VM of its state directory's pools
(:func:`~.vm_luns.export_vm`) and every snapshot marked for export
(:func:`~.snapshot_luns.serve_exported`), after provisioning the demo VM if asked.
"""

from __future__ import annotations

import logging

from ..vm.manager import StateDir, VmManager
from ..vm.units.lease import LeaseHeldError
from ..vm.vm_errors import VmError
from .snapshot_luns import serve_exported
from .vm_luns import VmLuns, export_vm

log = logging.getLogger("iscsi_vmtarget")

DEMO_VM = "demo"
DEMO_DISK = 1 << 30
DEMO_MEMORY = 256 << 20


def serve_vms(state_dir: str, *, demo: bool = False) -> list[VmLuns]:
    """What a server exports at start: every VM discovery finds in the pools of
    ``state_dir`` (finishing interrupted resizes first), after provisioning the demo VM
    when ``demo`` is set and it does not exist yet."""
    out: list[VmLuns] = []
    with VmManager(StateDir.at(state_dir)) as manager:
        found = manager.discover(repair=True)
        if demo and found.find(DEMO_VM) is None:
            manager.create(DEMO_VM, disk=DEMO_DISK, memory=DEMO_MEMORY)
            found = manager.discover(repair=False)
        for item in found.damaged:
            log.warning("pool unit %s not exported: %s", item["location"], item["reason"])
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
