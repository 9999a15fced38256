"""LUN masking and CHAP per ACL against the real server, with real clients: iscsi-ls,
iscsi-inq and qemu-img under different ``-i`` initiator names see different LUN sets;
our own initiator checks exact login statuses, REPORT LUNS and sense data."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from iscsi_vmtarget.client import Initiator, InitiatorError, LoginFailed
from tests.conftest import RunningTarget, file_luns, run_tool, start_with_config

A = "iqn.2026-11.org.iscsi-vmtarget:masked"
B = "iqn.2026-11.org.iscsi-vmtarget:open"
C = "iqn.2026-11.org.iscsi-vmtarget:chap"
H1 = "iqn.2026-11.org.example:host1"
H2 = "iqn.2026-11.org.example:host2"
H3 = "iqn.2026-11.org.example:host3"
STRANGER = "iqn.2026-11.org.example:stranger"
GUESSER = "iqn.2026-11.org.example:guesser"
CONFIG = (
    """
[[target]]
name = "{a}"
"""
    + file_luns("a", "4M", "8M", "12M")
    + """[[target.acl]]
initiator = "{h1}"
luns = [0]
[[target.acl]]
initiator = "{h2}"
luns = [{{number = 0, lun = 1}}, {{number = 5, lun = 2, read_only = true}}]
[[target.acl]]
initiator = "{h3}"
sources = ["192.0.2.0/24"]

[[target]]
name = "{b}"
"""
    + file_luns("b", "2M")
    + """

