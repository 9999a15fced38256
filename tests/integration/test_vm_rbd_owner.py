"""VM units of one rbd pool seen by two daemons (own state directories, own ports):
only the holder of a unit's lease - RBD's exclusive lock on its lease image - serves
(writes) the VM; the other waits, and takes over once the owner is gone, fencing it
first (OSD blocklist): a paused owner that wakes up cannot write. A reservation taken
through the first owner holds on the second (it is kept in RADOS beside the unit)."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

from iscsi_vmtarget.client.initiator import Initiator, InitiatorError, LoginFailed
from iscsi_vmtarget.server.vm_luns import DEFAULT_BASE_IQN
from iscsi_vmtarget.storage.rbd import OP_TIMEOUT, RbdPoolSpec, list_images
from iscsi_vmtarget.testing.ceph import CephCluster
from iscsi_vmtarget.vm import Mode, StateDir, VmManager
from tests.conftest import CLIENTS, INITIATOR, RunningTarget, grant_vms, start_target
from tests.integration.test_rbd_gateways import BLOCK, read, wait_for, write
from tests.integration.test_rbd_pr_gateways import (
    APTPL,
    CONFLICT,
    REGISTER,
    RESERVE,
    prout,
    read_keys,
)
from tests.integration.test_vm_serve import ivt

pytestmark = [pytest.mark.interop, pytest.mark.slow]

MIB = 1 << 20
IQN = f"{DEFAULT_BASE_IQN}:vm.web"


def serving(t: RunningTarget) -> Initiator | None:
    """A session to the VM's target on ``t``, or None while ``t`` does not serve it."""
    ini = Initiator(port=t.port, initiator_name=INITIATOR, target_name=IQN)
    try:
        ini.login()
    except (LoginFailed, OSError):
        ini.close()
        return None
    return ini


def test_one_owner_per_vm_and_fenced_takeover(ceph_cluster: CephCluster, tmp_path: Path) -> None:
    namespace = f"{ceph_cluster.pool}/own{uuid.uuid4().hex[:10]}"
    ceph_cluster.rbd("namespace", "create", namespace)
    a_state, b_state = tmp_path / "a", tmp_path / "b"
    ivt(a_state, "pool", "create", "ceph", "--rbd", namespace, "--ceph-conf", ceph_cluster.conf)
    with VmManager(StateDir.at(str(a_state))) as manager:
        manager.create("web", disk=8 * MIB, memory=4 * MIB, mode=Mode.OFFSET, pool="ceph")
    with VmManager(StateDir.at(str(b_state))) as manager:
        manager.catalog.create_rbd("ceph", namespace, ceph_cluster.conf)
        assert [v.name for v in manager.discover().vms] == ["web"]
    grant_vms(a_state)
    grant_vms(b_state)
    lease = ("--lease-seconds", "1")  # the waiting gateway retries every 0.25 s
    a = start_target(tmp_path / "run-a", "--state-dir", str(a_state), *lease)
    b = start_target(tmp_path / "run-b", "--state-dir", str(b_state), *lease)
    try:
        ia = serving(a)
        assert ia is not None
        # a reservation taken on A (APTPL) lives in RADOS beside the unit: B enforces it
        ia.command(bytes(6))  # the power-on unit attention
        assert prout(ia, REGISTER, sark=0xA, flags=APTPL) == 0
        assert prout(ia, RESERVE, key=0xA) == 0
        assert serving(b) is None  # B waits: no target, nothing written
        assert "is leased by the RBD client" in b.log()
        refused = ivt(b_state, "vm", "resize", "web", "--disk", str(16 * MIB), check=False)
        assert refused.returncode == 1 and "leased by the RBD client" in refused.stderr
        first = b"A" * 4 * BLOCK
        assert write(ia, 0, first) == (0, (0, 0, 0))

        os.kill(a.proc.pid, signal.SIGSTOP)
        try:
            ib: list[Initiator | None] = [None]
            wait_for("B serving", lambda: (ib.__setitem__(0, serving(b)), ib[0])[1] is not None)
            assert ib[0] is not None
            assert read(ib[0], 0, 4) == first
            second = b"b" * 4 * BLOCK
            assert write(ib[0], 0, second) == (0, (0, 0, 0))  # the holder, as on A
            other = Initiator(port=b.port, initiator_name=CLIENTS[1], target_name=IQN)
            other.login()
            assert write(other, 8, b"o" * BLOCK)[0] == CONFLICT
            assert read_keys(other) == [0xA]
            other.close()
        finally:
            os.kill(a.proc.pid, signal.SIGCONT)
        # a fenced client's write may wait until the cluster refuses it (the gateways'
        # rados_osd_op_timeout), longer than the initiator's default patience
        assert ia.sock is not None
        ia.sock.settimeout(OP_TIMEOUT + 15)
        try:  # fenced: the write is refused, or A dropped the VM's sessions first
            assert write(ia, 0, b"X" * 4 * BLOCK)[0] != 0
        except InitiatorError:
            pass
        wait_for("A lets the VM go", lambda: "lease lost" in a.log())
        assert read(ib[0], 0, 4) == second
        assert "fencing" in b.log()
    finally:
        a.stop()
        b.stop()
    where = RbdPoolSpec.parse(namespace, conf=ceph_cluster.conf)
    assert any(n.endswith(".lease") for n in list_images(where))
    ivt(b_state, "vm", "delete", "web")
    assert list_images(where) == []  # the unit went, and its lease image with it
    objects = subprocess.run(
        ["rados", "-c", ceph_cluster.conf, "-p", where.pool, "-N", where.namespace, "ls"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "iscsi_vmtarget.pr." not in objects  # and its reservations
