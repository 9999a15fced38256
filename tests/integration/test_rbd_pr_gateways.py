"""Persistent reservations shared by two gateways of one RBD LUN (storage/rbd_pr.py):
made through one gateway, enforced on the other; PREEMPT AND ABORT across them; APTPL
state back after both gateways restart (and non-APTPL state gone); libiscsi's Prin*
and Prout* families through the owner while the standby watches.

Gateway B (target port group 2) starts first and owns the image (active/optimized);
A is standby, which runs PERSISTENT RESERVE IN/OUT (SPC-4 §5.15.2.4.4) but no media
access, so data commands go through B.

With ``alua_non_owner = "active-non-optimized"`` A serves data too: a write through A
is read back through B with no ALUA state change and no unit attention; libiscsi's
Prin*/Prout* families and SCSI.MultipathIO pass with one session on each gateway; a
killed owner is fenced and A takes the owner role; of three gateways, exactly one takes
it. A LOGICAL UNIT RESET waiting for a gateway that does not answer holds up no other
session."""

from __future__ import annotations

import os
import re
import signal
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from iscsi_vmtarget.client.initiator import Initiator
from iscsi_vmtarget.iscsi import pdu as P
from iscsi_vmtarget.server.alua_role import OwnerRole
from iscsi_vmtarget.server.rbd_gateway import POLL_SECONDS
from iscsi_vmtarget.storage.rbd import RbdBackend, RbdImageSpec
from iscsi_vmtarget.storage.rbd_pr import RadosPrStore
from iscsi_vmtarget.testing.ceph import CephCluster, shared_reservations
from tests.conftest import RunningTarget, need_tool, run_tool
from tests.integration.test_rbd_gateways import BLOCK, IQN, gateway, groups, read, wait_for, write
from tests.integration.test_rbd_gateways import image as image  # the fixture

pytestmark = [pytest.mark.interop, pytest.mark.slow]

HOST1 = "iqn.2026-12.org.iscsi-vmtarget.test:node1"
HOST2 = "iqn.2026-12.org.iscsi-vmtarget.test:node2"
REGISTER, RESERVE, PREEMPT_AND_ABORT = 0x00, 0x01, 0x05
WE = 0x1  # WRITE EXCLUSIVE
APTPL, ALL_TG_PT = 0x01, 0x04
CONFLICT = 0x18  # RESERVATION CONFLICT status
REGISTRATIONS_PREEMPTED = (0x6, 0x2A, 0x05)
WRITE = struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 1, 0)


def session(t: RunningTarget, initiator: str) -> Initiator:
    ini = Initiator(port=t.port, initiator_name=initiator, target_name=IQN)
    ini.login()
    groups(ini)  # the power-on unit attention taken (a standby port refuses TEST UNIT READY)
    return ini


def prout(ini: Initiator, action: int, key: int = 0, sark: int = 0, flags: int = 0) -> int:
    data = struct.pack(">QQIBBH", key, sark, 0, flags, 0, 0)
    cdb = struct.pack(">BBBHIB", 0x5F, action, WE, 0, len(data), 0)
    return ini.command(cdb, data_out=data).status


def read_keys(ini: Initiator) -> list[int]:
    data = ini.scsi("READ KEYS", struct.pack(">BB5sHB", 0x5E, 0, b"", 1024, 0), read_length=1024)
    length = struct.unpack(">I", data[4:8])[0]
    return sorted(struct.unpack(f">{length // 8}Q", data[8 : 8 + length]))


def read_reservation(ini: Initiator) -> tuple[int, int] | None:
    data = ini.scsi("READ RESERVATION", struct.pack(">BB5sHB", 0x5E, 1, b"", 64, 0), read_length=64)
    if struct.unpack(">I", data[4:8])[0] == 0:
        return None
    return struct.unpack(">Q", data[8:16])[0], data[21] & 0x0F


def write_status(ini: Initiator) -> int:
    return ini.command(WRITE, data_out=bytes(512)).status


#: libiscsi's reservation families (20 tests)
FAMILIES = ",".join(
    f"SCSI.{family}"
    for family in (
        "PrinReadKeys",
        "PrinServiceactionRange",
        "PrinReportCapabilities",
        "ProutRegister",
        "ProutReserve",
        "ProutClear",
        "ProutPreempt",
    )
)