[[target]]
name = "{c}"
[target.chap]
user = "target-user"
secret = "target-wide-secret"
[[target.lun]]
number = 0
path = "{d}/c0.img"
size = "2M"
[[target.acl]]
initiator = "{h1}"
[[target.acl]]
initiator = "{guesser}"
[[target.acl]]
initiator = "{h2}"
[target.acl.chap]
user = "host2"
secret = "host2-own-secret"
[target.acl.mutual_chap]
user = "tgt-c"
secret = "target-c-mutual-1"
"""
)
SIZE = {0: 4 << 20, 1: 8 << 20, 2: 12 << 20}


@pytest.fixture(scope="module")
def masked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningTarget]:
    tmp = tmp_path_factory.mktemp("masking")
    config = CONFIG.format(a=A, b=B, c=C, h1=H1, h2=H2, h3=H3, guesser=GUESSER, d=tmp)
    t = start_with_config(tmp, config)
    yield t
    t.stop()


def run(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_tool(*args, timeout=timeout, check=check)


def iscsi_ls(t: RunningTarget, initiator: str, auth: str = "") -> dict[str, list[int]]:
    out = run("iscsi-ls", "-i", initiator, "-s", f"iscsi://{auth}{t.portal}").stdout
    seen: dict[str, list[int]] = {}
    current = ""
    for line in out.splitlines():
        if m := re.match(r"Target:(\S+) Portal:", line):
            current = m.group(1)
            seen[current] = []
        elif m := re.match(r"Lun:(\d+)", line):
            seen[current].append(int(m.group(1)))
    return seen


def login(t: RunningTarget, initiator: str, target: str | None, **kw: object) -> Initiator:
    ini = Initiator(port=t.port, initiator_name=initiator, target_name=target, **kw)  # type: ignore[arg-type]
    ini.login()
    return ini


def report_luns(ini: Initiator) -> list[int]:
    rsp = ini.command(bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]), read_length=256)
    if rsp.status != 0:  # the power-on unit attention first
        rsp = ini.command(bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]), read_length=256)
    n = int.from_bytes(rsp.data[:4], "big") // 8
    return [int.from_bytes(rsp.data[8 + 8 * i : 10 + 8 * i], "big") & 0x3FFF for i in range(n)]


def status_of(exc: LoginFailed) -> tuple[int, int]:
    return exc.status_class, exc.status_detail


# -- what each initiator sees ------------------------------------------------------


@pytest.mark.interop
def test_iscsi_ls_shows_each_initiator_its_lun_map(masked: RunningTarget) -> None:
    assert iscsi_ls(masked, H1, "target-user%target-wide-secret@") == {A: [0], B: [0], C: [0]}
    # host2 needs its CHAP secret for C: without it, iscsi-ls lists C but cannot log in
    assert iscsi_ls(masked, H2, "host2%host2-own-secret@") == {A: [0, 5], B: [0], C: [0]}
    assert iscsi_ls(masked, H3) == {B: [0]}  # its ACL wants another source network
    assert iscsi_ls(masked, STRANGER) == {B: [0]}


@pytest.mark.interop
def test_qemu_img_and_iscsi_inq_see_different_units(masked: RunningTarget) -> None:
    def qemu_size(initiator: str, lun: int) -> int:
        opts = (
            f"driver=iscsi,transport=tcp,portal={masked.portal},target={A},lun={lun},"
            f"initiator-name={initiator}"
        )
        out = run("qemu-img", "info", "--image-opts", opts).stdout
        m = re.search(r"virtual size: .*\((\d+) bytes\)", out)
        assert m, out
        return int(m.group(1))

    assert qemu_size(H1, 0) == SIZE[0]
    assert qemu_size(H2, 0) == SIZE[1]  # the same LUN number, another unit
    assert qemu_size(H2, 5) == SIZE[2]
    url = f"iscsi://{masked.portal}/{A}/"
    assert run("iscsi-inq", "-i", H1, url + "0").returncode == 0
    denied = run("iscsi-inq", "-i", H1, url + "1", check=False)
    assert denied.returncode != 0 and "LOGICAL_UNIT_NOT_SUPPORTED" in denied.stderr + denied.stdout
    refused = run("iscsi-inq", "-i", STRANGER, url + "0", check=False)
    assert refused.returncode != 0


def test_report_luns_and_unmapped_lun_sense(masked: RunningTarget) -> None:
    h1 = login(masked, H1, A)
    assert report_luns(h1) == [0]
    tur = h1.command(bytes(6), lun=1)
    assert (tur.status, tur.sense_key, tur.asc_ascq) == (2, 5, (0x25, 0x00))
    inq = h1.command(bytes([0x12, 0, 0, 0, 36, 0]), lun=2, read_length=36)
    assert inq.status == 0 and inq.data[0] >> 5 == 3  # peripheral qualifier 3
    h2 = login(masked, H2, A)
    assert report_luns(h2) == [0, 5]
    h2.command(bytes(6), lun=5)  # the power-on unit attention of that unit
    cap = h2.command(bytes([0x25]) + bytes(9), lun=5, read_length=8)
    assert int.from_bytes(cap.data[:4], "big") == SIZE[2] // 512 - 1


def test_read_only_mapping(masked: RunningTarget) -> None:
    h2 = login(masked, H2, A, isid=bytes.fromhex("400001370a01"))
    h2.command(bytes(6), lun=5)
    write = bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0])
    rsp = h2.command(write, lun=5, data_out=b"\x11" * 512)
    assert (rsp.status, rsp.sense_key, rsp.asc_ascq) == (2, 7, (0x27, 0x00))
    h2.command(bytes(6), lun=0)
    assert h2.command(write, lun=0, data_out=b"\x22" * 512).status == 0


def test_login_without_acl_is_authorization_failure(masked: RunningTarget) -> None:
    for who in (STRANGER, H3):  # no ACL; an ACL for another source network
        with pytest.raises(LoginFailed) as info:
            login(masked, who, A)
        assert status_of(info.value) == (2, 2)
    discovery = login(masked, STRANGER, None)
    names = [v for k, v in discovery.send_targets("All") if k == "TargetName"]
    assert names == [B]
    assert discovery.send_targets(A) == []


# -- CHAP per target and per ACL -------------------------------------------------------


def test_chap_target_secret_and_acl_override(masked: RunningTarget) -> None:
    ok = login(masked, H1, C, chap_user="target-user", chap_secret=b"target-wide-secret")
    assert ok.nop(b"x") == b"x"
    # host2's ACL has its own secret: the target-wide one is refused
    with pytest.raises(LoginFailed) as info:
        login(masked, H2, C, chap_user="target-user", chap_secret=b"target-wide-secret")
    assert status_of(info.value) == (2, 1)
    own = login(
        masked,
        H2,
        C,
        chap_user="host2",
        chap_secret=b"host2-own-secret",
        mutual_secret=b"target-c-mutual-1",
    )
    assert own.nop(b"m") == b"m"
    with pytest.raises(InitiatorError, match="mutual"):
        login(
            masked,
            H2,
            C,
            chap_user="host2",
            chap_secret=b"host2-own-secret",
            mutual_secret=b"not-the-targets-secret",
        )
    with pytest.raises(LoginFailed) as info:
        login(masked, H1, C)  # missing CHAP
    assert status_of(info.value) == (2, 1)


def test_failed_logins_are_rate_limited(masked: RunningTarget) -> None:
    secret = b"target-wide-secret"
    for n in range(5):
        with pytest.raises(LoginFailed) as info:
            guess = f"guess-{n:011d}".encode()
            login(masked, GUESSER, C, chap_user="target-user", chap_secret=guess)
        assert status_of(info.value) == (2, 1)
    # blocked now: even the right secret fails with 02/01, for discovery too
    for target in (C, B, None):
        with pytest.raises(LoginFailed) as info:
            login(masked, GUESSER, target, chap_user="target-user", chap_secret=secret)
        assert status_of(info.value) == (2, 1)
    assert "too many failed logins" in masked.log()
    # other initiator names are unaffected
    ok = login(masked, H1, C, chap_user="target-user", chap_secret=secret)
    assert ok.nop(b"y") == b"y"


def test_too_short_secret_refused_at_start(tmp_path: Path) -> None:
    short = f'[[target]]\nname = "{A}"\n[target.chap]\nuser = "u"\nsecret = "eleven-byte"\n'
    with pytest.raises(RuntimeError, match=r"RFC 7143 §12.1.3"):
        start_with_config(tmp_path, short)
