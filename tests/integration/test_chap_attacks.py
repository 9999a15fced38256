"""CHAP attacks over the wire against the real server (RFC 7143 §12.1.3, RFC 1994):

* replay: a CHAP_R captured from a successful login, sent on a new connection against
  the fresh challenge, fails with 02/01; so does the whole captured exchange;
* reflection: an initiator that sends the target's own challenge back as its mutual
  challenge, or answers with a response made with the target's secret, fails with
  02/01; a configuration using one secret both ways is refused;
* short secrets: a secret under 96 bits is refused in the configuration and through
  the running daemon's admin socket, with a message citing §12.1.3; a truncated or
  empty CHAP_R fails with 02/01.

Every attack uses its own initiator name (the failed-login throttle counts per name).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from iscsi_vmtarget.client import Initiator, LoginFailed
from iscsi_vmtarget.server.admin import AdminError, call_daemon
from tests.conftest import RunningTarget, start_target, start_with_config

TARGET = "iqn.2026-11.org.iscsi-vmtarget:chap-attacks"
USER, SECRET = "host", b"initiator-secret-01"
MUTUAL_USER, MUTUAL = "target", b"target-secret-0002"
CONFIG = f"""
[[target]]
name = "{TARGET}"
[target.chap]
user = "{USER}"
secret = "{SECRET.decode()}"
[target.mutual_chap]
user = "{MUTUAL_USER}"
secret = "{MUTUAL.decode()}"
[[target.lun]]
number = 0
path = "{{d}}/lun0.img"
size = "1M"
"""


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningTarget]:
    tmp = tmp_path_factory.mktemp("chap")
    t = start_with_config(tmp, CONFIG.format(d=tmp))
    yield t
    t.stop()


class ChapSession:
    """A login driven one CHAP step at a time, so a test can capture and forge keys."""

    def __init__(self, t: RunningTarget, name: str) -> None:
        self.ini = Initiator(port=t.port, initiator_name=name, target_name=TARGET).connect()
        self.itt = self.ini.next_itt()
        first = [("InitiatorName", name), ("SessionType", "Normal"), ("TargetName", TARGET)]
        assert self.step(first + [("AuthMethod", "CHAP")])["AuthMethod"] == "CHAP"
        answer = self.step([("CHAP_A", "5")])
        self.identifier = int(answer["CHAP_I"])
        self.challenge = bytes.fromhex(answer["CHAP_C"].removeprefix("0x"))

    def step(self, pairs: list[tuple[str, str]], transit: bool = False) -> dict[str, str]:
        # the client's own login PDU exchange (security stage, CSG 0 -> NSG 1)
        return self.ini._login_step(self.itt, 0, 1, transit, pairs)

    def respond(self, response: bytes, *extra: tuple[str, str]) -> dict[str, str]:
        return self.step([("CHAP_N", USER), ("CHAP_R", "0x" + response.hex()), *extra], True)

    def close(self) -> None:
        self.ini.close()


def md5_response(identifier: int, secret: bytes, challenge: bytes) -> bytes:
    return hashlib.md5(bytes([identifier]) + secret + challenge).digest()  # RFC 1994 §4.1


def refused(session: ChapSession, response: bytes, *extra: tuple[str, str]) -> tuple[int, int]:
    try:
        with pytest.raises(LoginFailed) as info:
            session.respond(response, *extra)
        return info.value.status_class, info.value.status_detail
    finally:
        session.close()


def test_a_captured_response_does_not_replay(target: RunningTarget) -> None:
    # the capture: one successful mutual-CHAP login, as an eavesdropper sees it
    seen = ChapSession(target, "iqn.2026-11.org.example:replay")
    captured = md5_response(seen.identifier, SECRET, seen.challenge)
    my_i, my_c = "7", "0x" + os.urandom(16).hex()
    answer = seen.respond(captured, ("CHAP_I", my_i), ("CHAP_C", my_c))
    assert answer["CHAP_N"] == MUTUAL_USER  # the target proved itself: login went on
    seen.close()
    # the replay: new connections, fresh challenges, the captured keys sent again
    for extra in ([], [("CHAP_I", my_i), ("CHAP_C", my_c)]):
        replay = ChapSession(target, "iqn.2026-11.org.example:replay")
        assert replay.challenge != seen.challenge  # 16 random bytes per login
        assert refused(replay, captured, *extra) == (2, 1)
    # the legitimate initiator still logs in (two failures do not lock the name)
    ok = Initiator(
        port=target.port,
        initiator_name="iqn.2026-11.org.example:replay",
        target_name=TARGET,
        chap_user=USER,
        chap_secret=SECRET,
        mutual_secret=MUTUAL,
    )
    ok.login()
    assert ok.nop(b"after replay") == b"after replay"
    ok.close()
    assert "CHAP_R does not match" in target.log()


def test_reflection_is_refused(target: RunningTarget) -> None:
    # the initiator hands the target's own challenge back for the target to answer
    s = ChapSession(target, "iqn.2026-11.org.example:reflect-1")
    good = md5_response(s.identifier, SECRET, s.challenge)
    reflected = ("CHAP_C", "0x" + s.challenge.hex())
    assert refused(s, good, ("CHAP_I", str(s.identifier)), reflected) == (2, 1)
    # a response computed with the TARGET's secret (what a reflection would yield)
    s = ChapSession(target, "iqn.2026-11.org.example:reflect-2")
    assert refused(s, md5_response(s.identifier, MUTUAL, s.challenge)) == (2, 1)
    assert "reflected our CHAP_C" in target.log()
    assert "made with the target's own secret" in target.log()


@pytest.mark.parametrize("cut", [0, 1, 8, 15])
def test_truncated_response_is_refused(target: RunningTarget, cut: int) -> None:
    s = ChapSession(target, f"iqn.2026-11.org.example:short-response-{cut}")
    full = md5_response(s.identifier, SECRET, s.challenge)
    assert refused(s, full[:cut]) == (2, 1)


def test_one_secret_both_ways_is_refused_at_start(tmp_path: Path) -> None:
    same = CONFIG.format(d=tmp_path).replace(MUTUAL.decode(), SECRET.decode())
    with pytest.raises(RuntimeError, match="must differ"):
        start_with_config(tmp_path, same)


def test_short_secrets_are_refused_by_the_running_daemon(tmp_path: Path) -> None:
    state = tmp_path / "state"
    t = start_target(tmp_path / "run", "--state-dir", str(state))
    try:
        name = "iqn.2026-11.org.example:short"
        call_daemon(str(state), "target.create", {"name": name})
        attempts = [
            ("target.set", {"name": name, "chap_user": "u", "chap_secret": "elevenbytes"}),
            ("acl.add", {"target": name, "initiator": "iqn.2026-11.org.example:h",
                         "chap_user": "u", "chap_secret": "x"}),
            ("target.set", {"name": name, "chap_user": "u", "chap_secret": "0123456789ab",
                            "mutual_user": "t", "mutual_secret": "short"}),
        ]  # fmt: skip
        for op, args in attempts:
            with pytest.raises(AdminError, match=r"§12\.1\.3"):
                call_daemon(str(state), op, args)
        # nothing changed: the target is open, without CHAP and without ACLs
        listed = call_daemon(str(state), "target.list", {})["targets"]
        mine = [x for x in listed if x["name"] == name]
        assert mine and mine[0]["chap"] is False and mine[0]["acls"] == []
    finally:
        t.stop()