def iscsi_test_cu(tests: str, *urls: str) -> int:
    """Run libiscsi's iscsi-test-cu --dataloss on ``tests`` through ``urls`` (with
    two, its second session goes to the second URL); every test it runs must pass:
    how many ran."""
    need_tool("iscsi-test-cu")
    done = run_tool("iscsi-test-cu", "--dataloss", "-t", tests, *urls, check=False)
    counts = re.search(r"tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", done.stdout)
    assert counts is not None and done.returncode == 0, done.stdout[-4000:]
    total, ran, passed, failed = map(int, counts.groups())
    assert total == ran == passed and failed == 0, done.stdout[-4000:]
    return ran


def libiscsi_reservation_families(
    owner: RunningTarget, standby: RunningTarget, image: RbdImageSpec
) -> None:
    """libiscsi's Prin*/Prout* families through the owner, every change going through
    the shared object and announced to the standby. Its second session cannot be put
    on the standby: libiscsi logs in with TEST UNIT READY, which a standby port refuses
    (NOT READY, SPC-4 §5.15.2.4.4), and the Access tests read and write through both
    sessions (with active/non-optimized non-owners it can: see below)."""
    assert iscsi_test_cu(FAMILIES, owner.url(IQN)) == 20
    assert shared_reservations(image)["registrations"] == []  # the suite cleans up
    watcher = session(standby, HOST1)
    assert read_keys(watcher) == [] and read_reservation(watcher) is None
    watcher.close()


def test_reservations_cross_gateways_and_survive_their_restart(
    ceph_cluster: CephCluster, image: RbdImageSpec, tmp_path: Path
) -> None:
    def start(name: str, tpgt: int) -> RunningTarget:
        return gateway(tmp_path, name, tpgt, image, ceph_cluster.conf)

    b = start("b", 2)
    a = start("a", 1)
    try:
        libiscsi_reservation_families(b, a, image)
        holder_a, other_a = session(a, HOST1), session(a, HOST2)
        holder_b, other_b = session(b, HOST1), session(b, HOST2)
        assert groups(holder_a) == {1: 0x2, 2: 0x0}  # B owns the image, A standby
        # through standby A: HOST1 registers for every target port, with APTPL, reserves
        assert prout(holder_a, REGISTER, sark=0x11, flags=APTPL | ALL_TG_PT) == 0
        assert prout(holder_a, RESERVE, key=0x11) == 0
        # on B at once: HOST2 may not write, HOST1 (registered through all ports) may
        assert write_status(other_b) == CONFLICT
        assert write_status(holder_b) == 0
        assert read_keys(other_b) == [0x11]
        assert read_reservation(other_b) == (0x11, WE)

        # HOST2 registers through A and preempts HOST1 there: HOST1's nexus on B is told
        assert prout(other_a, REGISTER, sark=0x22, flags=APTPL) == 0
        assert prout(other_a, PREEMPT_AND_ABORT, key=0x22, sark=0x11) == 0
        r = holder_b.command(bytes(6))
        assert (r.status, (r.sense_key, *r.asc_ascq)) == (2, REGISTRATIONS_PREEMPTED)
        assert write_status(holder_b) == CONFLICT
        assert read_keys(holder_b) == [0x22] and read_reservation(holder_b) == (0x22, WE)
        for ini in (holder_a, other_a, holder_b, other_b):
            ini.close()
    finally:
        a.stop()
        b.stop()
    assert shared_reservations(image)["aptpl"] is True

    # every gateway restarted: the APTPL state is there; through B, HOST2's own
    # nexus on A holds it, so its nexus on B is not registered and conflicts
    b, a = start("b", 2), start("a", 1)
    try:
        other_b, other_a = session(b, HOST2), session(a, HOST2)
        assert read_reservation(other_b) == (0x22, WE) and read_keys(other_a) == [0x22]
        assert write_status(other_b) == CONFLICT
        # HOST2 turns APTPL off (REGISTER with the same key, APTPL=0)
        assert prout(other_a, REGISTER, key=0x22, sark=0x22) == 0
        other_a.close()
        other_b.close()
    finally:
        a.stop()
        b.stop()
    # without APTPL the reservation ends when the LU's last gateway went: the first one
    # to start again is the LU's power on (SPC-4 §5.13.5)
    b = start("b", 2)
    try:
        other_b = session(b, HOST2)
        assert read_keys(other_b) == [] and read_reservation(other_b) is None
        assert write_status(other_b) == 0
        other_b.close()
    finally:
        b.stop()


# -- active/non-optimized non-owners (alua_non_owner = "active-non-optimized") -------

