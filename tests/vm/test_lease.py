"""The delta-lease rules of :mod:`iscsi_vmtarget.vm.units.lease`, with a fake block and clock."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iscsi_vmtarget.vm import faults
from iscsi_vmtarget.vm.format.header import UnitState
from iscsi_vmtarget.vm.manager import StateDir, VmManager
from iscsi_vmtarget.vm.operations.resize import resize_vm
from iscsi_vmtarget.vm.units.device_lease import _KEEPERS, LeaseKeeper, lease_offset
from iscsi_vmtarget.vm.units.device_pool import DevicePool
from iscsi_vmtarget.vm.units.lease import (
    BLOCK,
    TRANSITIONS,
    LeaseHeldError,
    LeaseMachine,
    LeaseRecord,
    Owner,
    State,
    UnitLease,
    Unreadable,
    decode_record,
    encode_record,
)

UNIT = uuid.UUID(int=7)
A = Owner(uuid.UUID(int=1), "host-a", 101)
B = Owner(uuid.UUID(int=2), "host-b", 202)
DURATION = 10.0
MIB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class Block:
    """One shared lease block, seen by every host."""

    def __init__(self, data: bytes = bytes(BLOCK)) -> None:
        self.data = data
        self.writes = 0

    def read(self) -> bytes:
        return self.data

    def write(self, block: bytes) -> None:
        assert len(block) == BLOCK
        self.data = block
        self.writes += 1

    def close(self) -> None:
        pass


def lease(block: Block, owner: Owner, clock: Clock, duration: float = DURATION) -> UnitLease:
    machine = LeaseMachine(UNIT, owner, duration)
    return UnitLease(block, machine, f"unit {UNIT}", clock, clock.sleep)


def holder(block: Block) -> LeaseRecord | None:
    return decode_record(block.data)


def test_free_lease_is_acquired_after_settling_and_renewed() -> None:
    clock, block = Clock(), Block()
    a = lease(block, A, clock)
    assert a.attempt()
    assert clock.now == 1000.0 + DURATION / 10  # one settle delay, no more
    record = holder(block)
    assert record is not None and record.owner == A and record.held and record.unit_uuid == UNIT
    beat = record.heartbeat
    clock.sleep(a.renew_interval)
    assert a.renew()
    assert holder(block).heartbeat == beat + 1  # type: ignore[union-attr]


def test_live_lease_is_refused_and_taken_only_after_a_whole_duration_unchanged() -> None:
    clock, block = Clock(), Block()
    a, b = lease(block, A, clock), lease(block, B, clock)
    assert a.attempt()
    assert not b.attempt()
    message = b.busy_message()
    assert f"owner {A.owner_id} (host host-a, PID 101)" in message and "expires at" in message
    # A keeps renewing: B never gets it, however long it watches
    for _ in range(20):
        clock.sleep(a.renew_interval)
        assert a.renew()
        assert not b.attempt()
    # A dies: B must see the block unchanged for a whole duration
    died = clock.now
    while not b.attempt():
        assert clock.now - died < DURATION + 1
        clock.sleep(0.5)
    assert clock.now - died >= DURATION
    assert holder(block).owner == B  # type: ignore[union-attr]
    # A wakes up: its renewal finds B's record, so A is fenced
    assert not a.renew()
    assert a.state is State.LOST


def test_longer_owner_duration_is_respected() -> None:
    clock, block = Clock(), Block()
    a = lease(block, A, clock, duration=30.0)
    b = lease(block, B, clock, duration=5.0)
    assert a.attempt()
    start = clock.now
    while not b.attempt():
        clock.sleep(1.0)
    assert clock.now - start >= 30.0


def test_release_frees_at_once() -> None:
    clock, block = Clock(), Block()
    a, b = lease(block, A, clock), lease(block, B, clock)
    assert a.attempt()
    assert not b.attempt()
    a.release()
    assert a.state is State.RELEASED
    record = holder(block)
    assert record is not None and not record.held
    assert b.attempt()  # no waiting for expiry


def test_our_own_lease_from_a_past_run_is_taken_back_at_once() -> None:
    clock, block = Clock(), Block()
    assert lease(block, A, clock).attempt()  # then kill -9: never released
    again = lease(block, Owner(A.owner_id, "host-a", 999), clock)
    start = clock.now
    assert again.attempt()
    assert clock.now - start <= again.settle  # one settle, no expiry wait


def test_simultaneous_acquirers_end_with_one_holder() -> None:
    """Both read the block free before either wrote: the last writer wins, the
    other sees a foreign record after settling and goes back to watching."""
    clock, block = Clock(), Block()
    a, b = lease(block, A, clock), lease(block, B, clock)
    free = block.read()
    a._do(a.machine.observe(free, clock()))
    b._do(b.machine.observe(free, clock()))  # overwrites A's record
    clock.sleep(a.settle)
    a._do(a.machine.observe(block.read(), clock()))
    b._do(b.machine.observe(block.read(), clock()))
    assert (a.state, b.state) == (State.WATCHING, State.HELD)


def test_late_renewal_fences_itself() -> None:
    clock, block = Clock(), Block()
    a = lease(block, A, clock)
    assert a.attempt()
    clock.sleep(DURATION * 3 / 4 + 0.1)  # a stall: soon another may take it over
    assert not a.renew()
    assert a.state is State.LOST


def test_copied_block_of_another_unit_and_zeros_are_free() -> None:
    other = LeaseRecord(uuid.UUID(int=99), B, 5, DURATION)
    for data in (bytes(BLOCK), encode_record(other)):
        clock = Clock()
        assert lease(Block(data), A, clock).attempt()
        assert clock.now - 1000.0 < 2


def test_unreadable_block_is_watched_like_a_live_one() -> None:
    clock, block = Clock(), Block(b"\x01" * BLOCK)
    a = lease(block, A, clock)
    assert not a.attempt()
    assert "unreadable" in a.busy_message()
    clock.sleep(DURATION)
    assert a.attempt()


def test_unknown_transition_is_a_bug() -> None:
    machine = LeaseMachine(UNIT, A, DURATION)
    machine.state = State.RELEASED
    with pytest.raises(AssertionError):
        machine.observe(bytes(BLOCK), 0.0)
    assert (State.RELEASED, "anything") not in TRANSITIONS


def test_held_error_is_an_in_use_error() -> None:
    from iscsi_vmtarget.vm.vm_errors import InUseError

    assert issubclass(LeaseHeldError, InUseError)


@settings(max_examples=200, deadline=None)
@given(
    unit=st.uuids(),
    owner=st.uuids(),
    host=st.text(max_size=20),
    pid=st.integers(0, 2**32 - 1),
    beat=st.integers(0, 2**64 - 1),
    ms=st.integers(1, 2**32 - 1),
    held=st.booleans(),
)
def test_record_round_trip(
    unit: uuid.UUID, owner: uuid.UUID, host: str, pid: int, beat: int, ms: int, held: bool
) -> None:
    host = host.encode()[:64].decode(errors="ignore").rstrip("\0")
    record = LeaseRecord(unit, Owner(owner, host, pid), beat, ms / 1000, held=held, wall_ns=5)
    raw = encode_record(record)
    assert len(raw) == BLOCK
    assert decode_record(raw) == record


@settings(max_examples=200, deadline=None)
@given(flip=st.integers(0, 255), bit=st.integers(0, 7))
def test_any_flipped_bit_is_unreadable(flip: int, bit: int) -> None:
    raw = bytearray(encode_record(LeaseRecord(UNIT, A, 3, DURATION)))
    raw[flip] ^= 1 << bit
    with pytest.raises(Unreadable):
        decode_record(raw)


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.sampled_from(["a", "b", "tick", "tick", "settle"]), max_size=60))
def test_a_takeover_needs_a_whole_silent_duration(steps: list[str]) -> None:
    """Whatever the interleaving of A's and B's turns (an attempt, or a renewal while
    held) and of time passing, one host takes the lease from the other only after that
    other wrote nothing for a whole duration; and a host that still believes it holds
    a lease taken from it is fenced by its next renewal."""
    clock, block = Clock(), Block()
    hosts = {"a": lease(block, A, clock), "b": lease(block, B, clock)}
    last_write = {"a": -1e9, "b": -1e9}
    for step in steps:
        if step == "tick":
            clock.sleep(DURATION / 4)
            continue
        if step == "settle":
            clock.sleep(DURATION / 10)
            continue
        me, other = step, "b" if step == "a" else "a"
        if hosts[me].state in (State.LOST, State.RELEASED):
            hosts[me] = lease(block, A if me == "a" else B, clock)  # as the keeper does
        x, was_held = hosts[me], hosts[me].state is State.HELD
        writes = block.writes
        x.renew() if was_held else x.attempt()
        if x.state is State.HELD:
            if not was_held:
                assert clock.now - last_write[other] >= DURATION
            last_write[me] = clock.now
        elif block.writes != writes:  # wrote, then lost the race or found another's
            last_write[me] = clock.now
    for x in hosts.values():
        if x.state is State.HELD and block.read() != x.machine.written:
            assert not x.renew()


def test_lease_follows_a_growing_device_unit(tmp_path: Path) -> None:
    """Growth moves META to the new end: the held lease moves along before the
    table commit, renewals go there, and the old place is scrubbed with the rest."""
    state = str(tmp_path / "state")
    with VmManager(StateDir.at(state)) as manager:
        manager.catalog.create_device("dev", str(tmp_path / "dev.img"), 64 * MIB)
        vm = manager.create("grow", disk=4 * MIB, memory=4 * MIB, pool="dev")
        leases = LeaseKeeper(state, 2.0)
        _KEEPERS[leases.state_dir] = leases
        try:
            assert leases.acquire_vm(vm, manager.catalog) == {vm.base.header.unit_uuid}
            old = leases._leases[vm.base.header.unit_uuid].lease.io.offset  # type: ignore[attr-defined]
            resize_vm(manager, "grow", disk=8 * MIB)
            held = leases._leases[vm.base.header.unit_uuid].lease
            new = held.io.offset  # type: ignore[attr-defined]
            pool = manager.catalog.get("dev")
            assert isinstance(pool, DevicePool)
            assert new == lease_offset(*pool.extent(manager.find("grow").base.ref)) != old
            with open(tmp_path / "dev.img", "rb") as fh:
                fh.seek(old)
                assert not any(fh.read(BLOCK))  # scrubbed with the old META region
            assert leases.renew() == []
            record = decode_record(held.io.read())
            assert record is not None and record.owner.owner_id == leases.me.owner_id
        finally:
            _KEEPERS.pop(leases.state_dir, None)
            leases.close()


def test_keeper_reports_a_lease_taken_over_as_lost(tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    with VmManager(StateDir.at(state)) as manager:
        manager.catalog.create_device("dev", str(tmp_path / "dev.img"), 32 * MIB)
        vm = manager.create("lost", disk=4 * MIB, memory=4 * MIB, pool="dev")
        leases = LeaseKeeper(state, 2.0)
        try:
            (unit,) = leases.acquire_vm(vm, manager.catalog)
            assert leases.status() == [{"vm": "lost", "unit": str(unit), "state": "held"}]
            io = leases._leases[unit].lease.io
            io.write(encode_record(LeaseRecord(unit, B, 1 << 40, 2.0)))  # another took it
            assert leases.renew() == ["lost"]
            assert leases.status() == []
        finally:
            leases.close()
        assert (tmp_path / "state" / "conf" / "owner.json").exists()


def test_directory_pools_make_no_owner_id(tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    with VmManager(StateDir.at(state)) as manager:
        vm = manager.create("plain", disk=4 * MIB, memory=4 * MIB)
        leases = LeaseKeeper(state, 2.0)
        assert leases.acquire_vm(vm, manager.catalog) == set()
        leases.close()
    assert not (tmp_path / "state" / "conf" / "owner.json").exists()


def test_a_device_that_stops_answering_fences_after_one_duration() -> None:
    clock = Clock()

    class Failing(Block):
        broken = False

        def read(self) -> bytes:
            if self.broken:
                raise OSError(5, "I/O error")
            return super().read()

    block = Failing()
    a = lease(block, A, clock)
    assert a.attempt()
    block.broken = True
    clock.sleep(a.renew_interval)
    with pytest.raises(OSError):
        a.renew()  # not yet overdue: retried at the next round
    assert a.state is State.HELD
    clock.sleep(DURATION)
    assert not a.renew()
    assert a.state is State.LOST


def test_another_host_never_repairs_a_unit_whose_vm_is_leased(tmp_path: Path) -> None:
    """A resize cut short on host A is A's to finish while A holds the VM's lease:
    host B's discovery (any management command runs one) leaves the unit alone, and
    repairs it once the lease is free."""
    device, a_state, b_state = tmp_path / "dev.img", tmp_path / "a", tmp_path / "b"
    with VmManager(StateDir.at(str(a_state))) as manager:
        manager.catalog.create_device("dev", str(device), 64 * MIB)
        manager.create("grow", disk=4 * MIB, memory=4 * MIB, pool="dev")
    with VmManager(StateDir.at(str(b_state))) as manager:
        manager.catalog.create_device("dev", str(device))
    killed = subprocess.run(
        [sys.executable, "-m", "iscsi_vmtarget", "vm", "resize", "grow", "--disk", "8M",
         "--state-dir", str(a_state)],
        env={**os.environ, faults.ENV: "resize.journaled"}, capture_output=True, timeout=60,
    )  # fmt: skip
    assert killed.returncode == -9
    a = LeaseKeeper(str(a_state), 2.0)
    try:
        with VmManager(StateDir.at(str(a_state))) as manager:
            vm = manager.find("grow", manager.discover(repair=False))
            assert vm.base.header.state is UnitState.RESIZING
            a.acquire_vm(vm, manager.catalog)
        with VmManager(StateDir.at(str(b_state))) as manager:
            found = manager.discover()  # repair=True
            assert found.repaired == []
            assert found.find("grow").base.header.state is UnitState.RESIZING  # type: ignore[union-attr]
    finally:
        a.close()  # releases the lease
    with VmManager(StateDir.at(str(b_state))) as manager:
        found = manager.discover()
        assert [r["action"] for r in found.repaired] == [
            "interrupted resize completed (was resizing)"
        ]
        assert found.find("grow").base.header.state is UnitState.CLEAN  # type: ignore[union-attr]
