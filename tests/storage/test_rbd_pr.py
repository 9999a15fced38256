"""Persistent reservations shared through RADOS (storage/rbd_pr.py), in one process:
two logical units on one RBD image, each with its own handle and store, stand for two
gateways (target port groups 1 and 2). What one does the other enforces at once (the
notify is taken before the change completes); concurrent changes are never lost
(compare-and-swap on the object's version)."""

from __future__ import annotations

import errno
import struct
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from iscsi_vmtarget.scsi import LogicalUnit, Nexus, ScsiTarget, Status, UnitIdentity
from iscsi_vmtarget.scsi.pr_state import Initiator
from iscsi_vmtarget.scsi.task import TmfFunction
from iscsi_vmtarget.server.model import PR_METADATA_KEY
from iscsi_vmtarget.storage.rbd import RbdBackend, RbdImageSpec
from iscsi_vmtarget.storage.rbd_pr import RadosPrStore, object_name
from iscsi_vmtarget.testing.ceph import CephCluster, shared_reservations
from tests.scsi.test_scsi_pr import (
    EA,
    PREEMPT_ABORT,
    REGISTER,
    REGISTRATIONS_PREEMPTED,
    RESERVE,
    TUR,
    WE,
    nexus,
    prin,
    prout,
)

BLOCK = 512
WRITE = struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 1, 0)


class Gateway:
    """One LU on its own handle of the image, shown through target port group ``tpgt``."""

    def __init__(self, image: RbdImageSpec, tpgt: int, legacy: str | None = None) -> None:
        self.backend = RbdBackend(image)
        self.tpgt = tpgt
        identity = UnitIdentity.from_uuid(uuid.UUID(int=16))
        old = None if legacy is None else self.backend.metadata_store(legacy)
        self.store = RadosPrStore(self.backend, legacy=old)
        self.lu = LogicalUnit(self.backend, identity, pr_shared=self.store)
        self.target = ScsiTarget({0: self.lu})
        self.aborted: list[Nexus] = []
        self.nexuses: list[Nexus] = []
        self.lu.task_aborter = lambda wants: self.aborted.extend(
            n for n in self.nexuses if wants(Initiator.from_key((n.initiator_port, n.target_port)))
        )

    def login(self, name: str, isid: int = 1) -> Nexus:
        who = nexus(name, isid, tpgt=self.tpgt)
        self.target.nexus_added(who)
        self.target.execute(who, 0, TUR, None)  # POWER ON consumed
        self.nexuses.append(who)
        return who

    def run(self, who: Nexus, cdb: bytes, data: bytes | None = None) -> tuple[int, bytes]:
        r = self.target.execute(who, 0, cdb, data)
        return r.status, bytes(r.sense)

    def out(self, who: Nexus, action: int, **kw: int) -> None:
        cdb, data = prout(action, **kw)
        assert self.run(who, cdb, data) == (Status.GOOD, b"")

    def keys(self, who: Nexus) -> list[int]:
        data = bytes(self.target.execute(who, 0, prin(0), None).data_in)
        length = struct.unpack(">I", data[4:8])[0]
        return sorted(struct.unpack(f">{length // 8}Q", data[8 : 8 + length]))


@pytest.fixture
def gateways(ceph_cluster: CephCluster) -> Iterator[tuple[Gateway, Gateway]]:
    image = ceph_cluster.image(1 << 20, prefix="pr")
    a, b = Gateway(image, 1), Gateway(image, 2)
    yield a, b
    a.backend.close()
    b.backend.close()


def sense_of(sense: bytes) -> tuple[int, int, int]:
    return sense[2] & 0x0F, sense[12], sense[13]