ANO = "active-non-optimized"
TUR = bytes(6)
STATE_CHANGED = (0x6, 0x2A, 0x06)  # UNIT ATTENTION, ASYMMETRIC ACCESS STATE CHANGED


@pytest.fixture
def ano_gateways(
    ceph_cluster: CephCluster, image: RbdImageSpec, tmp_path: Path
) -> Iterator[tuple[RunningTarget, RunningTarget]]:
    """(A, B): two gateways of ``image`` in active/non-optimized mode; B (target port
    group 2) starts first and holds the ALUA owner role, A is active/non-optimized."""
    b = gateway(tmp_path, "b", 2, image, ceph_cluster.conf, non_owner=ANO)
    a = gateway(tmp_path, "a", 1, image, ceph_cluster.conf, non_owner=ANO)
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


def role_holder(image: RbdImageSpec) -> str | None:
    """The client address recorded with the ALUA owner role (its RADOS object)."""
    backend = RbdBackend(image, read_only=True)
    try:
        return OwnerRole(backend).holder().address
    finally:
        backend.close()


def blocklisted(cluster: CephCluster) -> list[str]:
    """The client addresses on the OSD blocklist, one entry each."""
    out = run_tool("ceph", "-c", cluster.conf, "osd", "blocklist", "ls").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def test_active_non_optimized_gateway_writes_without_state_changes(
    ano_gateways: tuple[RunningTarget, RunningTarget],
) -> None:
    a, b = ano_gateways
    ia, ib = session(a, HOST1), session(b, HOST1)
    assert groups(ia) == {1: 0x1, 2: 0x0}  # A active/non-optimized, B active/optimized
    assert groups(ib) == {2: 0x0}
    for lba, writer, reader in ((0, ia, ib), (8, ib, ia), (16, ia, ib)):
        data = bytes([lba + 1]) * 4 * BLOCK  # librbd's lock moves with each write
        assert write(writer, lba, data) == (0, (0, 0, 0))
        assert read(reader, lba, 4) == data
    assert groups(ia) == {1: 0x1, 2: 0x0} and groups(ib) == {2: 0x0}
    # no unit attention on either side: the reported states never changed
    assert ia.command(TUR).status == 0 and ib.command(TUR).status == 0
    ib.close()
    b.stop()  # a clean stop gives the role up: A takes it without fencing anyone
    wait_for("A active/optimized", lambda: groups(ia) == {1: 0x0}, timeout=3)
    assert b"fencing" not in Path(str(a.log_path)).read_bytes()
    ia.close()


def test_libiscsi_reservations_and_multipath_across_active_gateways(
    ano_gateways: tuple[RunningTarget, RunningTarget], image: RbdImageSpec
) -> None:
    """libiscsi's Prin*/Prout* families and MultipathIO with its first session on the
    active/non-optimized gateway and its second on the owner."""
    a, b = ano_gateways
    assert iscsi_test_cu(f"{FAMILIES},SCSI.MultipathIO", a.url(IQN), b.url(IQN)) == 24
    # its second initiator's sessions went to B (libiscsi's mpath_sd2_get_or_clone)
    second = "initiator=iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test-2 "
    assert second in b.log() and second not in a.log()
    assert shared_reservations(image)["registrations"] == []


def test_active_non_optimized_gateway_fences_a_killed_owner_and_takes_the_role(
    ceph_cluster: CephCluster,
    ano_gateways: tuple[RunningTarget, RunningTarget],
    image: RbdImageSpec,
) -> None:
    a, b = ano_gateways
    ia, watcher = session(a, HOST1), session(a, HOST2)
    data = b"k" * 4 * BLOCK
    assert write(session(b, HOST1), 0, data) == (0, (0, 0, 0))  # B holds the lock, too
    killed = role_holder(image)
    b.proc.kill()
    b.proc.wait()
    wait_for("A active/optimized", lambda: groups(ia) == {1: 0x0})
    r = watcher.command(TUR)
    assert (r.status, (r.sense_key, *r.asc_ascq)) == (2, STATE_CHANGED)
    assert killed and killed in blocklisted(ceph_cluster)
    assert role_holder(image) != killed
    assert read(ia, 0, 4) == data
    assert write(ia, 4, b"a" * BLOCK) == (0, (0, 0, 0))  # librbd breaks the dead lock
    assert b"fencing" in Path(str(a.log_path)).read_bytes()


