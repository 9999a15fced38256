"""The daemon's snapshot actions on a VM it exports: ``vm.snapshot``, ``vm.revert``,
``vm.snapshot.delete`` and ``vm.snapshot.fill``.

Each works on the VM's served live disks (:func:`.served.vm_disks`), so the LUNs keep
serving: a snapshot or a revert quiesces them (in-flight commands drain, new ones
wait), flushes and gives them new tops - a disk served as its plain guest view gets
a chain to push them onto first; see :mod:`iscsi_vmtarget.vm.operations.snapshot`.
"""

from __future__ import annotations

import logging
from typing import Any

from ...vm import StateDir, VmManager
from ...vm.operations import snapshot as snaps
from ...vm.operations.snapshot_fill import fill_snapshot
from ..runtime import Args, Runtime
from .served import PROGRESS_ARG, served_vm_target, vm_disks

log = logging.getLogger("iscsi_vmtarget")


def _manager(state_dir: str, args: Args) -> VmManager:
    return VmManager(StateDir.at(state_dir, args.get("key_file")))


def snapshot_vm_live(state_dir: str, runtime: Runtime, args: Args) -> dict[str, Any]:
    """Snapshot a VM the daemon exports: its LUNs are quiesced, flushed, frozen and
    given new tops, then resume; with ``full``, the frozen layers are then filled
    while the LUNs serve; see :func:`iscsi_vmtarget.vm.operations.snapshot.create_snapshot`."""
    name, snap = str(args["name"]), str(args["snapshot"])
    with vm_disks(runtime, name) as disks, _manager(state_dir, args) as manager:
        info = snaps.create_snapshot(
            manager,
            name,
            snap,
            description=str(args.get("description") or ""),
            live=disks,
            full=bool(args.get("full")),
            progress=args.get(PROGRESS_ARG),
        )
    log.info("vm %s: snapshot %s taken live", name, snap)
    return {"snapshot": info.to_json()}


def fill_snapshot_live(state_dir: str, runtime: Runtime, args: Args) -> dict[str, Any]:
    """Make a snapshot of a VM the daemon exports full while its LUNs serve (the
    snapshot's image does not change); see :mod:`iscsi_vmtarget.vm.operations.snapshot_fill`."""
    name, snap = str(args["name"]), str(args["snapshot"])
    served_vm_target(runtime, name)  # refuses a VM this daemon does not export
    with _manager(state_dir, args) as manager:
        filled = fill_snapshot(manager, name, snap, progress=args.get(PROGRESS_ARG))
        info = snaps.snapshot_info(manager, name, snap)
    return {"snapshot": info.to_json(), "filled": filled}


def revert_vm_live(state_dir: str, runtime: Runtime, args: Args) -> dict[str, Any]:
    """Revert a VM the daemon exports to a snapshot, its LUNs quiesced meanwhile."""
    name, snap = str(args["name"]), str(args["snapshot"])
    with vm_disks(runtime, name) as disks, _manager(state_dir, args) as manager:
        info = snaps.revert(manager, name, snap, live=disks)
    log.info("vm %s: reverted live to %s", name, snap)
    return {"snapshot": info.to_json()}


def delete_snapshot_live(state_dir: str, runtime: Runtime, args: Args) -> dict[str, Any]:
    """Delete a snapshot of a VM the daemon exports (the merge waits for an offline
    repair: the daemon's chains keep reading the same bytes meanwhile)."""
    name, snap = str(args["name"]), str(args["snapshot"])
    with vm_disks(runtime, name) as disks, _manager(state_dir, args) as manager:
        snaps.delete_snapshot(manager, name, snap, live=disks)
    return {"deleted": snap}
