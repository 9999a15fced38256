"""The real server driven by libiscsi's command-line tools (iscsi-ls, iscsi-inq,
iscsi-readcapacity16, iscsi-perf): what a user would check first."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import INITIATOR, RunningTarget, run_tool, start_target

pytestmark = pytest.mark.interop

DEMO = "iqn.2026-11.org.iscsi-vmtarget:demo"


def run(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_tool(*args, timeout=timeout, check=check)


def test_iscsi_ls_lists_demo_target_and_lun(demo_target: RunningTarget) -> None:
    out = run("iscsi-ls", "-i", INITIATOR, "-s", f"iscsi://{demo_target.portal}").stdout
    assert f"Target:{DEMO} Portal:127.0.0.1:{demo_target.port},1" in out
    m = re.search(r"Lun:0\s+Type:DIRECT_ACCESS \(Size:(\S+)\)", out)
    assert m, out
    # libiscsi 1.19's iscsi-ls multiplies the last LBA (not LBA + 1) by the block size.
    assert m.group(1) in ("1023M", "1024M", "1G"), out


def test_iscsi_inq_standard(demo_target: RunningTarget) -> None:
    out = run("iscsi-inq", "-i", INITIATOR, demo_target.url(DEMO)).stdout
    assert "Peripheral Qualifier:CONNECTED" in out, out
    assert "Peripheral Device Type:DIRECT_ACCESS" in out
    assert "Version:6" in out  # SPC-4
    assert "HiSup:1" in out and "CmdQue:1" in out and "Removable:0" in out
    assert "Vendor:ISCSIVMT" in out
    assert "Product:VIRTUAL-DISK" in out
    assert "0460 SPC-4" in out and "04c0 SBC-3" in out


def _vpd(target: RunningTarget, page: int) -> str:
    return run("iscsi-inq", "-i", INITIATOR, "-e", "1", "-c", str(page), target.url(DEMO)).stdout


def test_iscsi_inq_vpd_pages(demo_target: RunningTarget) -> None:
    supported = _vpd(demo_target, 0x00)
    pages = re.findall(r"Page:(0x[0-9a-f]{2})", supported)
    # SPC-4 §7.8.17: every page we serve, in ascending order.
    assert pages == sorted(pages), supported
    assert {"0x00", "0x80", "0x83", "0xb0", "0xb1", "0xb2"} <= set(pages), supported
    serial = _vpd(demo_target, 0x80)
    m = re.search(r"Unit Serial Number:\[(\S+)\]", serial)
    assert m and len(m.group(1)) >= 8, serial
    ident = _vpd(demo_target, 0x83)
    # iscsi-inq prints the binary designator with %s (up to a NUL byte); its first byte
    # is never NUL: NAA 6 (IEEE Registered Extended, 16 bytes) puts 6 in the high nibble.
    naa = ident.partition("Designator Type:(3) NAA\nDesignator:[")[2]
    assert naa, ident
    assert ord(naa[0]) >> 4 == 6
    assert f"Designator:[{DEMO},t,0x0001]" in ident  # target port name
    assert "Designator Type:(4) RELATIVE_TARGET_PORT" in ident
    assert "Designator Type:(1) T10_VENDORT_ID" in ident and "Designator:[ISCSIVMT" in ident
    limits = _vpd(demo_target, 0xB0)
    assert re.search(r"maximum transfer length:\s*[1-9]\d*", limits), limits
    assert "Medium Rotation Rate:1RPM" in _vpd(demo_target, 0xB1)  # 1 = non-rotating
    # The identity is stable across a restart of the target on the same state.
    demo_target.stop()
    again = start_target(
        demo_target.log_path.parent / "again",
        "--state-dir",
        str(demo_target.log_path.parent / "state"),
    )
    try:
        assert _vpd(again, 0x83) == ident
        assert _vpd(again, 0x80) == serial
    finally:
        again.stop()


def test_readcapacity16_exact_size(demo_target: RunningTarget) -> None:
    out = run("iscsi-readcapacity16", "-i", INITIATOR, demo_target.url(DEMO)).stdout
    assert "LOGICAL BLOCK LENGTH IN BYTES:512" in out, out
    assert "RETURNED LOGICAL BLOCK ADDRESS:2097151" in out
    assert "Total size:1073741824" in out


def test_unknown_target_is_refused(demo_target: RunningTarget) -> None:
    proc = run(
        "iscsi-inq", "-i", INITIATOR, demo_target.url(DEMO + "-nope"), check=False, timeout=30
    )
    assert proc.returncode != 0


def test_two_initiators_at_once(demo_target: RunningTarget) -> None:
    procs = [
        subprocess.Popen(
            [
                "iscsi-perf",
                "-i",
                f"{INITIATOR}-{n}",
                "-t",
                "3",
                "-m",
                "8",
                "-r",
                demo_target.url(DEMO),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for n in range(2)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0, out
        assert re.search(r"iops average \d+", out), out


def test_header_digest_crc32c(tmp_path: Path) -> None:
    """libiscsi offers HeaderDigest=None,CRC32C; a target that requires CRC32C gets it."""
    conf = tmp_path / "t.toml"
    conf.write_text(
        f"""
[negotiation]
header_digests = ["CRC32C"]
[[target]]
name = "{DEMO}"
[[target.lun]]
number = 0
path = "{tmp_path / "lun0.img"}"
size = "16M"
"""
    )
    t = start_target(tmp_path / "run", "--config", str(conf))
    try:
        out = run("iscsi-readcapacity16", "-i", INITIATOR, t.url(DEMO)).stdout
        assert "Total size:16777216" in out
        run("iscsi-perf", "-i", INITIATOR, "-t", "2", t.url(DEMO))
        assert "HeaderDigest=CRC32C" in t.log()
    finally:
        t.stop()


def test_chap_right_and_wrong_secret(tmp_path: Path) -> None:
    lun = tmp_path / "lun0.img"
    conf = tmp_path / "t.toml"
    conf.write_text(
        f"""
[[target]]
name = "iqn.2026-11.org.iscsi-vmtarget:chap"
[target.chap]
user = "host1"
secret = "host1-secret-123"
[[target.lun]]
number = 0
path = "{lun}"
size = "16M"
"""
    )
    t = start_target(tmp_path / "run", "--config", str(conf))
    try:
        iqn = "iqn.2026-11.org.iscsi-vmtarget:chap"
        good = f"iscsi://host1%host1-secret-123@{t.portal}/{iqn}/0"
        out = run("iscsi-readcapacity16", "-i", INITIATOR, good).stdout
        assert "16777216" in out
        bad = f"iscsi://host1%wrong-secret-0000@{t.portal}/{iqn}/0"
        assert run("iscsi-readcapacity16", "-i", INITIATOR, bad, check=False).returncode != 0
        none = f"iscsi://{t.portal}/{iqn}/0"
        assert run("iscsi-readcapacity16", "-i", INITIATOR, none, check=False).returncode != 0
    finally:
        t.stop()
