"""The real server driven by libiscsi's command-line tools (iscsi-ls, iscsi-inq,
iscsi-readcapacity16, iscsi-perf): what a user would check first."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import INITIATOR, RunningTarget, need_tool, start_target

pytestmark = pytest.mark.interop

DEMO = "iqn.2026-11.org.iscsi-vmtarget:demo"


def run(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    need_tool(args[0])
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\n"
            f"stderr:\n{proc.stderr}"
        )
    return proc


def test_iscsi_ls_lists_demo_target_and_lun(demo_target: RunningTarget) -> None:
    out = run("iscsi-ls", "-i", INITIATOR, "-s", f"iscsi://{demo_target.portal}").stdout
    assert f"Target:{DEMO} Portal:127.0.0.1:{demo_target.port},1" in out
    m = re.search(r"Lun:0\s+Type:DIRECT_ACCESS \(Size:(\S+)\)", out)
    assert m, out
    assert m.group(1) in ("1G", "1024M", "1073741824")


def test_iscsi_inq_standard(demo_target: RunningTarget) -> None:
    out = run("iscsi-inq", "-i", INITIATOR, demo_target.url(DEMO)).stdout
    assert "Peripheral Qualifier:Connected" in out, out
    assert "Peripheral Device Type:DIRECT_ACCESS" in out
    assert re.search(r"Version:\s*6\b|SPC-4", out), out
    assert "Vendor:ISCSIVMT" in out
    assert "Product:VIRTUAL-DISK" in out


def _vpd(target: RunningTarget, page: int) -> str:
    return run("iscsi-inq", "-i", INITIATOR, "-e", "1", "-c", str(page), target.url(DEMO)).stdout


def test_iscsi_inq_vpd_pages(demo_target: RunningTarget) -> None:
    supported = _vpd(demo_target, 0x00)
    for page in ("0x00", "0x80", "0x83", "0xb0"):
        assert page in supported.lower(), supported
    serial = _vpd(demo_target, 0x80)
    m = re.search(r"Unit Serial Number:\s*\[?(\S+?)\]?\s*$", serial, re.MULTILINE)
    assert m and len(m.group(1)) >= 8, serial
    ident = _vpd(demo_target, 0x83)
    assert "NAA" in ident, ident
    assert re.search(r"0x6[0-9a-f]{31}", ident.lower()), ident  # a 16-byte NAA type 6
    assert "Target Port" in ident or "SCSI_NAME" in ident.upper(), ident
    limits = _vpd(demo_target, 0xB0)
    assert re.search(r"Maximum Transfer Length:\s*\d+", limits, re.I), limits
    # The designator is stable across restarts of the same LUN.
    assert _vpd(demo_target, 0x83) == ident


def test_readcapacity16_exact_size(demo_target: RunningTarget) -> None:
    out = run("iscsi-readcapacity16", "-i", INITIATOR, demo_target.url(DEMO)).stdout
    assert re.search(r"Logical block length:\s*512\b", out, re.I), out
    assert re.search(r"Total size:\s*1073741824\b", out, re.I), out


def test_unknown_target_is_refused(demo_target: RunningTarget) -> None:
    proc = run(
        "iscsi-inq", "-i", INITIATOR, demo_target.url(DEMO + "-nope"), check=False, timeout=30
    )
    assert proc.returncode != 0


def test_two_initiators_at_once(demo_target: RunningTarget) -> None:
    procs = [
        subprocess.Popen(
            ["iscsi-perf", "-i", f"{INITIATOR}-{n}", "-t", "3", "-m", "8", "-r",
             demo_target.url(DEMO)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for n in range(2)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0, out
        assert re.search(r"IOPS", out), out


def test_header_digest_crc32c(demo_target: RunningTarget) -> None:
    url = demo_target.url(DEMO) + "?header_digest=crc32c"
    out = run("iscsi-readcapacity16", "-i", INITIATOR, url).stdout
    assert "1073741824" in out
    assert "HeaderDigest=CRC32C" in demo_target.log()


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
