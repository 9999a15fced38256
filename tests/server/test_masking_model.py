"""LUN masking model (server/acl.py): access rules, LUN maps, read-only mappings, secrets,
login decisions (02/02 authorization, 02/01 throttle) and SendTargets per initiator."""

from __future__ import annotations

import uuid

import pytest

from iscsi_vmtarget.iscsi.directory import ChapSecret, StaticDirectory, TargetEntry
from iscsi_vmtarget.iscsi.login import LoginMachine, LoginStatus, LoginThrottle, SessionTable
from iscsi_vmtarget.iscsi.send_targets import send_targets
from iscsi_vmtarget.scsi import LogicalUnit, Nexus, ScsiTarget, UnitIdentity
from iscsi_vmtarget.server.masking import (
    Acl,
    AclError,
    MappedLun,
    ReadOnlyUnit,
    build_lun_map,
    check_secret,
    parse_lun_list,
)
from iscsi_vmtarget.server.registry import Registry, Target
from iscsi_vmtarget.storage import MemoryBackend
from tests.iscsi.test_login import IDENTITY, PORTAL, counter_random, op, request, status

H1 = "iqn.2026-11.org.example:host1"
H2 = "iqn.2026-11.org.example:host2"
TNAME = IDENTITY[2][1]
SECRET = ChapSecret("host1", b"0123456789abcdef")


def unit(n: int, size: int = 1 << 20) -> LogicalUnit:
    return LogicalUnit(MemoryBackend(size), UnitIdentity.from_uuid(uuid.UUID(int=n + 1)))


def nexus(initiator: str = H1) -> Nexus:
    return Nexus(initiator, f"{initiator},i,0x1", TNAME, f"{TNAME},t,0x0001", 1, b"")


def report_luns(scsi: ScsiTarget, initiator: str = H1) -> list[int]:
    rsp = scsi.execute(nexus(initiator), 0, bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]), None)
    data = bytes(rsp.data_in)
    count = int.from_bytes(data[:4], "big") // 8
    return [int.from_bytes(data[8 + 8 * i : 10 + 8 * i], "big") & 0x3FFF for i in range(count)]


def sense(rsp: object) -> tuple[int, int, int]:
    s = bytes(rsp.sense)  # type: ignore[attr-defined]
    return s[2] & 0x0F, s[12], s[13]


# -- model ---------------------------------------------------------------------------


def test_acl_names_compare_case_insensitively_and_sources_are_normalized() -> None:
    acl = Acl("IQN.2026-11.org.Example:Host1", sources=("10.1.2.3/24",))
    assert acl.initiator == H1 and acl.sources == ("10.1.2.0/24",)
    rule = acl.rule()
    assert rule.matches(H1.upper(), "10.1.2.200")
    assert rule.matches(H1, "::ffff:10.1.2.9")  # IPv4-mapped IPv6 peer
    assert not rule.matches(H1, "10.1.3.1")
    assert not rule.matches(H1, None)
    assert not rule.matches(H2, "10.1.2.200")


@pytest.mark.parametrize(
    "bad",
    [
        dict(initiator="host1"),
        dict(initiator=H1, sources=("10.0.0.300",)),
        dict(initiator=H1, chap=ChapSecret("u", b"short")),
        dict(initiator=H1, chap=SECRET, mutual_chap=SECRET),
        dict(initiator=H1, luns=(MappedLun(0, 0), MappedLun(0, 1))),
        dict(initiator=H1, view="plain"),
    ],
)
def test_bad_acls_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(AclError):
        Acl(**bad)  # type: ignore[arg-type]


def test_short_secret_message_cites_the_rfc() -> None:
    with pytest.raises(AclError, match=r"11 bytes.*RFC 7143 §12.1.3.*12 bytes"):
        check_secret(ChapSecret("u", b"x" * 11), "target t")
    assert check_secret(ChapSecret("u", b"x" * 12), "target t") is not None


def test_mapped_lun_range_and_lun_list_syntax() -> None:
    with pytest.raises(AclError):
        MappedLun(16384, 0)
    assert parse_lun_list("0, 5=2:ro,7=1:rw") == (
        MappedLun(0, 0),
        MappedLun(5, 2, read_only=True),
        MappedLun(7, 1),
    )
    with pytest.raises(AclError):
        parse_lun_list("1:xx")