def test_of_three_gateways_finding_the_holder_killed_exactly_one_takes_the_role(
    ceph_cluster: CephCluster, image: RbdImageSpec, tmp_path: Path
) -> None:
    """B holds the role; A and C (groups 1 and 3) both find it gone once it is killed,
    both fence it and both try to record themselves: the role object's compare-and-swap
    lets one through, the other reads the winner and stays active/non-optimized. A and
    C are paused while B's watch expires and go on together, so they race."""
    b = gateway(tmp_path, "b", 2, image, ceph_cluster.conf, non_owner=ANO)
    a = gateway(tmp_path, "a", 1, image, ceph_cluster.conf, non_owner=ANO)
    c = gateway(tmp_path, "c", 3, image, ceph_cluster.conf, non_owner=ANO)
    looker = RbdBackend(image, read_only=True)  # lists the image's watchers at once
    try:
        paths = {1: session(a, HOST1), 3: session(c, HOST1)}
        assert groups(paths[1]) == {1: 0x1, 2: 0x0} and groups(paths[3]) == {3: 0x1, 2: 0x0}
        killed = role_holder(image)
        b.proc.kill()
        b.proc.wait()
        # B's watch lapses 4-5 s after its last ping (each second); A's and C's must not
        # (paused for 3 s at most)
        time.sleep(3.5)
        for t in (a, c):
            os.kill(t.proc.pid, signal.SIGSTOP)
        try:
            wait_for("B's watch gone", lambda: killed not in looker.watchers(), 3)
        finally:
            for t in (a, c):
                os.kill(t.proc.pid, signal.SIGCONT)

        def optimized() -> list[int]:
            now = [g for g, ini in paths.items() if groups(ini).get(g) == 0x0]
            assert len(now) <= 1, now  # never two at once
            return now

        wait_for("a new holder", optimized)
        deadline = time.monotonic() + 2 * POLL_SECONDS + 0.5  # the other had its rounds
        while time.monotonic() < deadline:
            (winner,) = optimized()
        (loser,) = set(paths) - {winner}
        assert groups(paths[winner]) == {winner: 0x0}
        assert groups(paths[loser]) == {loser: 0x1, winner: 0x0}
        took = [t for t in (a, c) if "took the ALUA owner role" in t.log()]
        assert len(took) == 1, [t.log()[-2000:] for t in (a, c)]
        listed = blocklisted(ceph_cluster)
        assert killed is not None and listed.count(killed) == 1, listed
        alive = looker.watchers()
        assert role_holder(image) in alive and not set(alive) & set(listed)
        for ini in paths.values():
            ini.close()
    finally:
        looker.close()
        for t in (a, b, c):
            t.stop()


def lu_reset(ini: Initiator) -> P.Pdu:
    """LOGICAL UNIT RESET of LUN 0 (RFC 7143 §11.5.1): the target's response."""
    ini.send_pdu(
        P.TaskMgmtRequest(
            itt=ini.next_itt(), function=5, immediate=True, cmdsn=ini.cmdsn, expstatsn=ini.expstatsn
        )
    )
    return ini.recv_pdu()


def test_a_reset_waiting_for_a_silent_gateway_holds_up_no_other_session(
    ceph_cluster: CephCluster, image: RbdImageSpec, tmp_path: Path
) -> None:
    """A LOGICAL UNIT RESET completes once the LU's other gateways took it (up to the 5 s
    notify timeout); while a gateway that does not answer holds it up, the resetting
    gateway's other sessions are served as before (the wait is in a worker thread)."""
    a = gateway(tmp_path, "a", 1, image, ceph_cluster.conf)
    resetter, other = session(a, HOST1), session(a, HOST2)
    asked, release = threading.Event(), threading.Event()

    def silent(message: bytes) -> None:  # a peer that takes the notify, answers late
        asked.set()
        release.wait(10)

    peer = RbdBackend(image, read_only=True)
    answer: list[P.Pdu] = []
    resetting = threading.Thread(target=lambda: answer.append(lu_reset(resetter)))
    try:
        RadosPrStore(peer).listen(silent)
        resetting.start()
        assert asked.wait(5)
        start = time.monotonic()
        r = other.command(TUR)  # reset here already: its unit attention, at once
        assert (r.status, r.sense_key, r.asc_ascq) == (2, 0x6, (0x29, 0x03))
        for lba in range(8):
            assert read(other, lba, 1) == bytes(BLOCK)
        assert time.monotonic() - start < 1.0
        assert not answer  # the reset waits for the silent gateway
        release.set()
        resetting.join(10)
        assert isinstance(answer[0], P.TaskMgmtResponse) and answer[0].response == 0
    finally:
        release.set()
        peer.close()
        a.stop()
