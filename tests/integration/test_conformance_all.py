"""The whole of libiscsi's conformance suite (``iscsi-test-cu --dataloss
--allow-sanitize``, family ALL) through ``tools/conformance`` against a thin and a
thick file LUN (and a read-only one for the ReadOnly family): no test may fail, and
only the skips README.rst explains may happen. Plus the one thing the suite cannot
see: APTPL persistent reservations surviving a restart of the target."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from iscsi_vmtarget.client import Initiator
from iscsi_vmtarget.storage.rbd import RbdImageSpec
from iscsi_vmtarget.testing.ceph import shared_reservations
from tests.conftest import RunningTarget, need_tool, start_target

pytestmark = pytest.mark.interop

ROOT = Path(__file__).resolve().parents[2]

#: Why a test may skip, by the message libiscsi prints (README.rst, "Conformance").
ALLOWED_SKIPS = {
    "not removable": "a disk image is not removable medium (RMB=0)",
    "Media is not removable": "a disk image is not removable medium (RMB=0)",
    "CRYPTO_ERASE": "CRYPTO ERASE needs an encrypted unit",
    "LBPPB < 2": "one logical block per physical block is reported (libiscsi bug, README)",
}
#: At least this many tests pass (of 230): everything but the skips above.
MINIMUM_PASSES = {"thin": 212, "thick": 212}


@pytest.mark.timeout(1200)
def test_whole_suite_on_thin_and_thick_luns(tmp_path: Path) -> None:
    need_tool("iscsi-test-cu")
    report = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "conformance"), "--json", str(report)],
        capture_output=True,
        text=True,
        timeout=1100,
        cwd=ROOT,
    )
    assert report.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    families = json.loads(report.read_text())
    failures = [
        f"{fam['lun']} {fam['family']}.{test['name']}: {test['detail']}"
        for fam in families
        for test in fam["tests"]
        if test["outcome"] == "fail"
    ] + [f"{fam['lun']} {fam['family']}: {fam['error']}" for fam in families if fam["error"]]
    assert not failures, "\n".join(failures) + "\n" + proc.stdout[-4000:]
    assert proc.returncode == 0, proc.stdout[-4000:]
    unexplained = [
        f"{fam['lun']} {fam['family']}.{test['name']}: {test['detail']}"
        for fam in families
        for test in fam["tests"]
        if test["outcome"] == "skip" and not any(k in test["detail"] for k in ALLOWED_SKIPS)
    ]
    assert not unexplained, "\n".join(unexplained)
    for lun, minimum in MINIMUM_PASSES.items():
        passed = sum(
            1
            for fam in families
            if fam["lun"] == lun
            for test in fam["tests"]
            if test["outcome"] == "pass"
        )
        total = sum(len(fam["tests"]) for fam in families if fam["lun"] == lun)
        assert total == 230
        assert passed >= minimum, f"{lun}: {passed} passed"


# -- APTPL across a restart ----------------------------------------------------------------------

IQN = "iqn.2026-11.org.iscsi-vmtarget:aptpl"
HOST_A = "iqn.2026-11.org.iscsi-vmtarget.test:host-a"
HOST_B = "iqn.2026-11.org.iscsi-vmtarget.test:host-b"
CONFIG = """
[[target]]
name = "{iqn}"
[[target.lun]]
number = 0
{backing}
size = "4M"
"""


def _session(target: RunningTarget, initiator: str, isid: str) -> Initiator:
    ini = Initiator(
        port=target.port, initiator_name=initiator, target_name=IQN, isid=bytes.fromhex(isid)
    )
    ini.connect()
    ini.login()
    ini.command(bytes(6))  # the power-on unit attention
    return ini


def _prout(ini: Initiator, action: int, key: int, sark: int, kind: int, aptpl: bool) -> int:
    data = struct.pack(">QQIBBH", key, sark, 0, 0x01 if aptpl else 0, 0, 0)
    cdb = struct.pack(">BBBHIB", 0x5F, action, kind, 0, len(data), 0)
    return ini.command(cdb, data_out=data).status


def _read_reservation(ini: Initiator) -> tuple[int, int] | None:
    result = ini.command(struct.pack(">BB5sHB", 0x5E, 0x01, b"", 64, 0), read_length=64)
    assert result.status == 0
    if int.from_bytes(result.data[4:8], "big") == 0:
        return None
    return int.from_bytes(result.data[8:16], "big"), result.data[21] & 0x0F


@pytest.mark.parametrize("kind", ["file", "rbd"])
def test_aptpl_reservation_survives_a_restart(
    tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    """SPC-4 §5.13.5: registered with APTPL=1, the registrations and the reservation
    are back after the target restarts; another initiator still conflicts. On a file
    LUN the state is kept in <file>.pr, on an RBD LUN in the RADOS object every
    gateway of the image shares (storage/rbd_pr.py)."""
    if kind == "rbd":
        cluster = request.getfixturevalue("ceph_cluster")
        image = RbdImageSpec(cluster.pool, f"aptpl-{tmp_path.name}")
        backing = f'rbd = "{image}"\nceph_conf = "{cluster.conf}"'

        def saved() -> bool:
            return bool(shared_reservations(image).get("aptpl"))
    else:
        path = tmp_path / "aptpl.img"
        backing = f'path = "{path}"'

        def saved() -> bool:
            return Path(f"{path}.pr").exists()

    conf = tmp_path / "aptpl.toml"
    conf.write_text(CONFIG.format(iqn=IQN, backing=backing))
    first = start_target(tmp_path / "run1", "--config", str(conf))
    try:
        a = _session(first, HOST_A, "400000000001")
        assert _prout(a, 0x00, 0, 0xA11CE, 0, aptpl=True) == 0  # REGISTER, APTPL
        assert _prout(a, 0x01, 0xA11CE, 0, 0x1, aptpl=False) == 0  # RESERVE, WRITE EXCLUSIVE
        a.close()
    finally:
        first.stop()
    assert saved()

    second = start_target(tmp_path / "run2", "--config", str(conf))
    try:
        b = _session(second, HOST_B, "400000000002")
        assert _read_reservation(b) == (0xA11CE, 0x1)
        write = b.command(bytes.fromhex("2a 00 00000000 00 0001 00"), data_out=bytes(512))
        assert write.status == 0x18  # RESERVATION CONFLICT
        a = _session(second, HOST_A, "400000000001")  # the same initiator port as before
        write = a.command(bytes.fromhex("2a 00 00000000 00 0001 00"), data_out=bytes(512))
        assert write.status == 0
        assert _prout(a, 0x00, 0xA11CE, 0, 0, aptpl=False) == 0  # unregister, APTPL off
        assert _read_reservation(b) is None
        assert not saved()
    finally:
        second.stop()
