"""A plain LUN on a Ceph RBD image (``rbd = "POOL/IMAGE"`` in the config, ``lun map
--rbd``), served to real clients against a real cluster (tests/conftest.py
``ceph_cluster``): what they write lands in the image, plain READs and WRITEs are
started from the fast lane (an abort of one in flight included), and libiscsi's
conformance families for the data path pass on it."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from iscsi_vmtarget.client.initiator import Initiator, cdb16
from iscsi_vmtarget.client.window import read_window, write_window
from iscsi_vmtarget.iscsi import pdu as P
from iscsi_vmtarget.storage.rbd import RbdBackend, RbdImageSpec
from iscsi_vmtarget.testing.ceph import CephCluster
from tests.conftest import INITIATOR, RunningTarget, lun_counters, run_tool, start_with_config
from tests.integration.test_admin import cli, login, serve
from tests.integration.test_conformance import run_family
from tests.integration.test_qemu_img import qemu_img
from tests.integration.test_vm_serve import ivt

pytestmark = pytest.mark.interop

IQN = "iqn.2026-11.org.iscsi-vmtarget.test:rbd"
SIZE = 8 << 20
CONFIG = """
[[target]]
name = "{iqn}"
allow_all = true
[[target.lun]]
number = 0
rbd = "{image}"
ceph_conf = "{conf}"
size = "8M"
"""


@pytest.fixture(scope="module")
def rbd_target(
    ceph_cluster: CephCluster, tmp_path_factory: pytest.TempPathFactory
) -> RunningTarget:
    """One target for the module: LUN 0 on a new 8 MiB image the target creates."""
    image = f"{ceph_cluster.pool}/lun-{tmp_path_factory.getbasetemp().name}"
    config = CONFIG.format(iqn=IQN, image=image, conf=ceph_cluster.conf)
    workdir = tmp_path_factory.mktemp("rbd-target")
    target = start_with_config(workdir, config, "--metrics", "127.0.0.1:0")
    target.image = RbdImageSpec.parse(image, conf=ceph_cluster.conf)  # type: ignore[attr-defined]
    target.state = workdir / "run" / "state"  # type: ignore[attr-defined]
    yield target  # type: ignore[misc]
    target.stop()


def test_clients_see_the_image_and_write_into_it(
    rbd_target: RunningTarget, ceph_cluster: CephCluster, tmp_path: Path
) -> None:
    image: RbdImageSpec = rbd_target.image  # type: ignore[attr-defined]
    assert "size 8 MiB" in ceph_cluster.rbd("info", str(image))  # created thin
    out = run_tool("iscsi-ls", "-i", INITIATOR, "-s", f"iscsi://{rbd_target.portal}").stdout
    assert re.search(rf"Target:{IQN} .*\n\s*Lun:0\s+Type:DIRECT_ACCESS", out), out
    opts = f"driver=iscsi,transport=tcp,portal={rbd_target.portal},target={IQN},lun=0"
    assert f"virtual size: 8 MiB ({SIZE} bytes)" in qemu_img("info", "--image-opts", opts)
    pattern = tmp_path / "pattern.raw"
    blocks = [i.to_bytes(8, "little") * 512 for i in range(SIZE // (1 << 20))]
    pattern.write_bytes(b"".join(block * 256 for block in blocks))  # 1 MiB runs of 4 KiB
    # 16 requests in flight, completing out of order (-W): librbd aio writes at QD16
    qemu_img(
        "convert", "-n", "-m", "16", "-W", "-f", "raw", "--target-image-opts", str(pattern), opts
    )
    back = tmp_path / "back.raw"  # and read back through the target at QD16 (aio reads)
    qemu_img("convert", "-m", "16", "--image-opts", opts, "-O", "raw", str(back))
    assert back.read_bytes() == pattern.read_bytes()
    # the bytes are in the cluster: librbd reads them back, past the target
    direct = RbdBackend(image, read_only=True)
    try:
        got = hashlib.sha256(direct.read(0, SIZE)).hexdigest()
    finally:
        direct.close()
    assert got == hashlib.sha256(pattern.read_bytes()).hexdigest()


@contextlib.contextmanager
def osds_stopped(cluster: CephCluster) -> Iterator[None]:
    """The cluster's OSDs stopped (SIGSTOP) inside the block: a request sent to them
    stays in flight until it ends (SIGCONT; well within the op timeouts)."""
    pids = [int(f.read_text()) for f in (cluster.directory / "run").glob("osd.*.pid")]
    assert pids, "no OSD pid files"
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def test_reads_writes_and_an_abort_in_flight_take_the_fast_lane(
    rbd_target: RunningTarget, ceph_cluster: CephCluster
) -> None:
    """64 KiB WRITEs and READs, 16 in flight, started from the fast lane and verified
    in the image; a READ held in flight by a stopped OSD and aborted (ABORT TASK) gets
    no response, and the session goes on."""
    ini = Initiator(port=rbd_target.port, initiator_name=INITIATOR, target_name=IQN)
    ini.login()
    ini.command(bytes(6))  # the power-on unit attention
    before = lun_counters(rbd_target)
    lane = before["fast_lane_commands"]
    first, blocks = 8192, 128  # the image's second half, 64 KiB commands
    pieces = [os.urandom(blocks * 512) for _ in range(16)]
    ranges = [(first + n * blocks, blocks) for n in range(16)]
    at = [(first + n * blocks, data) for n, data in enumerate(pieces)]
    assert write_window(ini, 0, 512, at, 16) == 16 * blocks * 512
    assert list(read_window(ini, 0, 512, ranges, 16)) == pieces
    after = lun_counters(rbd_target)
    assert after["fast_lane_commands"] == lane + 32
    # adjacent commands sent together went to librbd merged (storage/rbd_aio.py)
    assert after["merged_writes"] > before["merged_writes"], after
    assert after["merged_reads"] > before["merged_reads"], after
    shown = ivt(rbd_target.state, "status").stdout  # type: ignore[attr-defined]
    merged = re.search(r"lun \S+/0: .* merged reads (\d+) writes (\d+)", shown)
    assert merged and int(merged[1]) >= after["merged_reads"], shown
    with osds_stopped(ceph_cluster):
        task = ini.start_command(cdb16(0x88, 0, first, 8), bytes(8), b"", 4096, None)
        ini.send_pdu(P.TaskMgmtRequest(
            itt=ini.next_itt(), function=1, lun=bytes(8), referenced_task_tag=task.itt,
            refcmdsn=(ini.cmdsn - 1) & 0xFFFFFFFF, cmdsn=ini.cmdsn, immediate=True,
            expstatsn=ini.expstatsn,
        ))  # fmt: skip
        answer = ini.recv_pdu()  # while the READ still waits for the OSD
        assert isinstance(answer, P.TaskMgmtResponse), answer
        assert answer.response == P.TmfResponse.COMPLETE
    # the next command's answer is the next PDU: nothing came for the aborted READ
    # (handle_pdu refuses a PDU for a task not in flight)
    assert ini.read16(first + blocks, blocks, 512) == pieces[1]
    deadline = time.monotonic() + 20
    while lun_counters(rbd_target)["fast_lane_commands"] < lane + 34:  # the aborted one too
        assert time.monotonic() < deadline, "the aborted READ never ended"
        time.sleep(0.05)
    assert ini.read16(first, blocks, 512) == pieces[0]  # its range free again
    ini.logout()
    direct = RbdBackend(rbd_target.image, read_only=True)  # type: ignore[attr-defined]
    try:
        assert direct.read(first * 512, 16 * blocks * 512) == b"".join(pieces)
    finally:
        direct.close()


@pytest.mark.parametrize("family", ["Read16", "Write16", "Unmap", "WriteSame16", "GetLBAStatus"])
def test_conformance_family_passes_on_rbd(rbd_target: RunningTarget, family: str) -> None:
    run_family(rbd_target.url(IQN), family)


def test_lun_map_rbd_on_a_running_daemon(
    ceph_cluster: CephCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``lun map --rbd`` live, and the LUN comes back after a restart; a bad spec and
    a missing image without --size are clear errors that change nothing."""
    state = tmp_path / "state"
    target = "iqn.2026-11.org.example:rbd-admin"
    image = f"{ceph_cluster.pool}/admin-{tmp_path.name}"
    assert cli(capsys, state, "target", "create", target)[0] == 0
    assert cli(capsys, state, "acl", "add", target, INITIATOR)[0] == 0
    running = serve(tmp_path, state)
    try:
        rc, out = cli(capsys, state, "lun", "map", target, "0", "--rbd", "rbd@x")
        assert rc == 1 and "is not POOL/IMAGE" in out, out
        rc, out = cli(
            capsys, state, "lun", "map", target, "0", "--rbd", image,
            "--ceph-conf", ceph_cluster.conf,
        )  # fmt: skip
        assert rc == 1 and "does not exist" in out, out
        rc, out = cli(
            capsys, state, "lun", "map", target, "0", "--rbd", image,
            "--ceph-conf", ceph_cluster.conf, "--size", "8M",
            "--alua-non-owner", "active-non-optimized",
        )  # fmt: skip
        assert rc == 0, out
        ini = login(running, INITIATOR, target)
        try:
            assert ini.read_capacity16() == ((8 << 20) // 512, 512)
            ini.write16(100, b"\xc3" * 4096, 512)
        finally:
            ini.close()
    finally:
        running.stop()
    again = serve(tmp_path / "again", state)
    try:
        assert again.targets[target] == {0: 8 << 20}
        ini = login(again, INITIATOR, target)
        try:
            assert ini.read16(100, 8, 512) == b"\xc3" * 4096
            # the LUN's alua_non_owner was kept: REPORT TARGET PORT GROUPS says AN_SUP
            rtpg = ini.scsi(
                "RTPG", bytes([0xA3, 0x0A, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0]), read_length=1024
            )
            assert rtpg[4] & 0x0F == 0x0 and rtpg[5] == 0x87
        finally:
            ini.close()
    finally:
        again.stop()
