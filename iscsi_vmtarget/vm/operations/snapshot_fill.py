"""Full snapshots: a snapshot whose own layers hold every grain of its image.

US 9,354,927: "each snapshot in a series of snapshots may include all data at the particular
moment of the snapshot or only the difference between the current snapshot and a
predecessor snapshot". A snapshot is taken as a difference, metadata only
(:func:`~.snapshot.create_snapshot`); :func:`fill_snapshot` then copies into each of
its frozen layers every grain the layer lacks, read through the layers below. The
snapshot then holds all its data: its reads never reach a lower layer or the volume's
unit, and deleting its predecessors merges nothing into it. (A snapshot that froze a
volume's own unit - a disk's first - holds everything from the start.)

The snapshot's image never changes while it fills, so the daemon may serve the VM
meanwhile: a grain's bytes are written (a grain of zeros is punched to a hole, so
bytes an interrupted earlier copy left there never show) before its allocation bit
is set, and :meth:`~..layers.cow.DeltaLayer.flush` makes the grains stable before it writes
the map naming them. A reader that finds a bit finds its bytes; readers that opened
the layer before (the daemon's chains, exported snapshots) keep their map and read
the same bytes from below. A kill -9 leaves a valid snapshot that is not full yet:
``vm snapshot fill`` (this function again) completes it. Besides a fill only merges
write a frozen layer, and they hold the pool locks: each step of a fill
(:data:`FILL_STEP` grains) holds them too, so other commands run between steps.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import faults
from ..format.header import UnitHeader
from ..layers.cow import GRAIN, ChainBackend, DeltaLayer, grains_of, is_zero
from ..units.scan import FoundVm
from .snapshot_tree import Fullness, find_snapshot, open_chain, record_layer, vm_volumes, walk_chain

if TYPE_CHECKING:
    from ..manager import VmManager

FILL_STEP = 512  #: grains one step copies under the pool locks (32 MiB)
FLUSH_EVERY = 64  #: grains between two map flushes (4 MiB): what a crash makes redo
PROGRESS_EVERY = 16  #: grains between two progress reports (1 MiB)


def fullness(manager: VmManager, vm: FoundVm, record: UnitHeader) -> Fullness:
    """Read from the snapshot's layers' allocation maps (what ``vm snapshot list``
    shows): a fill's progress and a crashed fill are seen as they are."""
    held = size = 0
    for volume in vm_volumes(vm).values():
        chain, root = walk_chain(vm, record_layer(record, volume))
        if not chain:  # it froze the volume's own unit: that holds the whole image
            held += root.header.disk_size
            size += root.header.disk_size
            continue
        found = chain[0]
        pool = manager.catalog.get(found.pool)
        layer = DeltaLayer(pool.open(found.ref), found.header, root.header.disk_size)
        with contextlib.closing(layer):
            held += layer.held()
            size += layer.size
    return Fullness(held, size)


def fill_snapshot(
    manager: VmManager,
    name: str,
    snap: str,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Make snapshot ``snap`` of VM ``name`` full (module docstring); returns the bytes
    its layers took in (0: it was full). ``progress(done, total)`` counts bytes."""
    cursors: dict[uuid.UUID, int] = {}  # layer -> first grain a later step looks at
    done, total, calls = 0, -1, 0

    def advance(n: int) -> None:
        nonlocal done, calls
        done += n
        calls += 1
        if progress is not None and calls % PROGRESS_EVERY == 0:
            progress(done, total)

    finished = False
    while not finished:
        # a merge into the layer waits (and the reverse)
        with manager.session(repair=False) as session:
            vm = session.find(name)
            record = find_snapshot(manager, vm, manager.keyring(), snap).header
            if total < 0:
                state = fullness(manager, vm, record)
                total = state.size - state.held
            finished = _fill_step(manager, vm, record, cursors, advance)
    if progress is not None and total > 0:
        progress(done, total)
    return done


def _fill_step(
    manager: VmManager,
    vm: FoundVm,
    record: UnitHeader,
    cursors: dict[uuid.UUID, int],
    advance: Callable[[int], None],
) -> bool:
    """Fill up to FILL_STEP grains, layer by layer from where the last step stopped;
    True when every layer of the snapshot is full."""
    budget = FILL_STEP
    for volume in vm_volumes(vm).values():
        layer_uuid = record_layer(record, volume)
        chain_units, _root = walk_chain(vm, layer_uuid)
        if not chain_units or cursors.get(layer_uuid, 0) < 0:
            continue  # the volume's own unit, or a layer filled by an earlier step
        chain = open_chain(manager, vm, volume, layer_uuid, read_only=True)
        with contextlib.closing(chain):
            filled, cursors[layer_uuid] = _fill_layer(
                chain, cursors.get(layer_uuid, 0), budget, advance
            )
        budget -= filled
        if budget == 0:
            return False
    return True


def _fill_layer(
    chain: ChainBackend, start: int, budget: int, advance: Callable[[int], None]
) -> tuple[int, int]:
    """Copy up to ``budget`` grains the frozen layer ``chain.layers[0]`` lacks, from
    grain ``start`` on; ``chain`` reads them from below (the layer lacks them).
    Returns the grains filled and where to go on (-1: the layer is full)."""
    layer = chain.layers[0]
    grains = grains_of(layer.size)
    buf = bytearray(GRAIN)
    filled = 0
    grain = start
    while grain < grains and filled < budget:
        if layer.has(grain):
            grain += 1
            continue
        offset = grain * GRAIN
        n = min(GRAIN, layer.size - offset)
        piece = memoryview(buf)[:n]
        chain.read_into(offset, piece)
        if is_zero(piece):
            layer.punch(offset, n)  # a hole reads zeros and costs nothing
        else:
            layer.write(offset, piece)
        layer.mark(grain)  # after the bytes; stable on disk only after them (flush)
        faults.crashpoint("fill.copying")
        faults.pause("fill.copying")
        filled += 1
        grain += 1
        advance(n)
        if filled % FLUSH_EVERY == 0:
            layer.flush()
            faults.crashpoint("fill.flushed")
    layer.flush()
    return filled, -1 if grain >= grains else grain
