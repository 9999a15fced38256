"""Growing a disk that has snapshots (``vm resize`` of a VM with copy-on-write layers).

A snapshot keeps the size its disk had, and a revert to it brings that size back:
every delta layer records the size of its image (:func:`~..layers.cow.layer_size`), and a
chain is as large as its top layer. Growing a disk with layers puts a new empty top
layer of the new size over the current top and commits the base unit's header naming
it - the commit point, as for a snapshot - then, for a served disk, rebinds the chain
under quiesce: its initiators get CAPACITY DATA HAS CHANGED (SBC-3 §4.10) from the
chain's capacity listeners. Metadata only, whatever the sizes.

The volume's own unit does not grow: a snapshot may have frozen the unit itself (the
first snapshot of a disk does), so its size is that snapshot's. Past the unit's end a
chain reads zeros (:class:`~..layers.cow.ChainBackend`), and so does a layer's image past its
own size. The unit grows later, offline, when its last layer is merged into it
(:func:`~.snapshot.collect`). A crash before the commit leaves an unreferenced delta,
which the next repair removes; the disk keeps its old size.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

from .. import faults
from ..layers.cow import ChainBackend, DeltaLayer
from ..units.scan import FoundVm
from ..units.unit import Unit
from ..vm_errors import SizeError
from .snapshot_tree import chain_size, new_delta

if TYPE_CHECKING:
    from ..manager import VmManager


def live_sizes(vm: FoundVm, numbers: list[int]) -> dict[int, tuple[uuid.UUID, int]]:
    """(top layer, live size) of the LUNs ``numbers`` that have layers."""
    out = {}
    luns = vm.lun_map()
    for number in numbers:
        volume = luns[number]
        top = vm.base.header.top_of(volume.header.naa, volume.header.unit_uuid)
        if top != volume.header.unit_uuid:
            out[number] = (top, chain_size(vm, top))
    return out


def check_growth(vm: FoundVm, sizes: Mapping[int, int]) -> None:
    """Refuse, before any change, shrinking a disk with layers. Growing one is fine for
    replication too: a replica records each checkpoint's chain size and has room for
    growth where its LUN had it; a round whose disk outgrew it is refused, saying how
    large a new replica must be (:mod:`.replicate`)."""
    for number, (_top, now) in live_sizes(vm, list(sizes)).items():
        if sizes[number] < now:
            raise SizeError(
                f"LUN {number} of VM {vm.name!r} is {now} bytes; shrinking it to "
                f"{sizes[number]} would cut off guest data and is not supported"
            )


def grow_tops(
    manager: VmManager,
    vm: FoundVm,
    base: Unit,
    sizes: Mapping[int, int],
    chains: Mapping[int, ChainBackend] | None,
) -> None:
    """New tops of the new ``sizes`` for the LUNs that have layers, committed at once,
    then bound into the served ``chains``."""
    grown = {
        number: (top, sizes[number])
        for number, (top, now) in live_sizes(vm, list(sizes)).items()
        if sizes[number] > now
    }
    if not grown:
        return
    luns = vm.lun_map()
    deltas = {n: new_delta(manager, vm, luns[n], top, size) for n, (top, size) in grown.items()}
    faults.crashpoint("resize.deltas")
    new = {luns[n].header.naa: d.header.unit_uuid for n, d in deltas.items()}
    served = {n: c for n, c in (chains or {}).items() if n in deltas}
    with contextlib.ExitStack() as stack:
        for _number, chain in sorted(served.items()):
            stack.enter_context(chain.quiesce())
            chain.flush_quiesced()
        base.commit(
            replace(base.header, tops=tuple((n, new.get(n, t)) for n, t in base.header.tops))
        )
        faults.crashpoint("resize.committed")
        for number, chain in served.items():
            found = deltas[number]
            pool = manager.catalog.get(found.pool)
            top = DeltaLayer(pool.open(found.ref), found.header, sizes[number])
            chain.rebind([top, *chain.layers])  # its listeners: CAPACITY DATA HAS CHANGED
