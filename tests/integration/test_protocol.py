"""Protocol behaviour over real TCP with our own initiator: digests, Reject, session
reinstatement, login failures, isolation between sessions, CLI errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from iscsi_vmtarget.client import Initiator, InitiatorError, LoginFailed
from iscsi_vmtarget.iscsi import pdu as P
from tests.conftest import INITIATOR, RunningTarget, start_target

DEMO = "iqn.2026-11.org.iscsi-vmtarget:demo"


def session(t: RunningTarget, **kw: object) -> Initiator:
    ini = Initiator(port=t.port, initiator_name=INITIATOR, target_name=DEMO, **kw)  # type: ignore[arg-type]
    ini.login()
    # The first command of a new I_T nexus reports POWER ON OCCURRED (SAM-5 §5.14).
    tur = ini.command(bytes(6))
    assert tur.status == 0 or (tur.sense_key, tur.asc_ascq) == (6, (0x29, 0x00))
    return ini


def write10(lba: int, blocks: int, fua: bool = False) -> bytes:
    return (
        bytes([0x2A, 0x08 if fua else 0])
        + lba.to_bytes(4, "big")
        + b"\x00"
        + blocks.to_bytes(2, "big")
        + b"\x00"
    )


def read10(lba: int, blocks: int) -> bytes:
    return bytes([0x28, 0]) + lba.to_bytes(4, "big") + b"\x00" + blocks.to_bytes(2, "big") + b"\x00"


@pytest.mark.parametrize(
    "hd,dd,immediate,initial_r2t",
    [
        (False, False, True, False),
        (True, True, True, False),
        (True, True, False, True),
        (False, True, False, False),
    ],
)
def test_write_read_round_trip_with_digests_and_burst_settings(
    demo_target: RunningTarget, hd: bool, dd: bool, immediate: bool, initial_r2t: bool
) -> None:
    ini = session(
        demo_target,
        header_digest=hd,
        data_digest=dd,
        immediate_data=immediate,
        initial_r2t=initial_r2t,
        max_recv_data_segment_length=8192,
    )
    assert ini.params["HeaderDigest"] == ("CRC32C" if hd else "None")
    assert ini.params["DataDigest"] == ("CRC32C" if dd else "None")
    payload = os.urandom(3 << 20)  # 3 MiB: several R2Ts of MaxBurstLength
    blocks = len(payload) // 512
    rsp = ini.command(write10(2048, blocks, fua=True), data_out=payload)
    assert rsp.status == 0, rsp
    rsp = ini.command(read10(2048, blocks), read_length=len(payload))
    assert rsp.status == 0 and rsp.data == payload and rsp.residual == 0
    assert ini.logout() == 0
    lun_file = next((demo_target.log_path.parent / "state").rglob("demo-lun0.img"))
    with open(lun_file, "rb") as fh:
        fh.seek(2048 * 512)
        assert fh.read(len(payload)) == payload


def test_read_beyond_end_gets_lba_out_of_range(demo_target: RunningTarget) -> None:
    ini = session(demo_target)
    last = (1 << 30) // 512 - 1
    rsp = ini.command(read10(last, 2), read_length=1024)
    assert rsp.status == 2 and rsp.sense_key == 5 and rsp.asc_ascq == (0x21, 0x00)
    rsp = ini.command(read10(last, 1), read_length=512)
    assert rsp.status == 0 and len(rsp.data) == 512


def test_unknown_opcode_pdu_is_rejected_and_other_session_unaffected(
    demo_target: RunningTarget,
) -> None:
    victim = session(demo_target, isid=bytes.fromhex("400001370001"))
    attacker = session(demo_target, isid=bytes.fromhex("400001370002"))
    bogus = bytearray(P.NopOut(itt=9, immediate=True).encode_bhs())
    bogus[0] = 0x1D  # no such opcode
    attacker.send_raw(bytes(bogus))
    rej = attacker.recv_pdu()
    assert isinstance(rej, P.Reject) and rej.reason == P.RejectReason.COMMAND_NOT_SUPPORTED
    assert bytes(rej.data) == bytes(bogus)
    assert attacker.nop(b"still here") == b"still here"
    # A data segment longer than MaxRecvDataSegmentLength cannot be resynchronised:
    # only that connection is dropped.
    huge = P.NopOut(itt=10, immediate=True, data=bytes(1 << 20))
    with pytest.raises((InitiatorError, OSError)):
        attacker.send_pdu(huge)
        attacker.recv_pdu()
    assert victim.nop(b"fine") == b"fine"
    rsp = victim.command(read10(0, 1), read_length=512)
    assert rsp.status == 0


def test_session_reinstatement_closes_the_old_session(demo_target: RunningTarget) -> None:
    old = session(demo_target, isid=bytes.fromhex("400001370009"))
    assert old.nop(b"x") == b"x"
    new = session(demo_target, isid=bytes.fromhex("400001370009"))
    with pytest.raises((InitiatorError, OSError)):
        old.nop(b"x")
    assert new.nop(b"y") == b"y"
    assert "session reinstatement" in demo_target.log()


def test_login_to_unknown_target_gets_status_0203(demo_target: RunningTarget) -> None:
    ini = Initiator(port=demo_target.port, initiator_name=INITIATOR, target_name=DEMO + "x")
    with pytest.raises(LoginFailed) as info:
        ini.login()
    assert (info.value.status_class, info.value.status_detail) == (2, 3)


def test_discovery_lists_targets_and_portal(demo_target: RunningTarget) -> None:
    ini = Initiator(port=demo_target.port, initiator_name=INITIATOR)
    ini.login()
    pairs = ini.send_targets("All")
    assert ("TargetName", DEMO) in pairs
    assert ("TargetAddress", f"127.0.0.1:{demo_target.port},1") in pairs
    assert ini.logout() == 0


def test_data_digest_error_on_data_out_gets_reject(demo_target: RunningTarget) -> None:
    ini = session(
        demo_target, data_digest=True, header_digest=True, immediate_data=False, initial_r2t=True
    )
    itt = ini.next_itt()
    ini.send_pdu(
        P.ScsiCommand(
            itt=itt,
            write=True,
            expected_length=512,
            cmdsn=ini.cmdsn,
            expstatsn=ini.expstatsn,
            cdb=write10(0, 1),
        )
    )
    ini.cmdsn += 1
    r2t = ini.recv_pdu()
    assert isinstance(r2t, P.R2T)
    from iscsi_vmtarget.iscsi.framing import encode_pdu

    parts = encode_pdu(P.DataOut(itt=itt, ttt=r2t.ttt, final=True, data=bytes(512)), True, True)
    raw = bytearray(b"".join(bytes(b) for b in parts))
    raw[-1] ^= 0xFF
    ini.send_raw(bytes(raw))
    rej = ini.recv_pdu()
    assert isinstance(rej, P.Reject) and rej.reason == P.RejectReason.DATA_DIGEST_ERROR


def test_serve_logs_logins_and_stops_on_sigterm(tmp_path: Path) -> None:
    t = start_target(tmp_path)
    ini = session(t)
    ini.logout()
    time.sleep(0.2)
    t.proc.send_signal(signal.SIGTERM)
    assert t.proc.wait(timeout=15) == 0
    log = t.log()
    assert f"initiator={INITIATOR}" in log and "login:" in log and "logout:" in log


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "iscsi_vmtarget", *args], capture_output=True, text=True, timeout=30
    )


def test_cli_usage_errors_exit_2() -> None:
    proc = _cli("serve", "--portal", "nonsense")
    assert proc.returncode == 2 and "nonsense" in proc.stderr
    proc = _cli("frobnicate")
    assert proc.returncode == 2 and "frobnicate" in proc.stderr


def test_unopenable_backing_file_is_a_clear_error_and_nothing_is_created(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "lun.img"
    conf = tmp_path / "t.toml"
    conf.write_text(
        f'[[target]]\nname = "iqn.2026-11.x:t"\n[[target.lun]]\nnumber = 0\npath = "{missing}"\n'
    )
    proc = _cli("serve", "--config", str(conf), "--state-dir", str(tmp_path / "s"))
    assert proc.returncode == 1
    assert str(missing) in proc.stderr and "does not exist" in proc.stderr
    assert not missing.exists()
    existing = tmp_path / "small.img"
    existing.write_bytes(b"keep me" * 100)
    conf.write_text(
        f'[[target]]\nname = "iqn.2026-11.x:t"\n[[target.lun]]\nnumber = 0\n'
        f'path = "{existing}"\nsize = "1G"\n'
    )
    proc = _cli("serve", "--config", str(conf), "--state-dir", str(tmp_path / "s"))
    assert proc.returncode == 1 and "refusing to resize" in proc.stderr
    assert existing.read_bytes() == b"keep me" * 100
