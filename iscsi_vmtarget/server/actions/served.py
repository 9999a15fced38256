"""What every VM action of the daemon starts from: the VM's served target and live disks.

An action on a VM this daemon does not export is refused with :data:`NOT_EXPORTED`;
the client recognises it (:func:`~..admin.call_for_vm`) and then works on the pools
offline.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ...vm.layers.cow import ChainBackend
from ...vm.layers.flat import FlatView
from ..live_disk import LiveDisk
from ..registry import Target
from ..runtime import AdminError, Args, Runtime
from ..vm_luns import vm_target_name

#: The args key under which an action gets a ``progress(done, total)`` callback when
#: the request asked for progress (``"progress": true``); the daemon then sends
#: ``{"progress": {"done": D, "total": T}}`` lines before the reply.
PROGRESS_ARG = "progress_callback"
#: How an action on a VM the daemon does not export is refused; :func:`~..admin.call_for_vm`
#: recognises it (the client then works on the pools offline).
NOT_EXPORTED = "this daemon does not export a VM named"


def served_vm_target(runtime: Runtime, name: str) -> Target:
    """The target through which this daemon exports the VM ``name``; AdminError if none."""
    target = runtime.registry.targets.get(vm_target_name(name).lower())
    if target is None:
        raise AdminError(f"{NOT_EXPORTED} {name!r}")
    return target


@contextlib.contextmanager
def vm_disks(runtime: Runtime, name: str) -> Iterator[dict[int, LiveDisk]]:
    """The live disks behind the guest LUNs of the VM ``name`` this daemon exports, by
    LUN number, for the length of an action (AdminError if it exports no such VM).
    They are what the VM operations take as ``live``: a disk served as its plain
    guest view becomes a chain when an operation asks (:meth:`LiveDisk.chain`), and
    when the last action using it ends, a chain left without layers gives way to the
    plain view again (:mod:`..live_disk`)."""
    disks = served_vm_target(runtime, name).disks or {}
    with contextlib.ExitStack() as stack:
        yield {n: stack.enter_context(disk.using()) for n, disk in disks.items()}


def other_chains(runtime: Runtime, own: Target, *, raw: bool = False) -> list[Any]:
    """Every served chain but those of target ``own``: what may read a VM's units
    besides the VM itself (linked clones, exported snapshots), for a live change of
    those units to rebind too (a VM disk served as its plain view reads only its own
    unit); ``raw`` adds the raw views (:class:`~...vm.flat.FlatView`) of every other
    target, which read units of their own besides their chain."""
    kinds: tuple[type, ...] = (ChainBackend, FlatView) if raw else (ChainBackend,)
    return [
        lu.backend
        for target in runtime.registry.targets.values()
        if target is not own
        for lu in (*target.scsi.luns.values(), *((target.raw_luns or {}).values() if raw else ()))
        if isinstance(lu.backend, kinds)
    ]


def key_args(args: Args) -> dict[str, Any]:
    """The ``key_file`` of a request, to pass on to another action."""
    return {"key_file": args["key_file"]} if args.get("key_file") else {}