def test_acl_dict_round_trip() -> None:
    acl = Acl(
        H1,
        sources=("10.0.0.0/8",),
        luns=(MappedLun(3, 0, True), MappedLun(1, 2, view="raw")),
        chap=SECRET,
        mutual_chap=ChapSecret("tgt", b"target-secret-xyz"),
    )
    assert Acl.from_dict(acl.to_dict()) == acl
    assert [m.number for m in acl.luns or ()] == [1, 3]  # kept sorted
    assert Acl.from_dict({"initiator": H2, "luns": [0, 2]}).luns == (
        MappedLun(0, 0),
        MappedLun(2, 2),
    )


# -- the SCSI side -------------------------------------------------------------------


def test_lun_map_shows_only_mapped_luns_under_their_numbers() -> None:
    luns = {0: unit(0), 1: unit(1), 2: unit(2)}
    acl = Acl(H1, luns=(MappedLun(5, 2), MappedLun(0, 1), MappedLun(9, 42)))
    shown = build_lun_map(luns, acl)
    assert shown == {5: luns[2], 0: luns[1]}  # a mapping of a missing LUN is dropped
    scsi = ScsiTarget(shown)
    assert report_luns(scsi) == [0, 5]
    # an unmapped LUN: LOGICAL UNIT NOT SUPPORTED, and INQUIRY peripheral qualifier 3
    tur = scsi.execute(nexus(), 1, bytes(6), None)
    assert sense(tur) == (5, 0x25, 0x00)
    inq = scsi.execute(nexus(), 2, bytes([0x12, 0, 0, 0, 36, 0]), None)
    assert inq.status == 0 and bytes(inq.data_in)[0] >> 5 == 3
    assert build_lun_map(luns, None) == luns
    assert set(build_lun_map(luns, Acl(H1))) == {0, 1, 2}  # no list: everything


def test_read_only_mapping_protects_writes_but_shares_the_unit() -> None:
    shared = unit(0)
    rw = ScsiTarget({0: shared})
    ro = ScsiTarget(build_lun_map({0: shared}, Acl(H2, luns=(MappedLun(0, 0, True),))))
    proxy = ro.luns[0]
    assert isinstance(proxy, ReadOnlyUnit) and proxy.shared is shared
    assert proxy.identity is shared.identity
    for scsi, who in ((rw, H1), (ro, H2)):
        scsi.nexus_added(nexus(who))
        scsi.execute(nexus(who), 0, bytes(6), None)  # clear the power-on unit attention
    write = bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0])
    assert rw.execute(nexus(H1), 0, write, b"\xab" * 512).status == 0
    denied = ro.execute(nexus(H2), 0, write, b"\xcd" * 512)
    assert sense(denied) == (7, 0x27, 0x00)  # DATA PROTECT, WRITE PROTECTED
    read = ro.execute(nexus(H2), 0, bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]), None)
    assert bytes(read.data_in) == b"\xab" * 512  # the same blocks
    sense6 = ro.execute(nexus(H2), 0, bytes([0x1A, 0, 0x3F, 0, 255, 0]), None)
    assert bytes(sense6.data_in)[2] & 0x80  # MODE SENSE header: WP


# -- login, discovery and the registry -------------------------------------------------


def _registry() -> Registry:
    reg = Registry()
    luns = {0: unit(0), 1: unit(1)}
    acls = {
        H1: Acl(H1, luns=(MappedLun(0, 1),)),
        H2: Acl(H2, sources=("192.0.2.0/24",), chap=SECRET),
    }
    reg.add_target(Target(TargetEntry(TNAME), ScsiTarget(luns), acls))
    reg.add_target(Target(TargetEntry("iqn.2026-11.org.example:open"), ScsiTarget(luns)))
    return reg


def test_registry_gives_each_initiator_its_own_lun_map() -> None:
    reg = _registry()
    h1 = reg.scsi_for(TNAME, H1, "127.0.0.1")
    assert h1 is not None and report_luns(h1) == [0]
    assert h1.luns[0] is reg.targets[TNAME].scsi.luns[1]
    assert reg.scsi_for(TNAME, H1.upper(), None) is h1  # one view per ACL
    h2 = reg.scsi_for(TNAME, H2, "192.0.2.7")
    assert h2 is not None and report_luns(h2) == [0, 1]
    assert reg.scsi_for(TNAME, H2, "198.51.100.1") is None  # source rule
    assert reg.scsi_for(TNAME, "iqn.2026-11.org.example:stranger", None) is None


def test_sendtargets_lists_only_permitted_targets() -> None:
    reg = _registry()

    def names(initiator: str, source: str | None) -> list[str]:
        pairs = send_targets(reg, initiator, "All", None, source=source)
        return [v for k, v in pairs if k == "TargetName"]

    assert names(H1, "127.0.0.1") == [TNAME, "iqn.2026-11.org.example:open"]
    assert names(H2, "192.0.2.1") == [TNAME, "iqn.2026-11.org.example:open"]
    assert names(H2, "127.0.0.1") == ["iqn.2026-11.org.example:open"]
    assert names("iqn.2026-11.org.example:other", None) == ["iqn.2026-11.org.example:open"]
    assert send_targets(reg, H2, TNAME, None, source="127.0.0.1") == []


