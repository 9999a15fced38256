"""The daemon's ``vm.clone`` and ``vm.unlink`` actions, for VMs it exports.

* ``vm.clone`` ``{src, dst, from_snapshot?, full?, key_file?}``: clone VM ``src`` as
  ``dst`` (:func:`iscsi_vmtarget.vm.operations.clone.clone` with ``src``'s served chains). Of the
  live disks, the clone first snapshots ``src`` with its LUNs quiesced, as
  ``vm snapshot`` does (in-flight commands drain, new ones wait, the guest notices
  nothing and its LUNs keep their VPD 0x83 identities), then links to that snapshot,
  which is kept and named in the result. The clone is served at once, under its own
  target and designators (:func:`~.serve_vm.serve_vm_live`).
* ``vm.unlink`` ``{name, key_file?}``: make linked clone ``name`` independent while it
  serves (its guest writing) and its source too; the served chains that read through
  its layers end at its own units afterwards.

Both refuse a VM this daemon does not export with :data:`~.served.NOT_EXPORTED`, so the
CLI then works on the pools offline (:func:`~..admin.call_for_vm`).
"""

from __future__ import annotations

import logging
from typing import Any

from ...vm import StateDir, VmError, VmManager
from ...vm.operations.clone import clone, unlink
from ..runtime import Args, Runtime
from .serve_vm import serve_vm_live
from .served import PROGRESS_ARG, key_args, other_chains, served_vm_target, vm_disks

log = logging.getLogger("iscsi_vmtarget")


def clone_vm_live(state_dir: str, runtime: Runtime, args: Args) -> dict[str, Any]:
    """``vm.clone`` (module docstring); the result names the snapshot taken (None
    when the clone was made from a named snapshot or copied in full) and the clone's
    target, or why it could not be served now (``serve_error``)."""
    src, dst, full = str(args["src"]), str(args["dst"]), bool(args.get("full"))
    snapshot = args.get("from_snapshot")
    with (
        vm_disks(runtime, src) as disks,
        VmManager(StateDir.at(state_dir, args.get("key_file"))) as manager,
    ):
        taken = clone(
            manager,
            src,
            dst,
            from_snapshot=None if snapshot is None else str(snapshot),
            full=full,
            progress=args.get(PROGRESS_ARG),
            live=disks,
        )
    log.info("vm %s: cloned live as %s (snapshot %s)", src, dst, taken or snapshot or "-")
    result: dict[str, Any] = {"src": src, "dst": dst, "full": full, "snapshot": taken}
    try:
        result.update(serve_vm_live(state_dir, runtime, {"name": dst, **key_args(args)}))
    except (VmError, OSError, ValueError) as exc:  # made, and served from the next start
        log.warning("vm %s: cloned but not served now: %s", dst, exc)
        result["serve_error"] = str(exc)
    return result


def unlink_vm_live(state_dir: str, runtime: Runtime, args: Args) -> dict[str, Any]:
    """``vm.unlink`` (module docstring); ``changed`` is False if it was independent."""
    name = str(args["name"])
    followers = other_chains(runtime, served_vm_target(runtime, name))
    with (
        vm_disks(runtime, name) as disks,
        VmManager(StateDir.at(state_dir, args.get("key_file"))) as manager,
    ):
        changed = unlink(manager, name, args.get(PROGRESS_ARG), live=disks, followers=followers)
    log.info("vm %s: unlinked live" if changed else "vm %s: already independent", name)
    return {"name": name, "changed": changed}
