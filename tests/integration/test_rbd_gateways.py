"""Two gateways (``serve`` processes, own state directories and ports) serving one RBD
LUN under one target name: the owner of the image's exclusive lock is active/optimized,
the other standby (ALUA, SPC-4 §5.15) and writes nothing; a standby takes over when
the owner is gone - fenced first (OSD blocklist), so a paused owner that wakes up
cannot write - and a killed owner's data is served by the other."""

from __future__ import annotations

import os
import signal
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from iscsi_vmtarget.client.initiator import Initiator
from iscsi_vmtarget.storage.rbd import RbdImageSpec, open_image
from iscsi_vmtarget.testing.ceph import CephCluster, gateway_config
from tests.conftest import INITIATOR, RunningTarget, run_tool, start_with_config
from tests.integration.test_admin import login

pytestmark = [pytest.mark.interop, pytest.mark.slow]

IQN = "iqn.2026-11.org.iscsi-vmtarget.test:gw"
BLOCK = 512
STANDBY = (0x2, 0x04, 0x0B)  # NOT READY, TARGET PORT IN STANDBY STATE
#: the cluster's osd client watch timeout (5 s) plus the gateways' polling, with room
TAKEOVER_SECONDS = 30


def gateway(
    tmp: Path,
    name: str,
    tpgt: int,
    image: RbdImageSpec,
    conf: str,
    *extra: str,
    non_owner: str = "standby",
) -> RunningTarget:
    """Gateway NAME serving IMAGE as LUN 0 of IQN, target port group TPGT, the others
    ``non_owner`` (the LUN's ``alua_non_owner``); EXTRA: more ``serve`` arguments (e.g.
    a ``--portal`` to come back on)."""
    config = gateway_config(IQN, tpgt, image, conf, non_owner)
    return start_with_config(tmp / name, config, *extra)


def write(ini: Initiator, lba: int, data: bytes) -> tuple[int, tuple[int, int, int]]:
    """WRITE(10) with FUA; (status, sense triplet), unit attentions retried."""
    cdb = struct.pack(">BBIBHB", 0x2A, 0x08, lba, 0, len(data) // BLOCK, 0)
    return _run(ini, cdb, data_out=data)


def read(ini: Initiator, lba: int, blocks: int) -> bytes:
    return ini.scsi(
        "READ(10)", struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0), read_length=blocks * BLOCK
    )


def _run(ini: Initiator, cdb: bytes, **kw: object) -> tuple[int, tuple[int, int, int]]:
    for _ in range(4):
        r = ini.command(cdb, **kw)  # type: ignore[arg-type]
        triplet = (r.sense_key, *r.asc_ascq) if r.status else (0, 0, 0)
        if triplet[0] != 0x6:  # unit attention: retry
            return r.status, triplet  # type: ignore[return-value]
    return r.status, triplet  # type: ignore[return-value]


def groups(ini: Initiator) -> dict[int, int]:
    """REPORT TARGET PORT GROUPS: {group: asymmetric access state}."""
    data = ini.scsi("RTPG", struct.pack(">BBIIBB", 0xA3, 0x0A, 0, 1024, 0, 0), read_length=1024)
    return {
        struct.unpack(">H", data[at + 2 : at + 4])[0]: data[at] & 0x0F
        for at in range(4, 4 + struct.unpack(">I", data[:4])[0], 12)
    }


