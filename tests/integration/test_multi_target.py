"""Several targets and LUNs from one config; CHAP one-way, mutual and for discovery;
resets seen by other sessions; the target's NOP-In keepalive."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from iscsi_vmtarget.client import Initiator, InitiatorError, LoginFailed
from iscsi_vmtarget.iscsi import pdu as P
from tests.conftest import INITIATOR, RunningTarget, start_target, start_with_config

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
    t = start_with_config(tmp_path, CONFIG.format(t1=T1, t2=T2, d=tmp_path), nop_interval=1)
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


def test_two_portals_each_in_sendtargets(tmp_path: Path) -> None:
    t = start_target(tmp_path, "--portal", "127.0.0.1:0")
    try:
        assert len(t.ports) == 2
        for port in t.ports:
            ini = Initiator(port=port, initiator_name=INITIATOR)
            ini.login()
            addresses: dict[str, list[str]] = {}
            for key, value in ini.send_targets("All"):
                if key == "TargetName":
                    current = addresses.setdefault(value, [])
                elif key == "TargetAddress":
                    current.append(value)
            demo = addresses["iqn.2026-11.org.iscsi-vmtarget:demo"]
            assert sorted(demo) == sorted(f"127.0.0.1:{p},1" for p in t.ports)
            ini.logout()
    finally:
        t.stop()


def test_target_cold_reset_ends_every_session(multi: RunningTarget) -> None:
    a = login(multi, T1, isid=bytes.fromhex("400001370201"))
    b = login(multi, T1, isid=bytes.fromhex("400001370202"))
    other = login(multi, T2, chap_user="host1", chap_secret=b"host1-secret-12")
    a.send_pdu(
        P.TaskMgmtRequest(
            itt=a.next_itt(), function=7, immediate=True, cmdsn=a.cmdsn, expstatsn=a.expstatsn
        )
    )
    rsp = a.recv_pdu()
    assert isinstance(rsp, P.TaskMgmtResponse) and rsp.response == 0
    for s in (a, b):
        with pytest.raises((InitiatorError, OSError)):
            s.nop(b"x")
    assert other.nop(b"unaffected") == b"unaffected"  # another target's session


def test_warm_reset_reports_reset_to_every_lun_of_the_target(multi: RunningTarget) -> None:
    a = login(multi, T1, isid=bytes.fromhex("400001370301"))
    b = login(multi, T1, isid=bytes.fromhex("400001370302"))
    for s in (a, b):
        for lun in (0, 3):
            s.command(bytes(6), lun=lun)
    a.send_pdu(
        P.TaskMgmtRequest(
            itt=a.next_itt(), function=6, immediate=True, cmdsn=a.cmdsn, expstatsn=a.expstatsn
        )
    )
    assert a.recv_pdu().response == 0
    for lun in (0, 3):
        tur = b.command(bytes(6), lun=lun)
        assert (tur.sense_key, tur.asc_ascq[0]) == (6, 0x29), tur
    assert b.nop(b"still") == b"still"  # a warm reset keeps the sessions


def test_many_concurrent_sessions_do_io(multi: RunningTarget) -> None:
    import threading

    errors: list[str] = []

    def worker(n: int) -> None:
        try:
            ini = login(multi, T1, isid=bytes.fromhex(f"4000013704{n:02x}"))
            ini.command(bytes(6))
            block = bytes([n]) * 4096
            lba = n * 8
            cdb = bytes([0x2A, 0]) + lba.to_bytes(4, "big") + b"\x00\x00\x08\x00"
            for _ in range(20):
                assert ini.command(cdb, data_out=block).status == 0
                rd = bytes([0x28, 0]) + lba.to_bytes(4, "big") + b"\x00\x00\x08\x00"
                assert ini.command(rd, read_length=4096).data == block
            ini.logout()
        except Exception as exc:
            errors.append(f"session {n}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(24)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert errors == []


@pytest.mark.parametrize(
    "raw",
    ["0003000000000000", "4003000000000000", "8003000000000000", "d200000300000000"],
    ids=["peripheral", "flat", "logical-unit", "extended-flat"],
)
def test_every_lun_address_method_reaches_the_same_lu(multi: RunningTarget, raw: str) -> None:
    ini = login(multi, T1)
    lun = bytes.fromhex(raw)
    ini.command(bytes(6), lun_raw=lun)  # its power-on unit attention
    cap = ini.command(bytes([0x25]) + bytes(9), read_length=8, lun_raw=lun)
    assert cap.status == 0 and int.from_bytes(cap.data[:4], "big") == (4 << 20) // 512 - 1
    # LUN 2 does not exist, however it is written.
    missing = bytes.fromhex(raw.replace("03", "02", 1))
    rsp = ini.command(bytes([0x25]) + bytes(9), read_length=8, lun_raw=missing)
    assert (rsp.sense_key, rsp.asc_ascq) == (5, (0x25, 0x00))