def test_reservation_made_through_a_is_enforced_on_b(gateways: tuple[Gateway, Gateway]) -> None:
    a, b = gateways
    holder, other = a.login("iqn.2026-12.test:holder"), b.login("iqn.2026-12.test:other")
    a.out(holder, REGISTER, sark=0xA1)
    a.out(holder, RESERVE, key=0xA1, kind=WE)
    # no reservation command ran on B yet: the notify did it
    assert b.run(other, WRITE, bytes(BLOCK))[0] == Status.RESERVATION_CONFLICT
    assert b.keys(other) == [0xA1]
    assert b.run(other, struct.pack(">BBIBHB", 0x28, 0, 0, 0, 1, 0))[0] == Status.GOOD
    # the holder's registration is its I_T nexus through A: through B it is no holder
    holder_b = b.login("iqn.2026-12.test:holder")
    assert b.run(holder_b, WRITE, bytes(BLOCK))[0] == Status.RESERVATION_CONFLICT
    assert a.run(holder, WRITE, bytes(BLOCK)) == (Status.GOOD, b"")


def test_preempt_and_abort_reaches_the_other_gateway(gateways: tuple[Gateway, Gateway]) -> None:
    a, b = gateways
    victim, winner = b.login("iqn.2026-12.test:victim"), a.login("iqn.2026-12.test:winner")
    b.out(victim, REGISTER, sark=0xB1)
    b.out(victim, RESERVE, key=0xB1, kind=EA)
    a.out(winner, REGISTER, sark=0xA1)
    a.out(winner, PREEMPT_ABORT, key=0xA1, sark=0xB1, kind=EA)
    assert b.aborted == [victim] and a.aborted == []
    status, sense = b.run(victim, TUR)
    assert status == Status.CHECK_CONDITION and sense_of(sense) == REGISTRATIONS_PREEMPTED
    assert b.run(victim, WRITE, bytes(BLOCK))[0] == Status.RESERVATION_CONFLICT
    assert b.keys(victim) == [0xA1]


def test_a_logical_unit_reset_reaches_the_other_gateway(gateways: tuple[Gateway, Gateway]) -> None:
    """One LU however many gateways reach it: a LOGICAL UNIT RESET through A is a unit
    attention on B's nexuses too, whose tasks on the LU are aborted (SAM-5 §6.3.3)."""
    a, b = gateways
    here, there = a.login("iqn.2026-12.test:here"), b.login("iqn.2026-12.test:there")
    assert (
        a.target.task_management(here, TmfFunction.LOGICAL_UNIT_RESET, 0).name
        == "FUNCTION_COMPLETE"
    )
    assert b.aborted == [there]
    for gateway, who in ((a, here), (b, there)):
        status, sense = gateway.run(who, TUR)
        assert status == Status.CHECK_CONDITION and sense_of(sense) == (0x6, 0x29, 0x03)
        assert gateway.run(who, TUR)[0] == Status.GOOD


def test_a_lost_watch_is_watched_again(gateways: tuple[Gateway, Gateway]) -> None:
    """librados reports a lost watch (the gateway was cut off longer than the watch
    timeout) through the watch's error callback, with its own arguments: the gateway
    watches again, so it still takes the other's changes at once and a gateway that
    starts next finds it there (no power on)."""
    a, b = gateways
    lost = b.store._watch
    lost._error_callback(lost.get_id(), -errno.ENOTCONN)  # as librados calls it
    deadline = time.monotonic() + 10
    while b.store._watch is lost:
        assert time.monotonic() < deadline, "no new watch"
        time.sleep(0.05)
    holder, other = a.login("iqn.2026-12.test:holder"), b.login("iqn.2026-12.test:other")
    a.out(holder, REGISTER, sark=0xA1)
    a.out(holder, RESERVE, key=0xA1, kind=WE)
    assert b.run(other, WRITE, bytes(BLOCK))[0] == Status.RESERVATION_CONFLICT
    a.backend.close()  # only B watches now
    third = RbdBackend(b.backend.spec)
    try:
        assert not RadosPrStore(third).alone()
    finally:
        third.close()


_HOLDER = """
import sys
from iscsi_vmtarget.storage.rbd import RbdBackend, RbdImageSpec
spec = RbdImageSpec.parse(sys.argv[1], conf=sys.argv[2], client_id=sys.argv[3] or None)
backend = RbdBackend(spec)
print("open", flush=True)
sys.stdin.read()
backend.close()
"""


