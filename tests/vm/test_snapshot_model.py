"""A stateful hypothesis test of snapshots against an in-memory model: random writes
(across grain boundaries, partial and whole grains), snapshots (deltas or full ones),
fills of existing snapshots, deletes (merges), reverts, full and linked clones,
unlinks, VM deletes (refused while a linked clone rests on the VM) and disk growth (a
snapshot keeps its size, a revert brings it back); after every step, every snapshot
and every live disk of every VM reads exactly what the model says - its size
included - and so does the state image, and every snapshot made full still is (its
layers alone hold its image, whatever was deleted below it)."""

from __future__ import annotations

import io
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from iscsi_vmtarget.vm import InUseError, StateDir, VmManager
from iscsi_vmtarget.vm.layers.cow import GRAIN
from iscsi_vmtarget.vm.operations import snapshot as snaps
from iscsi_vmtarget.vm.operations.clone import clone, unlink
from iscsi_vmtarget.vm.operations.resize import resize_vm
from iscsi_vmtarget.vm.operations.snapshot_fill import fill_snapshot

MIB = 1 << 20
SIZES = (2 * MIB, 2 * MIB)  # LUN 0 and one secondary

#: how much a resize adds: a few blocks (the last grain straddles the old end), about
#: a grain, or MiBs
GROWTH = (512, GRAIN + 1536, MIB - 512)


def offsets(size: int) -> st.SearchStrategy[int]:
    return st.one_of(
        st.integers(0, size - 1),
        st.sampled_from([0, GRAIN - 1, GRAIN, 3 * GRAIN + 5, size - GRAIN, size - 700]),
    )


class SnapshotModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="snapmodel-")
        self.manager = VmManager(StateDir.at(self.tmp))
        self.manager.create("a", disk=SIZES[0], memory=MIB, secondaries=SIZES[1:])
        self.live: dict[str, list[bytearray]] = {"a": [bytearray(s) for s in SIZES]}
        self.state: dict[str, bytes] = {"a": b""}
        self.snaps: dict[tuple[str, str], tuple[list[bytes], bytes]] = {}
        self.counter = 0
        self.linked: dict[str, str] = {}  # linked clone -> its source VM
        self.full: set[tuple[str, str]] = set()  # snapshots made full

    def teardown(self) -> None:
        self.manager.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _name(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    @rule(
        data=st.data(),
        lun=st.integers(0, len(SIZES) - 1),
        length=st.integers(1, 3 * GRAIN),
        byte=st.integers(1, 255),
    )
    def write(self, data: st.DataObject, lun: int, length: int, byte: int) -> None:
        vm = data.draw(st.sampled_from(sorted(self.live)))
        size = len(self.live[vm][lun])
        offset = data.draw(offsets(size))
        length = min(length, size - offset)
        backend = snaps.open_live(self.manager, self.manager.find(vm), lun)
        try:
            backend.write(offset, bytes([byte]) * length)
            backend.flush()
        finally:
            backend.close()
        self.live[vm][lun][offset : offset + length] = bytes([byte]) * length

    @rule(data=st.data(), payload=st.binary(max_size=100))
    def set_state(self, data: st.DataObject, payload: bytes) -> None:
        vm = data.draw(st.sampled_from(sorted(self.live)))
        self.manager.write_state(vm, io.BytesIO(payload), len(payload))
        self.state[vm] = payload

    @rule(data=st.data(), full=st.booleans())
    def snapshot(self, data: st.DataObject, full: bool) -> None:
        vm = data.draw(st.sampled_from(sorted(self.live)))
        name = self._name("s")
        info = snaps.create_snapshot(self.manager, vm, name, full=full)
        assert info.fill is not None and (info.fill.full or not full)
        self.snaps[(vm, name)] = ([bytes(d) for d in self.live[vm]], self.state[vm])
        if full:
            self.full.add((vm, name))

    @precondition(lambda self: bool(self.snaps))
    @rule(data=st.data())
    def fill(self, data: st.DataObject) -> None:
        vm, name = data.draw(st.sampled_from(sorted(self.snaps)))
        fill_snapshot(self.manager, vm, name)
        self.full.add((vm, name))

    @precondition(lambda self: bool(self.snaps))
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        vm, name = data.draw(st.sampled_from(sorted(self.snaps)))
        snaps.delete_snapshot(self.manager, vm, name)
        del self.snaps[(vm, name)]
        self.full.discard((vm, name))

    @precondition(lambda self: bool(self.snaps))
    @rule(data=st.data())
    def revert(self, data: st.DataObject) -> None:
        vm, name = data.draw(st.sampled_from(sorted(self.snaps)))
        snaps.revert(self.manager, vm, name)
        images, state = self.snaps[(vm, name)]
        self.live[vm] = [bytearray(i) for i in images]
        self.state[vm] = state

    @precondition(lambda self: len(self.live) < 4)
    @rule(data=st.data(), from_snapshot=st.booleans(), full=st.booleans())
    def clone(self, data: st.DataObject, from_snapshot: bool, full: bool) -> None:
        vm = data.draw(st.sampled_from(sorted(self.live)))
        mine = sorted(s for v, s in self.snaps if v == vm)
        snap = data.draw(st.sampled_from(mine)) if from_snapshot and mine else None
        name = self._name("c")
        clone(self.manager, vm, name, from_snapshot=snap, full=full)
        if not full:
            self.linked[name] = vm
            if snap is None:  # a linked clone of the live disks snapshots them first
                self.snaps[(vm, f"clone-{name}")] = (
                    [bytes(d) for d in self.live[vm]],
                    self.state[vm],
                )
        if snap is None:
            self.live[name] = [bytearray(d) for d in self.live[vm]]
            self.state[name] = self.state[vm]
        else:
            images, state = self.snaps[(vm, snap)]
            self.live[name] = [bytearray(i) for i in images]
            self.state[name] = state

    @precondition(lambda self: bool(self.linked))
    @rule(data=st.data())
    def unlink(self, data: st.DataObject) -> None:
        vm = data.draw(st.sampled_from(sorted(self.linked)))
        assert unlink(self.manager, vm)
        del self.linked[vm]

    @precondition(lambda self: len(self.live) > 1)
    @rule(data=st.data())
    def delete_vm(self, data: st.DataObject) -> None:
        vm = data.draw(st.sampled_from(sorted(self.live)))
        if vm in self.linked.values():
            with pytest.raises(InUseError, match="linked clone"):
                self.manager.delete(vm)
            return
        self.manager.delete(vm)
        del self.live[vm], self.state[vm]
        self.linked.pop(vm, None)
        self.snaps = {k: v for k, v in self.snaps.items() if k[0] != vm}
        self.full = {k for k in self.full if k[0] != vm}

    @rule(data=st.data(), lun=st.integers(0, len(SIZES) - 1), growth=st.sampled_from(GROWTH))
    def grow(self, data: st.DataObject, lun: int, growth: int) -> None:
        vm = data.draw(st.sampled_from(sorted(self.live)))
        size = len(self.live[vm][lun]) + growth
        if lun == 0:
            resize_vm(self.manager, vm, disk=size)
        else:
            resize_vm(self.manager, vm, secondaries={lun: size})
        self.live[vm][lun] += bytes(growth)

    @invariant()
    def everything_reads_as_modelled(self) -> None:
        found = self.manager.discover(repair=False)
        assert sorted(v.name for v in found.vms) == sorted(self.live)
        assert not found.damaged
        for vm, disks in self.live.items():
            for lun, expected in enumerate(disks):
                backend = snaps.open_live(self.manager, self.manager.find(vm, found), lun)
                try:
                    assert backend.read(0, backend.size) == expected, (vm, lun)
                finally:
                    backend.close()
            assert b"".join(self.manager.read_state(vm)) == self.state[vm]
        for (vm, name), (images, _state) in self.snaps.items():
            for lun, expected in enumerate(images):
                backend = snaps.open_snapshot(self.manager, vm, name, lun)
                try:
                    assert backend.read(0, backend.size) == expected, (vm, name, lun)
                finally:
                    backend.close()
        infos = {
            (vm, i.name): i
            for vm in self.live
            for i in snaps.list_snapshots(self.manager, vm, fullness=True)
        }
        assert set(infos) == set(self.snaps)
        for key in self.full:  # merges below a full snapshot never make it a delta again
            fill = infos[key].fill
            assert (
                fill is not None
                and fill.full
                and fill.size == sum(len(i) for i in self.snaps[key][0])
            ), key


SnapshotModel.TestCase.settings = settings(
    max_examples=25,
    stateful_step_count=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestSnapshotModel = SnapshotModel.TestCase
