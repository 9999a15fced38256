"""The daemon's actions on the VMs it serves (not configuration): the :data:`ACTIONS`
table, one function ``(state_dir, runtime, args) -> result`` per request ``op``.

They run only in the daemon (in an executor thread; the registry changes on the event
loop, :meth:`~..runtime.Runtime.on_loop`), on VMs it exports: an action on another VM
is refused with :data:`.served.NOT_EXPORTED`, and the CLI then works on the pools
offline (:func:`~..admin.call_for_vm`). One module per kind of action:

* :mod:`.resize_vm` ``vm.resize``; :mod:`.move_vm` ``vm.move``;
* :mod:`.snapshot_vm` ``vm.snapshot``, ``vm.revert``, ``vm.snapshot.delete``/``fill``;
* :mod:`.serve_snapshot` ``vm.snapshot.export``; :mod:`.serve_vm` ``vm.serve``;
* :mod:`.clone_vm` ``vm.clone``, ``vm.unlink``;
* :mod:`.catalog` ``vm.list``, ``vm.show``, ``vm.create``, ``vm.delete``,
  ``vm.snapshot.list`` (for the HTTPS API: the CLI does these on the pools).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..runtime import Args, Runtime
from .catalog import create_vm, delete_vm, list_snapshots, list_vms, show_vm
from .clone_vm import clone_vm_live, unlink_vm_live
from .move_vm import move_vm_live
from .resize_vm import resize_vm_live
from .serve_snapshot import export_snapshot_live
from .serve_vm import serve_vm_live
from .snapshot_vm import delete_snapshot_live, fill_snapshot_live, revert_vm_live, snapshot_vm_live

Action = Callable[[str, Runtime, Args], dict[str, Any]]

#: Operations on what the daemon serves (not configuration), run only in the daemon.
ACTIONS: dict[str, Action] = {
    "vm.resize": resize_vm_live,
    "vm.snapshot": snapshot_vm_live,
    "vm.revert": revert_vm_live,
    "vm.snapshot.delete": delete_snapshot_live,
    "vm.snapshot.fill": fill_snapshot_live,
    "vm.snapshot.export": export_snapshot_live,
    "vm.move": move_vm_live,
    "vm.serve": serve_vm_live,
    "vm.clone": clone_vm_live,
    "vm.unlink": unlink_vm_live,
    "vm.list": list_vms,
    "vm.show": show_vm,
    "vm.create": create_vm,
    "vm.delete": delete_vm,
    "vm.snapshot.list": list_snapshots,
}