def test_an_image_another_client_has_open_is_no_power_on(
    gateways: tuple[Gateway, Gateway],
) -> None:
    """A gateway whose reservation watch is gone (lapsed, being renewed) still has the
    image open: one that starts then must not take itself for the LU's power on and
    drop the registrations; once nobody else has the image open, it is one."""
    import subprocess
    import sys

    a, b = gateways
    spec = a.backend.spec
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, f"{spec.where.pool}/{spec.where.namespace}/{spec.name}"
         if spec.where.namespace else f"{spec.where.pool}/{spec.name}",
         spec.where.conf or "", spec.where.client_id or ""],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "open\n"
        a.backend.close()
        b.backend.close()  # no reservation watch left, but the image is open elsewhere
        third = RbdBackend(spec)
        try:
            assert not RadosPrStore(third).alone()
            holder.communicate("", timeout=30)  # the other client closes the image
            assert RadosPrStore(third).alone()
        finally:
            third.close()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_concurrent_registrations_on_both_gateways_are_all_kept(
    gateways: tuple[Gateway, Gateway],
) -> None:
    """Each gateway registers 12 initiators at the same time as the other: every
    compare-and-swap that lost is made again on the winner's state."""
    a, b = gateways
    count = 12
    logins = {
        gw: [gw.login(f"iqn.2026-12.test:{gw.tpgt}-{i}") for i in range(count)] for gw in (a, b)
    }
    start = threading.Barrier(2)

    def register(gw: Gateway) -> None:
        start.wait()
        for i, who in enumerate(logins[gw]):
            gw.out(who, REGISTER, sark=gw.tpgt << 8 | i)

    threads = [threading.Thread(target=register, args=(gw,)) for gw in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    expected = sorted(tpgt << 8 | i for tpgt in (1, 2) for i in range(count))
    assert a.keys(logins[a][0]) == expected == b.keys(logins[b][0])
    generation = struct.unpack(
        ">I", bytes(a.target.execute(logins[a][0], 0, prin(0), None).data_in[:4])
    )[0]
    assert generation == 2 * count


def test_compare_and_swap_refuses_a_stale_commit(gateways: tuple[Gateway, Gateway]) -> None:
    a, b = gateways
    first, second = RadosPrStore(a.backend), RadosPrStore(b.backend)
    base = first.load()
    assert second.load() == base
    assert first.commit(b'{"x": 1}')
    assert not second.commit(b'{"x": 2}')  # based on what the first replaced
    assert second.load() == b'{"x": 1}' and second.commit(b'{"x": 2}')
    assert first.load() == b'{"x": 2}'


def test_aptpl_state_of_the_image_metadata_moves_to_the_shared_object(
    ceph_cluster: CephCluster,
) -> None:
    """An RBD LUN of the previous version kept APTPL state in the image's metadata: the
    first gateway to open it takes it into the shared object."""
    image = ceph_cluster.image(1 << 20, prefix="pr")
    old = Gateway(image, 1)
    who = old.login("iqn.2026-12.test:old")
    old.out(who, REGISTER, sark=0x0D, flags=0x01)  # APTPL
    old.out(who, RESERVE, key=0x0D, kind=WE)
    document = old.lu.reservations.dumps()
    old.backend.close()
    backend = RbdBackend(image)
    backend.metadata_store(PR_METADATA_KEY).save(document)
    RadosPrStore(backend)._ioctx.remove_object(object_name(backend.image_id))
    backend.close()

    new = Gateway(image, 1, legacy=PR_METADATA_KEY)
    try:
        again = new.login("iqn.2026-12.test:old")
        assert new.keys(again) == [0x0D]
        assert new.run(again, WRITE, bytes(BLOCK)) == (Status.GOOD, b"")
        assert shared_reservations(image)["aptpl"] is True
    finally:
        new.backend.close()
