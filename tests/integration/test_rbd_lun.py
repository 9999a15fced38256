"""A plain LUN on a Ceph RBD image (``rbd = "POOL/IMAGE"`` in the config, ``lun map
--rbd``), served to real clients against a real cluster (tests/conftest.py
``ceph_cluster``): what they write lands in the image, and libiscsi's conformance
families for the data path pass on it."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from iscsi_vmtarget.storage.rbd import RbdBackend, RbdImageSpec
from iscsi_vmtarget.testing.ceph import CephCluster
from tests.conftest import INITIATOR, RunningTarget, run_tool, start_with_config
from tests.integration.test_admin import cli, login, serve
from tests.integration.test_conformance import run_family
from tests.integration.test_qemu_img import qemu_img

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
    target = start_with_config(tmp_path_factory.mktemp("rbd-target"), config)
    target.image = RbdImageSpec.parse(image, conf=ceph_cluster.conf)  # type: ignore[attr-defined]
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