def test_allow_all_demo_mode() -> None:
    reg = _registry()
    target = reg.targets[TNAME]
    target.set_acls(target.acls, allow_all=True)
    other = reg.scsi_for(TNAME, "iqn.2026-11.org.example:other", None)
    assert other is not None and report_luns(other) == [0, 1]
    h1 = reg.scsi_for(TNAME, H1, None)
    assert h1 is not None and report_luns(h1) == [0]  # an ACL still applies


def _login(directory: object, name: str, *, source: str | None = None, **kw: object) -> int:
    m = LoginMachine(
        directory=directory,  # type: ignore[arg-type]
        sessions=SessionTable(),
        portal=PORTAL,
        random_bytes=counter_random(),
        source=source,
        **kw,  # type: ignore[arg-type]
    )
    ident = [("InitiatorName", name), *IDENTITY[1:]]
    first = m.receive(request([*ident, ("AuthMethod", "None")], nsg=1))
    if status(first):
        return status(first)
    return status(m.receive(op()))


def test_login_without_a_matching_acl_is_authorization_failure() -> None:
    reg = _registry()
    assert _login(reg, H1, source="10.0.0.1") == 0
    assert _login(reg, "iqn.2026-11.org.example:stranger") == LoginStatus.AUTHORIZATION_FAILURE
    # the ACL of host2 has a source rule and needs CHAP
    assert _login(reg, H2, source="10.0.0.1") == LoginStatus.AUTHORIZATION_FAILURE
    assert _login(reg, H2, source="192.0.2.5") == LoginStatus.AUTHENTICATION_FAILURE


def test_acl_chap_overrides_the_targets() -> None:
    target_secret = ChapSecret("t", b"target-wide-secret")
    entry = TargetEntry(
        TNAME, chap=target_secret, acls=(Acl(H1, chap=SECRET).rule(), Acl(H2).rule())
    )
    assert entry.grant(H1) is not None and entry.grant(H1).chap == SECRET  # type: ignore[union-attr]
    assert entry.grant(H2).chap == target_secret  # type: ignore[union-attr]
    assert entry.grant("iqn.2026-11.org.example:x") is None


def test_failed_logins_are_throttled_per_initiator() -> None:
    now = [1000.0]
    throttle = LoginThrottle(lambda: now[0], max_failures=3, window=60, backoff=30)
    directory = StaticDirectory([TargetEntry(TNAME, chap=SECRET)])
    for _ in range(3):  # AuthMethod None against a CHAP target: 02/01
        assert _login(directory, H1, throttle=throttle) == LoginStatus.AUTHENTICATION_FAILURE
        now[0] += 1
    assert throttle.blocked(H1) and not throttle.blocked(H2)
    assert throttle.blocked(H1.upper())
    now[0] += 28  # blocked at the third failure (t=1002) for 30 s
    assert throttle.blocked(H1)
    now[0] += 2
    assert not throttle.blocked(H1)


def test_throttle_window_forgets_old_failures_and_success_resets() -> None:
    now = [0.0]
    throttle = LoginThrottle(lambda: now[0], max_failures=3, window=10, backoff=30)
    throttle.failed(H1)
    throttle.failed(H1)
    now[0] = 11
    throttle.failed(H1)
    assert not throttle.blocked(H1)  # the first two fell out of the window
    throttle.failed(H1)
    throttle.succeeded(H1)
    throttle.failed(H1)
    assert not throttle.blocked(H1)


def test_throttled_login_fails_before_chap_and_is_not_counted() -> None:
    now = [0.0]
    throttle = LoginThrottle(lambda: now[0], max_failures=1, window=10, backoff=5)
    throttle.failed(H1)
    directory = StaticDirectory([TargetEntry(TNAME)])  # no CHAP at all
    assert _login(directory, H1, throttle=throttle) == LoginStatus.AUTHENTICATION_FAILURE
    now[0] = 5.5
    assert _login(directory, H1, throttle=throttle) == 0


def test_throttle_tracks_a_bounded_number_of_names() -> None:
    throttle = LoginThrottle(lambda: 0.0, max_failures=10, max_names=4)
    for i in range(10):
        throttle.failed(f"iqn.2026-11.org.example:h{i}")
    assert len(throttle._failures) == 4
