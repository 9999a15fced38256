"""A VM whose live disk reads through a chain of snapshots, for the benchmarks
(``tools/bench``'s chain column and ``tools/snapshot-bench``).

:func:`build_chain` writes the whole disk, then takes ``depth`` snapshots and, between
two consecutive ones, rewrites another 1/depth of the grains. The live disk's grains
then sit evenly in ``depth`` layers (the unit itself and the first ``depth - 1``
snapshot layers) under an empty top, so a read really walks the chain; a revert to the
last snapshot (:func:`last_snapshot`) gives back this very chain, which lets a
benchmark undo its own writes.

As a module it creates the VM first (offline: no server may export it yet)::

    python -m iscsi_vmtarget.testing.snapshot_chain --state-dir DIR --disk 1G NAME
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from ..sizes import parse_size
from ..vm import StateDir, VmError, VmManager
from ..vm.layers.cow import GRAIN, grains_of
from ..vm.operations import snapshot as snaps

MIB = 1 << 20
LAYOUTS = ("scattered", "clustered")


def snapshot_name(index: int) -> str:
    return f"s{index}"


def last_snapshot(depth: int) -> str:
    """The snapshot whose revert restores what :func:`build_chain` left."""
    return snapshot_name(depth - 1)


def slice_grains(index: int, depth: int, grains: int, layout: str) -> range:
    """Grains of slice ``index`` of ``depth``: every depth-th grain (``scattered``: a
    sequential read spans every layer) or one contiguous stretch (``clustered``: a
    guest rewriting files)."""
    if layout == "scattered":
        return range(index, grains, depth)
    if layout == "clustered":
        return range(index * grains // depth, (index + 1) * grains // depth)
    raise ValueError(f"unknown layout {layout!r} (one of {', '.join(LAYOUTS)})")


def build_chain(manager: VmManager, name: str, depth: int, layout: str = "scattered") -> None:
    """Fill VM ``name``'s disk (LUN 0) with random data, then snapshot it ``depth``
    times (named :func:`snapshot_name`), rewriting slice i of the grains between
    snapshots i - 1 and i (module docstring). The VM must not be served."""
    if depth < 0:
        raise ValueError(f"depth must not be negative: {depth}")
    live = snaps.open_live(manager, manager.find(name))
    try:
        size = live.size
        block = os.urandom(4 * MIB)
        for off in range(0, size, len(block)):
            live.write(off, block[: min(len(block), size - off)])
        live.flush()
    finally:
        live.close()
    grain = os.urandom(GRAIN)
    for index in range(depth):
        snaps.create_snapshot(manager, name, snapshot_name(index))
        if index == depth - 1:
            break  # the top stays empty
        live = snaps.open_live(manager, manager.find(name))
        try:
            for g in slice_grains(index + 1, depth, grains_of(size), layout):
                start = g * GRAIN
                live.write(start, grain[: min(GRAIN, size - start)])
            live.flush()
        finally:
            live.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m iscsi_vmtarget.testing.snapshot_chain",
        description="Create VM NAME and put its disk behind a chain of DEPTH snapshots.",
    )
    p.add_argument("name")
    p.add_argument("--state-dir", required=True, metavar="DIR")
    p.add_argument("--disk", type=parse_size, default=64 * MIB, help="disk size (default 64M)")
    p.add_argument("--memory", type=parse_size, default=MIB, help="state region size")
    p.add_argument("--depth", type=int, default=10, help="snapshots (default 10)")
    p.add_argument("--layout", choices=LAYOUTS, default="scattered")
    args = p.parse_args(argv)
    started = time.monotonic()
    try:
        with VmManager(StateDir.at(args.state_dir)) as manager:
            manager.create(args.name, disk=args.disk, memory=args.memory)
            build_chain(manager, args.name, args.depth, args.layout)
    except (VmError, ValueError) as exc:
        print(f"snapshot_chain: {exc}", file=sys.stderr)
        return 1
    print(
        f"VM {args.name}: {args.disk} bytes behind {args.depth} snapshots ({args.layout}), "
        f"built in {time.monotonic() - started:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