def wait_for(what: str, predicate: object, timeout: float = TAKEOVER_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture
def image(ceph_cluster: CephCluster) -> Iterator[RbdImageSpec]:
    yield ceph_cluster.image(8 << 20, prefix="gw")


def test_owner_active_standby_refuses_and_takeover_fences_a_paused_owner(
    ceph_cluster: CephCluster, image: RbdImageSpec, tmp_path: Path
) -> None:
    a = gateway(tmp_path, "a", 1, image, ceph_cluster.conf)
    b = gateway(tmp_path, "b", 2, image, ceph_cluster.conf)
    c: RunningTarget | None = None
    try:
        ia, ib = login(a, INITIATOR, IQN), login(b, INITIATOR, IQN)
        inq = ib.scsi("INQUIRY", bytes([0x12, 0, 0, 0, 96, 0]), read_length=96)
        assert inq[5] & 0x30 == 0x10  # TPGS: implicit ALUA
        assert groups(ia) == {1: 0x0}  # the owner: active/optimized
        assert groups(ib) == {1: 0x0, 2: 0x2}  # the other: standby, the owner listed
        # libiscsi's tools log in with TEST UNIT READY, which a standby refuses (as
        # SPC-4 §5.15.2.4.4 says): they read the owner's VPD 0x83
        out = run_tool("iscsi-inq", "-i", INITIATOR, "-e", "1", "-c", "131", a.url(IQN)).stdout
        assert "Designator Type:(5) TARGET_PORT_GROUP" in out, out

        first = b"A" * 4 * BLOCK
        assert write(ia, 0, first) == (0, (0, 0, 0))
        assert write(ib, 8, b"B" * BLOCK) == (2, STANDBY)  # CHECK CONDITION, nothing written
        assert (
            _run(ib, struct.pack(">BBIBHB", 0x28, 0, 0, 0, 1, 0), read_length=BLOCK)[1] == STANDBY
        )

        # pause the owner: its watch expires, B fences it and takes the image
        os.kill(a.proc.pid, signal.SIGSTOP)
        try:
            wait_for("B active", lambda: groups(ib).get(2) == 0x0)
            assert read(ib, 0, 4) == first
            second = b"b" * 4 * BLOCK
            assert write(ib, 0, second) == (0, (0, 0, 0))
        finally:
            os.kill(a.proc.pid, signal.SIGCONT)
        # the woken owner is fenced: its writes fail, the data stays B's (the write
        # fails at the blocklist, or A's once-a-second lock check turned it standby first)
        status, sense = write(ia, 0, b"X" * 4 * BLOCK)
        assert status == 2 and sense in ((0x3, 0x0C, 0x00), STANDBY)  # WRITE ERROR or standby
        wait_for("A standby", lambda: groups(ia).get(1) == 0x2)  # it noticed, too
        assert b"fencing" in Path(str(b.log_path)).read_bytes()
        direct = open_image(image, None, read_only=True)
        try:
            assert bytes(direct.read(0, 4 * BLOCK)) == second
        finally:
            direct.close()
        ia.close()
        a.stop()

        # a restarted gateway comes back standby; kill -9 the owner: it takes over
        c = gateway(tmp_path, "c", 1, image, ceph_cluster.conf)
        ic = login(c, INITIATOR, IQN)
        assert groups(ic) == {1: 0x2, 2: 0x0}
        b.proc.kill()
        b.proc.wait()
        wait_for("C active", lambda: groups(ic).get(1) == 0x0)
        assert read(ic, 0, 4) == second
        assert write(ic, 4, b"c" * BLOCK) == (0, (0, 0, 0))
        ic.close()
    finally:
        for t in (a, b, c):
            if t is not None:
                t.stop()


def test_a_cleanly_stopped_owner_hands_over_before_its_watch_would_expire(
    ceph_cluster: CephCluster, image: RbdImageSpec, tmp_path: Path
) -> None:
    """Standby mode: an owner that stops cleanly (SIGTERM) gives its lock up and
    unwatches its image, so the standby owns it within a few seconds, well inside the
    test cluster's 5 s watch timeout, fencing nobody."""
    a = gateway(tmp_path, "a", 1, image, ceph_cluster.conf)
    b = gateway(tmp_path, "b", 2, image, ceph_cluster.conf)
    try:
        ia, ib = login(a, INITIATOR, IQN), login(b, INITIATOR, IQN)
        assert groups(ib) == {2: 0x2, 1: 0x0}
        assert write(ia, 0, b"a" * BLOCK) == (0, (0, 0, 0))
        ia.close()
        a.stop()
        # inside the 5 s watch timeout (a loaded CI core can take 3 s); the log check
        # below tells a handover from an expired watch and a takeover
        wait_for("B active/optimized", lambda: groups(ib).get(2) == 0x0, timeout=4.5)
        assert write(ib, 1, b"b" * BLOCK) == (0, (0, 0, 0))
        assert read(ib, 0, 2) == b"a" * BLOCK + b"b" * BLOCK
        assert b"fencing" not in Path(str(b.log_path)).read_bytes()
        ib.close()
    finally:
        a.stop()
        b.stop()
