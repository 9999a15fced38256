"""Several targets and LUNs from one config; CHAP one-way, mutual and for discovery;
resets seen by other sessions; the target's NOP-In keepalive."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from iscsi_vmtarget.client import Initiator, InitiatorError, LoginFailed
from iscsi_vmtarget.iscsi import pdu as P
from tests.conftest import INITIATOR, RunningTarget, start_target

T1 = "iqn.2026-11.org.iscsi-vmtarget:one"
T2 = "iqn.2026-11.org.iscsi-vmtarget:two"
CONFIG = """
[discovery.chap]
user = "disco"
secret = "discovery-secret-1"

[[target]]
name = "{t1}"
[[target.lun]]
number = 0
path = "{d}/t1-lun0.img"
size = "8M"
[[target.lun]]
number = 3
path = "{d}/t1-lun3.img"
size = "4M"

[[target]]
name = "{t2}"
[target.chap]
user = "host1"
secret = "host1-secret-12"
[target.mutual_chap]
user = "tgt2"
secret = "target-secret-34"
[[target.lun]]
number = 0
path = "{d}/t2-lun0.img"
size = "2M"
read_only = false
"""


@pytest.fixture
def multi(tmp_path: Path) -> Iterator[RunningTarget]:
    conf = tmp_path / "multi.toml"
    conf.write_text(CONFIG.format(t1=T1, t2=T2, d=tmp_path))
    t = start_target(tmp_path / "run", "--config", str(conf), nop_interval=1)
    yield t
    t.stop()


def login(t: RunningTarget, target: str | None, **kw: object) -> Initiator:
    ini = Initiator(port=t.port, initiator_name=INITIATOR, target_name=target, **kw)  # type: ignore[arg-type]
    ini.login()
    return ini


def test_all_targets_and_luns_are_served(multi: RunningTarget) -> None:
    assert multi.targets == {T1: {0: 8 << 20, 3: 4 << 20}, T2: {0: 2 << 20}}
    ini = login(multi, T1)
    ini.command(bytes(6))  # clear the power-on unit attention
    luns = ini.command(bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0]), read_length=64)
    assert luns.status == 0
    assert luns.data[:4] == (16).to_bytes(4, "big")
    assert luns.data[8:10] == b"\x00\x00" and luns.data[16:18] == b"\x00\x03"
    ua = ini.command(bytes(6), lun=3)  # each logical unit reports its own power-on
    assert (ua.sense_key, ua.asc_ascq) == (6, (0x29, 0x00))
    cap = ini.command(bytes([0x25]) + bytes(9), lun=3, read_length=8)
    assert cap.status == 0 and int.from_bytes(cap.data[:4], "big") == (4 << 20) // 512 - 1


def test_discovery_needs_discovery_chap(multi: RunningTarget) -> None:
    with pytest.raises(LoginFailed) as info:
        login(multi, None)
    assert (info.value.status_class, info.value.status_detail) == (2, 1)
    ini = login(multi, None, chap_user="disco", chap_secret=b"discovery-secret-1")
    names = [v for k, v in ini.send_targets("All") if k == "TargetName"]
    assert names == [T1, T2]


def test_mutual_chap(multi: RunningTarget) -> None:
    ini = login(
        multi,
        T2,
        chap_user="host1",
        chap_secret=b"host1-secret-12",
        mutual_secret=b"target-secret-34",
    )
    assert ini.nop(b"m") == b"m"
    with pytest.raises(InitiatorError, match="mutual"):
        login(
            multi,
            T2,
            chap_user="host1",
            chap_secret=b"host1-secret-12",
            mutual_secret=b"some-other-secret",
        )
    with pytest.raises(LoginFailed) as info:
        login(multi, T2, chap_user="host1", chap_secret=b"wrong-secret-000")
    assert (info.value.status_class, info.value.status_detail) == (2, 1)
    with pytest.raises(LoginFailed):
        login(multi, T2)  # no CHAP at all


def test_lun_reset_gives_other_sessions_a_unit_attention(multi: RunningTarget) -> None:
    a = login(multi, T1, isid=bytes.fromhex("400001370101"))
    b = login(multi, T1, isid=bytes.fromhex("400001370102"))
    for s in (a, b):
        s.command(bytes(6))
    a.send_pdu(
        P.TaskMgmtRequest(
            itt=a.next_itt(), function=5, immediate=True, cmdsn=a.cmdsn, expstatsn=a.expstatsn
        )
    )
    rsp = a.recv_pdu()
    assert isinstance(rsp, P.TaskMgmtResponse) and rsp.response == 0
    tur = b.command(bytes(6))
    assert (tur.status, tur.sense_key, tur.asc_ascq) == (2, 6, (0x29, 0x03))
    assert b.command(bytes(6)).status == 0  # reported once


def test_sendtargets_in_a_normal_session_names_its_own_target(multi: RunningTarget) -> None:
    ini = login(multi, T1)
    pairs = ini.send_targets("")
    assert [v for k, v in pairs if k == "TargetName"] == [T1]


def test_idle_connection_gets_nop_in_and_is_closed_when_silent(multi: RunningTarget) -> None:
    ini = login(multi, T1)
    ini.sock.settimeout(5)
    ping = ini.recv_pdu()
    assert isinstance(ping, P.NopIn) and ping.ttt != P.RESERVED_TAG
    assert ping.itt == P.RESERVED_TAG
    # Answer it: the session stays.
    ini.send_pdu(P.NopOut(itt=P.RESERVED_TAG, ttt=ping.ttt, immediate=True, cmdsn=ini.cmdsn))
    assert ini.nop(b"alive") == b"alive"
    # Ignore the next ping: the target closes the connection.
    deadline = time.monotonic() + 10
    with pytest.raises((InitiatorError, OSError)):
        while time.monotonic() < deadline:
            ini.recv_pdu()
    assert "ping timeout" in multi.log() or "no NOP-Out answer" in multi.log()


def test_logout_of_connection(multi: RunningTarget) -> None:
    ini = login(multi, T1)
    assert ini.logout(reason=1) == 0
    ini2 = login(multi, T1)
    assert ini2.logout(reason=2) == 2  # connection recovery: not supported at ERL 0
