"""libiscsi's conformance suite (iscsi-test-cu --dataloss) against the real server,
for the command families the target core implements."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.conftest import RunningTarget, need_tool

pytestmark = pytest.mark.interop

DEMO = "iqn.2026-11.org.iscsi-vmtarget:demo"

FAMILIES = [
    "Inquiry",
    "ReadCapacity10",
    "ReadCapacity16",
    "Read6",
    "Read10",
    "Read12",
    "Read16",
    "Write10",
    "Write12",
    "Write16",
    "WriteVerify10",
    "WriteVerify12",
    "WriteVerify16",
    "Verify10",
    "Verify12",
    "Verify16",
    "TestUnitReady",
    "ModeSense6",
    "StartStopUnit",
    "Prefetch10",
    "Prefetch16",
    "iSCSIcmdsn",
    "iSCSIdatasn",
    "iSCSITMF",
    "iSCSIResiduals",
]

_SUMMARY = re.compile(r"^\s*tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", re.MULTILINE)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_passes(demo_target: RunningTarget, family: str) -> None:
    run_family(demo_target.url(DEMO), family)


def run_family(url: str, family: str) -> None:
    """``iscsi-test-cu --dataloss`` family ``ALL.<family>`` on ``url``: it must run
    tests, and every one must pass."""
    need_tool("iscsi-test-cu")
    proc = subprocess.run(
        ["iscsi-test-cu", "--dataloss", "-n", "-t", f"ALL.{family}", url],
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = proc.stdout + proc.stderr
    m = _SUMMARY.search(out)
    assert m, f"no CUnit summary:\n{out[-4000:]}"
    _total, ran, passed, failed, _inactive = map(int, m.groups())
    failures = [line for line in out.splitlines() if "FAIL" in line or "[FAILED]" in line]
    assert ran > 0, out[-4000:]
    assert failed == 0, "\n".join(failures[:40]) + "\n" + out[-3000:]
    assert passed == ran
