"""``vm resize``: grow a VM's disks and its state region, offline or while served.

Every plan is checked before the first unit changes; each unit then grows
crash-safely on its own (:meth:`~..units.unit.Unit.grow`); a disk with snapshots grows by a
new top layer instead (:mod:`.snapshot_resize`).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Mapping

from ..format import sealed
from ..format.header import RegionKind
from ..format.layout import check_disk_size, state_capacity_for
from ..layers.cow import ChainBackend
from ..layers.view import GuestView
from ..manager import VmManager, check_memory
from ..units import locks
from ..units.scan import FoundVm
from ..units.unit import Unit
from ..vm_errors import NotFoundError, VmError
from . import snapshot_resize as layered
from .snapshot import finish_revert


def resize_vm(
    manager: VmManager,
    name: str,
    *,
    disk: int | None = None,
    memory: int | None = None,
    secondaries: Mapping[int, int] | None = None,
    live: Mapping[uuid.UUID, GuestView] | None = None,
    chains: Mapping[int, ChainBackend] | None = None,
) -> FoundVm:
    """Grow the primary disk, the state region (for ``memory``) and/or secondary
    disks (``{LUN: size}``). Every plan is checked before the first unit changes;
    each unit then grows crash-safely on its own. A disk with snapshots grows by a
    new top layer of the new size (:mod:`.snapshot_resize`): every snapshot keeps
    the size it had, and a revert to it brings that size back.

    ``live``: guest views a server in this process exports; they take the new
    layout and fire their capacity listeners (CAPACITY DATA HAS CHANGED); with
    ``chains`` (its copy-on-write chains, by LUN) a disk with snapshots takes its
    new top live. Without them, a VM exported by a running server is refused.
    """
    secondaries = dict(secondaries or {})
    if disk is None and memory is None and not secondaries:
        raise VmError("give --disk, --memory and/or --secondary LUN=SIZE")
    if memory is not None:
        check_memory(memory)
    with manager.session() as session:
        vm = session.find(name)
        if vm.layers and finish_revert(manager, vm, manager.keyring()):
            vm = manager.find(name, session.rediscover())
        luns = vm.lun_map()
        for number in secondaries:
            if number == 0 or number not in luns:
                known = ", ".join(str(n) for n in sorted(luns) if n) or "none"
                raise NotFoundError(f"VM {name!r} has no secondary LUN {number} ({known})")
        sizes = {n: s for n, s in {0: disk, **secondaries}.items() if s is not None}
        for number, new_size in sizes.items():
            check_disk_size(new_size, "disk" if number == 0 else f"LUN {number}")
        tops = layered.live_sizes(vm, list(sizes))
        if tops:  # a disk with snapshots: against its top
            layered.check_growth(vm, sizes)
        with contextlib.ExitStack() as stack:
            units: dict[int, Unit] = {}
            for number in [0, *sorted(secondaries)]:
                if live is None:
                    stack.enter_context(
                        locks.not_served(
                            manager.state.root, luns[number].header.unit_uuid, f"VM {name!r}"
                        )
                    )
                units[number] = stack.enter_context(
                    contextlib.closing(manager.open_unit(luns[number]))
                )
            base = units[0]
            keyring = manager.keyring()
            config = base.read_json(keyring, RegionKind.CONFIG)  # wrong key: stop here
            state_length = None
            if memory is not None:
                wanted = sealed.length_for(state_capacity_for(memory))
                current = base.header.require_region(RegionKind.STATE).length
                state_length = max(wanted, current)
            unit_size = {n: s for n, s in sizes.items() if n not in tops}  # else a new top
            growth = {
                0: (unit_size.get(0), state_length),
                **{n: (unit_size.get(n), None) for n in secondaries},
            }
            for number, (size, state) in growth.items():  # SizeError before any change
                units[number].plan(size, state)
            disks = list(config.get("disks") or [])  # type: ignore[call-overload]
            for number, (size, state) in growth.items():
                unit = units[number]
                view = (live or {}).get(unit.header.unit_uuid)
                if view is None:
                    unit.grow(size, state)
                else:
                    with view.quiesce():  # no guest I/O while a guest segment moves
                        unit.grow(size, state)
                        view.update(unit.header)
            layered.grow_tops(manager, vm, base, sizes, chains)
            for number, new_size in sizes.items():
                if number < len(disks):
                    disks[number] = new_size
            if memory is not None:
                config["memory"] = memory
            config["disks"] = disks
            base.write_json(keyring, RegionKind.CONFIG, config)
    return manager.find(name)
