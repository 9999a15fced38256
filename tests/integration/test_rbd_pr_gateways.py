"""Persistent reservations shared by two gateways of one RBD LUN (storage/rbd_pr.py):
made through one gateway, enforced on the other; PREEMPT AND ABORT across them; APTPL
state back after both gateways restart (and non-APTPL state gone); libiscsi's Prin*
and Prout* families through the owner while the standby watches.

Gateway B (target port group 2) starts first and owns the image (active/optimized);
A is standby, which runs PERSISTENT RESERVE IN/OUT (SPC-4 §5.15.2.4.4) but no media
access, so data commands go through B."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from iscsi_vmtarget.client.initiator import Initiator
from iscsi_vmtarget.storage.rbd import RbdImageSpec
from iscsi_vmtarget.testing.ceph import CephCluster, shared_reservations
from tests.conftest import RunningTarget, need_tool, run_tool
from tests.integration.test_rbd_gateways import IQN, gateway, groups
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


def libiscsi_reservation_families(
    owner: RunningTarget, standby: RunningTarget, image: RbdImageSpec
) -> None:
    """libiscsi's Prin*/Prout* families through the owner, every change going through
    the shared object and announced to the standby. Its second session cannot be put
    on the standby: libiscsi logs in with TEST UNIT READY, which a standby port refuses
    (NOT READY, SPC-4 §5.15.2.4.4), and the Access tests read and write through both
    sessions."""
    need_tool("iscsi-test-cu")
    done = run_tool("iscsi-test-cu", "--dataloss", "-t", FAMILIES, owner.url(IQN), check=False)
    counts = re.search(r"tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", done.stdout)
    assert counts is not None and done.returncode == 0, done.stdout[-4000:]
    total, ran, passed, failed = map(int, counts.groups())
    assert total == ran == passed == 20 and failed == 0, done.stdout[-4000:]
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
