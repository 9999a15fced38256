"""Which snapshots are marked for a read-only export (``vm snapshot export``): the
list ``conf/snapshot-exports.json`` (replaced atomically) that every ``serve`` reads
to build the snapshots' logical units (:mod:`iscsi_vmtarget.server.snapshot_luns`).
"""

from __future__ import annotations

import json
import os

from ...storage import atomic_file
from ..manager import VmManager
from ..units.scan import discover
from ..vm_errors import VmError
from .snapshot_tree import find_snapshot


def exports_path(state_root: str) -> str:
    return os.path.join(state_root, "conf", "snapshot-exports.json")


def exported(state_root: str) -> list[tuple[str, str]]:
    """(VM, snapshot) pairs ``vm snapshot export`` marked."""
    path = exports_path(state_root)
    try:
        with open(path) as fh:
            items = json.load(fh)
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise VmError(f"{path}: {exc}") from exc
    return [(str(i["vm"]), str(i["snapshot"])) for i in items]


def set_exported(manager: VmManager, name: str, snap: str, on: bool) -> None:
    """Mark (or unmark) a snapshot for a read-only export (its target is
    :func:`~iscsi_vmtarget.server.snapshot_luns.snapshot_target_name`). Unmarking
    needs no such snapshot any more (an export of a deleted one can stop)."""
    pools = manager.catalog.all()
    with manager.locked(pools):
        if on:
            vm = manager.find(name, discover(pools, repair=False))
            find_snapshot(manager, vm, manager.keyring(), snap)
        items = [p for p in exported(manager.state.root) if p != (name, snap)]
        if on:
            items.append((name, snap))
        atomic_file.write_json(
            exports_path(manager.state.root), [{"vm": v, "snapshot": s} for v, s in items]
        )
