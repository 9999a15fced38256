"""The benchmarks' snapshot-chain builder (iscsi_vmtarget.testing.snapshot_chain): the
live disk's grains really sit in every layer, and a revert to the last snapshot undoes
writes made since (what tools/bench relies on between its repetitions)."""

from __future__ import annotations

from pathlib import Path

import pytest

from iscsi_vmtarget.testing import snapshot_chain
from iscsi_vmtarget.vm import StateDir, VmManager
from iscsi_vmtarget.vm.layers.cow import GRAIN, ChainBackend
from iscsi_vmtarget.vm.operations import snapshot as snaps

DEPTH = 4
GRAINS = 32  # the smallest disk a VM may have (2 MiB)


def _live(manager: VmManager) -> ChainBackend:
    live = snaps.open_live(manager, manager.find("c"))
    assert isinstance(live, ChainBackend)
    return live


@pytest.mark.parametrize("layout", snapshot_chain.LAYOUTS)
def test_grains_spread_over_every_layer_under_an_empty_top(
    manager: VmManager, layout: str
) -> None:
    manager.create("c", disk=GRAINS * GRAIN, memory=1 << 20)
    snapshot_chain.build_chain(manager, "c", DEPTH, layout)
    assert [s.name for s in snaps.list_snapshots(manager, "c")] == [
        f"s{i}" for i in range(DEPTH)
    ]
    live = _live(manager)
    try:
        assert len(live.layers) == DEPTH  # the empty top and DEPTH - 1 snapshot layers
        assert live.layers[0].allocated() == []
        # slice i (i >= 1) was written into the layer snapshot s<i> froze; slice 0 is the unit's
        for index in range(1, DEPTH):
            layer = live.layers[DEPTH - index]
            expected = snapshot_chain.slice_grains(index, DEPTH, GRAINS, layout)
            assert layer.allocated() == list(expected)
        in_layers = {g for layer in live.layers for g in layer.allocated()}
        assert set(range(GRAINS)) - in_layers == set(
            snapshot_chain.slice_grains(0, DEPTH, GRAINS, layout)
        )
    finally:
        live.close()


def test_revert_to_the_last_snapshot_undoes_later_writes(manager: VmManager) -> None:
    manager.create("c", disk=GRAINS * GRAIN, memory=1 << 20)
    snapshot_chain.build_chain(manager, "c", DEPTH)
    live = _live(manager)
    try:
        built = bytes(live.read(0, live.size))
        live.write(0, b"\x00" * live.size)
        live.flush()
    finally:
        live.close()
    snaps.revert(manager, "c", snapshot_chain.last_snapshot(DEPTH))
    live = _live(manager)
    try:
        assert bytes(live.read(0, live.size)) == built
    finally:
        live.close()


def test_module_creates_the_vm_and_refuses_an_existing_one(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["c", "--state-dir", str(state_dir), "--disk", "2M", "--depth", "2"]
    assert snapshot_chain.main(argv) == 0
    assert "behind 2 snapshots" in capsys.readouterr().out
    with VmManager(StateDir.at(str(state_dir))) as manager:
        assert [s.name for s in snaps.list_snapshots(manager, "c")] == ["s0", "s1"]
    assert snapshot_chain.main(argv) == 1
    assert "already exists" in capsys.readouterr().err
