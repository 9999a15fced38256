"""Login phase (RFC 7143 §6.3, §11.12-11.13): happy paths, every status, continuation, table."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iscsi_vmtarget.iscsi.chap import InitiatorChap
from iscsi_vmtarget.iscsi.directory import (
    ChapSecret,
    Portal,
    StaticDirectory,
    TargetDirectory,
    TargetEntry,
)
from iscsi_vmtarget.iscsi.login import (
    LOGIN_MAX_DATA,
    TRANSITIONS,
    Kind,
    LoginMachine,
    LoginStatus,
    SessionTable,
    SessionTableFull,
    Stage,
    classify,
)
from iscsi_vmtarget.iscsi.params import TargetPreferences
from iscsi_vmtarget.iscsi.pdu import LoginRequest, LoginResponse
from iscsi_vmtarget.iscsi.text import encode_hex, encode_text, parse_text

INIT = "iqn.2024-01.org.example:host1"
TNAME = "iqn.2024-01.org.example:disk1"
ISID = bytes.fromhex("400001370000")
PORTAL = Portal("127.0.0.1", 3260, 5)
USER = ChapSecret("host1", b"0123456789abcdef")
MUTUAL = ChapSecret("disk1", b"fedcba9876543210")

PLAIN = TargetEntry(TNAME, alias="Disk One")
CHAP = TargetEntry(TNAME, chap=USER, mutual_chap=MUTUAL)

IDENTITY = [("InitiatorName", INIT), ("SessionType", "Normal"), ("TargetName", TNAME)]
DISCOVERY = [("InitiatorName", INIT), ("SessionType", "Discovery")]
OP_KEYS = [
    ("HeaderDigest", "CRC32C,None"),
    ("DataDigest", "None"),
    ("MaxRecvDataSegmentLength", "65536"),
    ("InitialR2T", "No"),
    ("ImmediateData", "Yes"),
    ("MaxBurstLength", "262144"),
    ("FirstBurstLength", "65536"),
]
Pairs = Sequence[tuple[str, str]]


def counter_random(start: int = 0) -> Callable[[int], bytes]:
    counter = itertools.count(start)
    return lambda n: bytes(next(counter) % 256 for _ in range(n))


def machine(
    target: TargetEntry | None = PLAIN,
    *,
    directory: TargetDirectory | None = None,
    sessions: SessionTable | None = None,
    prefs: TargetPreferences | None = None,
) -> LoginMachine:
    return LoginMachine(
        directory=directory or StaticDirectory([target] if target else []),
        sessions=sessions if sessions is not None else SessionTable(),
        portal=PORTAL,
        random_bytes=counter_random(),
        prefs=prefs,
    )


def request(
    pairs: Pairs = (),
    *,
    csg: int = 0,
    nsg: int = 1,
    transit: bool = True,
    cont: bool = False,
    data: bytes | None = None,
    **fields: object,
) -> LoginRequest:
    base: dict[str, object] = dict(isid=ISID, cid=1, cmdsn=10, expstatsn=500, itt=0x1234)
    base.update(fields)
    return LoginRequest(
        transit=transit,
        cont=cont,
        csg=csg,
        nsg=nsg,
        data=encode_text(pairs) if data is None else data,
        **base,  # type: ignore[arg-type]
    )


def op(pairs: Pairs = (), **kw: object) -> LoginRequest:
    return request(pairs, **{"csg": 1, "nsg": 3, **kw})  # type: ignore[arg-type]


def keys(resp: LoginResponse) -> list[tuple[str, str]]:
    return parse_text(resp.data)


def status(resp: LoginResponse) -> int:
    return resp.status_class << 8 | resp.status_detail


def expect_failure(m: LoginMachine, *requests: LoginRequest) -> int:
    """Send requests; all but the last must succeed; returns the last one's status."""
    for req in requests[:-1]:
        resp = m.receive(req)
        assert status(resp) == 0, (m.failure_reason, req)
        assert not m.failed
    resp = m.receive(requests[-1])
    assert m.failed and not m.done and m.result is None
    assert not resp.transit and not resp.cont and resp.data == b""
    assert resp.status_class in (2, 3)
    return status(resp)


# -- happy paths ---------------------------------------------------------------------------


def test_no_auth_security_then_operational() -> None:
    sessions = SessionTable()
    m = machine(sessions=sessions)
    r1 = m.receive(request([*IDENTITY, ("AuthMethod", "None")]))
    assert (r1.transit, r1.cont, r1.csg, r1.nsg, status(r1)) == (True, False, 0, 1, 0)
    assert (r1.isid, r1.tsih, r1.itt, r1.version_max, r1.version_active) == (ISID, 0, 0x1234, 0, 0)
    assert (r1.statsn, r1.expcmdsn, r1.maxcmdsn) == (500, 10, 10)
    assert keys(r1) == [
        ("TargetPortalGroupTag", "5"),
        ("TargetAlias", "Disk One"),
        ("AuthMethod", "None"),
    ]
    assert not m.done and m.stage is Stage.OPERATIONAL

    r2 = m.receive(op(OP_KEYS, expstatsn=501))
    assert (r2.transit, r2.csg, r2.nsg, status(r2), r2.statsn) == (True, 1, 3, 0, 501)
    assert r2.tsih != 0
    assert keys(r2) == [
        ("HeaderDigest", "CRC32C"),
        ("DataDigest", "None"),
        ("InitialR2T", "No"),
        ("ImmediateData", "Yes"),
        ("MaxBurstLength", "262144"),
        ("FirstBurstLength", "65536"),
        ("MaxRecvDataSegmentLength", "262144"),
    ]
    assert m.done and not m.failed
    result = m.result
    assert result is not None
    assert (result.tsih, result.isid, result.cid, result.target) == (r2.tsih, ISID, 1, PLAIN)
    assert (result.exp_cmdsn, result.statsn, result.max_cmdsn) == (10, 502, 10)
    assert result.reinstated_tsih is None and result.reinstated_cid is None and result.leading
    p = result.params
    assert p.header_digest and not p.data_digest and not p.initial_r2t
    assert (p.max_recv_data_segment_length, p.target_max_recv_data_segment_length) == (
        65536,
        262144,
    )
    assert (p.initiator_name, p.target_name, p.session_type) == (INIT, TNAME, "Normal")
    assert sessions.find(INIT, ISID, TNAME) == result.tsih


def test_skip_security_straight_to_full_feature() -> None:
    m = machine()
    r = m.receive(op([*IDENTITY, *OP_KEYS]))
    assert (status(r), r.transit, r.csg, r.nsg) == (0, True, 1, 3)
    got = dict(keys(r))
    assert got["TargetPortalGroupTag"] == "5" and got["MaxRecvDataSegmentLength"] == "262144"
    assert m.done and m.result is not None and m.result.statsn == 501


def test_security_straight_to_full_feature_keeps_default_limit() -> None:
    # security-stage responses carry no operational keys (open-iscsi refuses them)
    m = machine()
    r = m.receive(request([*IDENTITY, ("AuthMethod", "None")], nsg=3))
    assert (status(r), r.csg, r.nsg, r.transit) == (0, 0, 3, True)
    assert [k for k, _ in keys(r)] == ["TargetPortalGroupTag", "TargetAlias", "AuthMethod"]
    assert m.done and m.result is not None
    assert m.result.params.target_max_recv_data_segment_length == 8192


def test_stay_in_each_stage_before_transit() -> None:
    m = machine()
    r = m.receive(request(IDENTITY, transit=False))
    assert (status(r), r.transit, r.csg) == (0, False, 0)
    assert m.receive(request([("AuthMethod", "None")])).transit
    r = m.receive(op([("MaxBurstLength", "65536")], transit=False, nsg=0))
    assert (r.transit, keys(r)) == (False, [("MaxBurstLength", "65536"), _OUR_MRDSL])
    r = m.receive(op())
    assert r.transit and keys(r) == [] and m.done
    assert m.result is not None and m.result.params.max_burst_length == 65536


_OUR_MRDSL = ("MaxRecvDataSegmentLength", "262144")


def _chap_login(m: LoginMachine, initiator: InitiatorChap) -> list[tuple[str, str]]:
    r = m.receive(request([*IDENTITY, ("AuthMethod", "CHAP,None")]))
    # CHAP not done yet: the target holds the transit back (T=0)
    assert (status(r), r.transit) == (0, False)
    assert ("AuthMethod", "CHAP") in keys(r)
    r = m.receive(request(initiator.offer()))
    assert (status(r), r.transit) == (0, False)
    challenge = dict(keys(r))
    assert challenge["CHAP_A"] == "5" and len(challenge["CHAP_C"]) == 2 + 32
    r = m.receive(request(initiator.respond(challenge)))
    assert (status(r), r.transit, r.nsg) == (0, True, 1), m.failure_reason
    final = keys(r)
    r = m.receive(op(OP_KEYS))
    assert status(r) == 0 and m.done
    return final


def test_chap_login() -> None:
    final = _chap_login(machine(CHAP), InitiatorChap(USER))
    assert final == []


def test_mutual_chap_login() -> None:
    initiator = InitiatorChap(USER, MUTUAL, counter_random(200))
    final = _chap_login(machine(CHAP), initiator)
    assert [k for k, _ in final] == ["CHAP_N", "CHAP_R"]
    initiator.verify(dict(final))


def test_libiscsi_style_mutual_chap_login() -> None:
    """The request sequence of libiscsi's lib/login.c: T=0 for CHAP_A, names restated in
    the operational stage, upper-case hex."""
    m = machine(CHAP)
    first = [IDENTITY[0], IDENTITY[2], IDENTITY[1], ("AuthMethod", "CHAP,None")]
    assert keys(m.receive(request(first)))[-1] == ("AuthMethod", "CHAP")
    challenge = dict(keys(m.receive(request([("CHAP_A", "5")], transit=False))))
    initiator = InitiatorChap(USER, MUTUAL, counter_random(100))
    reply = [
        (k, "0x" + v[2:].upper() if v.startswith("0x") else v)
        for k, v in initiator.respond(challenge)
    ]
    r = m.receive(request(reply))
    assert (status(r), r.transit, r.nsg) == (0, True, 1)
    got = dict(keys(r))
    assert len(got["CHAP_R"]) == 2 + 32 and got["CHAP_R"].startswith("0x")
    initiator.verify(got)
    r = m.receive(op([*first[:3], *OP_KEYS, ("IFMarker", "No"), ("OFMarker", "No")]))
    assert status(r) == 0 and m.done, m.failure_reason
    assert ("IFMarker", "Reject") in keys(r)


def test_chap_algorithm_in_first_request() -> None:
    m = machine(CHAP)
    r = m.receive(request([*IDENTITY, ("AuthMethod", "CHAP"), ("CHAP_A", "5")]))
    assert [k for k, _ in keys(r)] == [
        "TargetPortalGroupTag",
        "AuthMethod",
        "CHAP_A",
        "CHAP_I",
        "CHAP_C",
    ]


def test_target_without_auth_answers_none_even_when_chap_listed_first() -> None:
    m = machine()
    r = m.receive(request([*IDENTITY, ("AuthMethod", "CHAP,None")]))
    assert ("AuthMethod", "None") in keys(r) and r.transit


def test_discovery_session() -> None:
    m = machine()
    r = m.receive(request([*DISCOVERY, ("AuthMethod", "None")]))
    assert keys(r) == [("AuthMethod", "None")]  # no TargetPortalGroupTag in discovery
    r = m.receive(op([("MaxBurstLength", "65536"), ("HeaderDigest", "None")]))
    assert keys(r) == [("MaxBurstLength", "Irrelevant"), ("HeaderDigest", "None"), _OUR_MRDSL]
    assert m.done and m.result is not None
    assert m.result.target is None
    assert (m.result.params.session_type, m.result.params.target_name) == ("Discovery", None)


def test_discovery_session_with_chap() -> None:
    directory = StaticDirectory([PLAIN], discovery_auth=USER)
    m = machine(directory=directory)
    r = m.receive(request([*DISCOVERY, ("AuthMethod", "CHAP")]))
    assert (keys(r), r.transit) == ([("AuthMethod", "CHAP")], False)
    assert expect_failure(machine(directory=directory), op(DISCOVERY)) == 0x0201


# -- every failure status --------------------------------------------------------------------

NOT_ALLOWED = TargetEntry(TNAME, initiators=frozenset({"iqn.2024-01.org.example:other"}))


@pytest.mark.parametrize(
    ("target", "requests", "expected"),
    [
        (PLAIN, [request([("SessionType", "Normal"), ("TargetName", TNAME)])], 0x0207),
        (PLAIN, [request([("InitiatorName", INIT)])], 0x0207),
        (PLAIN, [request([("InitiatorName", INIT), ("TargetName", "iqn.x:none")])], 0x0203),
        (NOT_ALLOWED, [request(IDENTITY)], 0x0202),
        (PLAIN, [request([IDENTITY[0], ("SessionType", "Bogus"), IDENTITY[2]])], 0x0209),
        (CHAP, [request([*IDENTITY, ("AuthMethod", "None")])], 0x0201),
        (CHAP, [op(IDENTITY)], 0x0201),
        (CHAP, [request(IDENTITY)], 0x0201),  # transit wanted, no AuthMethod at all
        (PLAIN, [request([*IDENTITY, ("AuthMethod", "SRP,KRB5")])], 0x0201),
        (PLAIN, [request(IDENTITY, version_min=1, version_max=1)], 0x0205),
        (PLAIN, [request(IDENTITY, version_min=0, version_max=0), request(version_min=2)], 0x0205),
        (PLAIN, [request(IDENTITY, tsih=77)], 0x020A),
        (PLAIN, [request([("InitiatorName", "iqn." + "x" * 230), *IDENTITY[1:]])], 0x0200),
        (PLAIN, [request(IDENTITY, csg=2)], 0x0200),
        (PLAIN, [request(IDENTITY, transit=True, cont=True)], 0x0200),
        (PLAIN, [request(IDENTITY, nsg=0)], 0x0200),
        (PLAIN, [request(IDENTITY, csg=1, nsg=1)], 0x0200),
        (PLAIN, [request(IDENTITY, transit=False), op()], 0x0200),  # CSG jumps ahead
        (PLAIN, [request(IDENTITY), request()], 0x0200),  # back to security
        (PLAIN, [request(IDENTITY, transit=False), request([(IDENTITY[0][0], "iqn.x:y")])], 0x0200),
        (
            PLAIN,
            [
                request([*IDENTITY, ("DataDigest", "None")], transit=False),
                request([("DataDigest", "None")]),
            ],
            0x0200,
        ),
        (PLAIN, [request([*IDENTITY, ("TargetAlias", "x")])], 0x0200),
        (PLAIN, [request([*IDENTITY, ("SendTargets", "All")])], 0x0200),
        (PLAIN, [request(data=b"InitiatorName")], 0x0200),
        (PLAIN, [request(IDENTITY, transit=False), request(isid=bytes(6))], 0x0200),
        (PLAIN, [request(IDENTITY, transit=False), request(cid=9)], 0x0200),
        (PLAIN, [request([*IDENTITY, ("CHAP_A", "5")])], 0x0200),
        (PLAIN, [request(IDENTITY), op([("AuthMethod", "None")])], 0x0200),
        (PLAIN, [op([*IDENTITY, ("CHAP_N", "x")])], 0x0200),
        (PLAIN, [op(IDENTITY), op()], 0x0200),  # anything after the end
    ],
)
def test_failure_status(target: TargetEntry, requests: list[LoginRequest], expected: int) -> None:
    assert expect_failure(machine(target), *requests) == expected


def _chap_failure(reply: Callable[[dict[str, str]], Pairs]) -> int:
    m = machine(CHAP)
    m.receive(request([*IDENTITY, ("AuthMethod", "CHAP")]))
    challenge = dict(keys(m.receive(request([("CHAP_A", "5")]))))
    return expect_failure(m, request(reply(challenge)))


def test_wrong_chap_secret_is_authentication_failure() -> None:
    wrong = InitiatorChap(ChapSecret(USER.user, b"not-the-secret!!"))
    assert _chap_failure(wrong.respond) == 0x0201


def test_reflected_challenge_is_authentication_failure() -> None:
    def reflect(challenge: dict[str, str]) -> Pairs:
        good = InitiatorChap(USER).respond(challenge)
        return [*good, ("CHAP_I", "1"), ("CHAP_C", challenge["CHAP_C"])]

    assert _chap_failure(reflect) == 0x0201


def test_unsupported_chap_algorithm_is_rejected_then_fails() -> None:
    m = machine(CHAP)
    m.receive(request([*IDENTITY, ("AuthMethod", "CHAP")]))
    r = m.receive(request([("CHAP_A", "7")]))
    assert (status(r), r.transit, keys(r)) == (0, False, [("CHAP_A", "Reject")])
    assert expect_failure(m, request([("CHAP_N", "x"), ("CHAP_R", "0x00")])) == 0x0201


def test_transit_after_chap_reject_is_authentication_failure() -> None:
    m = machine(CHAP)
    m.receive(request([*IDENTITY, ("AuthMethod", "CHAP")]))
    m.receive(request([("CHAP_A", "7")]))
    assert expect_failure(m, request()) == 0x0201


class BrokenDirectory(StaticDirectory):
    def lookup(self, target_name: str) -> TargetEntry | None:
        raise OSError("configuration store unavailable")


def test_directory_fault_is_target_error() -> None:
    m = machine(directory=BrokenDirectory())
    assert expect_failure(m, request(IDENTITY)) == 0x0300
    assert m.failure_reason is not None and "OSError" in m.failure_reason


class FullTable(SessionTable):
    def allocate_tsih(self) -> int:
        raise SessionTableFull("full")


def test_no_tsih_left_is_out_of_resources() -> None:
    assert expect_failure(machine(sessions=FullTable()), op(IDENTITY)) == 0x0302


def test_failure_responses_keep_the_statsn_sequence() -> None:
    m = machine()
    assert m.receive(request(IDENTITY, transit=False)).statsn == 500
    r = m.receive(request(csg=2))
    assert (r.statsn, status(r), r.isid, r.itt) == (501, 0x0200, ISID, 0x1234)
    r = m.receive(request())  # still failed: every later request fails too
    assert (r.statsn, status(r)) == (502, 0x0200)


# -- sessions: reinstatement, non-leading connections ------------------------------------------


def _login(sessions: SessionTable, *pairs: tuple[str, str], **kw: object) -> LoginMachine:
    m = machine(sessions=sessions)
    r = m.receive(op([*IDENTITY, *pairs], **kw))
    assert status(r) == 0 and m.done, m.failure_reason
    return m


def test_session_reinstatement() -> None:
    sessions = SessionTable()
    first = _login(sessions).result
    second = _login(sessions).result
    assert first is not None and second is not None
    assert second.reinstated_tsih == first.tsih and second.tsih != first.tsih
    assert sessions.find(INIT.upper(), ISID, TNAME.upper()) == second.tsih
    sessions.remove(first.tsih)
    sessions.remove(first.tsih)  # idempotent
    assert sessions.find(INIT, ISID, TNAME) == second.tsih
    other_isid = _login(sessions, isid=bytes(6)).result
    assert other_isid is not None and other_isid.reinstated_tsih is None


def test_connection_reinstatement_same_cid() -> None:
    sessions = SessionTable()
    first = _login(sessions).result
    assert first is not None
    m = machine(sessions=sessions)
    r = m.receive(op([*IDENTITY, ("MaxBurstLength", "65536")], tsih=first.tsih))
    assert status(r) == 0 and r.tsih == first.tsih
    assert ("MaxBurstLength", "Irrelevant") in keys(r)  # leading-only key
    assert m.result is not None
    assert (m.result.reinstated_cid, m.result.leading, m.result.reinstated_tsih) == (1, False, None)


def test_second_connection_beyond_max_connections() -> None:
    sessions = SessionTable()
    first = _login(sessions).result
    assert first is not None
    assert expect_failure(machine(sessions=sessions), op(IDENTITY, tsih=first.tsih, cid=2)) == (
        LoginStatus.TOO_MANY_CONNECTIONS
    )
    sessions.detach(first.tsih, 1)
    m = _login(sessions, tsih=first.tsih, cid=2)
    assert m.result is not None and m.result.reinstated_cid is None


def test_tsih_of_someone_elses_session() -> None:
    sessions = SessionTable()
    first = _login(sessions).result
    assert first is not None
    stranger = [("InitiatorName", "iqn.2024-01.org.example:mallory"), *IDENTITY[1:]]
    m = machine(sessions=sessions)
    assert expect_failure(m, op(stranger, tsih=first.tsih)) == 0x020A


def test_session_table_allocation() -> None:
    table = SessionTable()
    seen = set()
    for i in range(5):
        tsih = table.allocate_tsih()
        assert tsih and tsih not in seen
        seen.add(tsih)
        table.add(tsih, f"iqn.i:{i}", ISID, None)
    assert all(table.exists(t) for t in seen) and not table.exists(0)


def test_session_table_full_and_wraps() -> None:
    table = SessionTable()
    for i in range(0xFFFF):
        table.add(table.allocate_tsih(), f"i{i}", ISID, None)
    with pytest.raises(SessionTableFull):
        table.allocate_tsih()
    table.remove(4242)
    assert table.allocate_tsih() == 4242


# -- text continuation, both directions --------------------------------------------------------


def test_initiator_continuation() -> None:
    m = machine()
    data = encode_text([*IDENTITY, ("AuthMethod", "None")])
    cut = data.index(b"Target") + 3  # split in the middle of a key
    r = m.receive(request(data=data[:cut], transit=False, cont=True))
    assert (status(r), r.transit, r.cont, r.data, r.statsn) == (0, False, False, b"", 500)
    r = m.receive(request(data=data[cut:]))
    assert status(r) == 0 and r.transit and r.statsn == 501
    assert ("AuthMethod", "None") in keys(r)


def test_initiator_continuation_too_long() -> None:
    m = machine()
    chunk = request(data=b"X-a=" + b"b" * 8000, transit=False, cont=True)
    assert expect_failure(m, *[chunk] * 8, chunk) == 0x0200


MANY = [(f"X-com.example.key-{i:04d}-{'p' * 40}", "1") for i in range(300)]


def _long_answer(m: LoginMachine, first: LoginRequest, ack: LoginRequest) -> list[LoginResponse]:
    pieces = [m.receive(first)]
    while pieces[-1].cont:
        assert not pieces[-1].transit and status(pieces[-1]) == 0
        assert len(pieces[-1].data) == LOGIN_MAX_DATA
        pieces.append(m.receive(ack))
    return pieces


def test_target_continuation_in_operational_stage() -> None:
    m = machine()
    m.receive(request(IDENTITY))
    pieces = _long_answer(m, op(MANY), op(transit=True))
    assert len(pieces) >= 3
    assert all(p.csg == 1 for p in pieces) and [p.statsn for p in pieces] == list(
        range(501, 501 + len(pieces))
    )
    last = pieces[-1]
    assert (last.transit, last.nsg, last.cont) == (True, 3, False) and last.tsih != 0
    assert all(p.tsih == 0 for p in pieces[:-1])  # TSIH only in the final response
    answers = parse_text(b"".join(bytes(p.data) for p in pieces))
    assert answers[:-1] == [(k, "NotUnderstood") for k, _ in MANY]
    assert answers[-1] == _OUR_MRDSL
    assert m.done and m.result is not None and m.result.statsn == last.statsn + 1


def test_target_continuation_in_security_stage_then_transit() -> None:
    m = machine()
    pieces = _long_answer(m, request([*IDENTITY, *MANY]), request(transit=False))
    assert all(p.csg == 0 for p in pieces)
    assert (pieces[-1].transit, pieces[-1].nsg) == (True, 1)
    assert m.stage is Stage.OPERATIONAL


def test_acknowledgement_must_be_empty() -> None:
    m = machine()
    m.receive(request(IDENTITY))
    assert m.receive(op(MANY)).cont
    assert expect_failure(m, op([("MaxBurstLength", "512")])) == 0x0200


# -- the transition table: every (stage, kind) pair answers, never raises -------------------------

KIND_FLAGS: dict[Kind, dict[str, object]] = {
    Kind.SEC: dict(csg=0, transit=False),
    Kind.SEC_PARTIAL: dict(csg=0, transit=False, cont=True),
    Kind.SEC_TO_OP: dict(csg=0, nsg=1),
    Kind.SEC_TO_FFP: dict(csg=0, nsg=3),
    Kind.OP: dict(csg=1, transit=False),
    Kind.OP_PARTIAL: dict(csg=1, transit=False, cont=True),
    Kind.OP_TO_FFP: dict(csg=1, nsg=3),
    Kind.INVALID: dict(csg=3, nsg=3),
}


def _machine_in(stage: Stage) -> LoginMachine:
    m = machine()
    setup = {
        Stage.START: [],
        Stage.SECURITY: [request(IDENTITY, transit=False)],
        Stage.SECURITY_SENDING: [request([*IDENTITY, *MANY], transit=False)],
        Stage.OPERATIONAL: [request(IDENTITY)],
        Stage.OPERATIONAL_SENDING: [op([*IDENTITY, *MANY], transit=False)],
        Stage.FULL_FEATURE: [op(IDENTITY)],
        Stage.FAILED: [request(csg=2)],
    }[stage]
    for req in setup:
        m.receive(req)
    assert m.stage is stage
    return m


@pytest.mark.parametrize("stage", list(Stage))
@pytest.mark.parametrize("kind", list(Kind))
def test_every_stage_and_kind(stage: Stage, kind: Kind) -> None:
    m = _machine_in(stage)
    flags = KIND_FLAGS[kind]
    req = request(IDENTITY if stage is Stage.START else (), **flags)  # type: ignore[arg-type]
    assert classify(req) is kind
    resp = m.receive(req)
    assert isinstance(resp, LoginResponse)
    transition = TRANSITIONS.get((stage, kind))
    if transition is None:
        assert m.failed and status(resp) == LoginStatus.INITIATOR_ERROR
        return
    assert status(resp) == 0 and not m.failed, m.failure_reason
    assert m.stage in {
        transition.stay,
        transition.transit,
        Stage.SECURITY,
        Stage.OPERATIONAL,
        Stage.SECURITY_SENDING,
        Stage.OPERATIONAL_SENDING,
    }


def test_table_covers_only_login_stages() -> None:
    stages = {stage for stage, _ in TRANSITIONS}
    assert Stage.FULL_FEATURE not in stages and Stage.FAILED not in stages
    assert all(kind is not Kind.INVALID for _, kind in TRANSITIONS)


# -- generated request sequences ------------------------------------------------------------------

TEXTS = [
    encode_text(IDENTITY),
    encode_text([*IDENTITY, ("AuthMethod", "CHAP,None")]),
    encode_text(DISCOVERY),
    encode_text(OP_KEYS),
    encode_text([("CHAP_A", "5")]),
    encode_text([("CHAP_N", USER.user), ("CHAP_R", encode_hex(bytes(16)))]),
    b"",
    b"garbage",
    b"A=1\x00A=2\x00",
]
requests = st.builds(
    lambda csg, nsg, t, c, text, tsih, cid, vmin: request(
        csg=csg, nsg=nsg, transit=t, cont=c, data=text, tsih=tsih, cid=cid, version_min=vmin
    ),
    st.integers(0, 3),
    st.integers(0, 3),
    st.booleans(),
    st.booleans(),
    st.sampled_from(TEXTS),
    st.sampled_from([0, 0, 0, 1, 99]),
    st.sampled_from([1, 1, 2]),
    st.sampled_from([0, 0, 0, 1]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(requests, min_size=1, max_size=8), st.sampled_from([PLAIN, CHAP]))
def test_generated_sequences_never_raise(reqs: list[LoginRequest], target: TargetEntry) -> None:
    sessions = SessionTable()
    sessions.add(1, INIT, ISID, TNAME, cid=1)
    m = machine(target, sessions=sessions)
    statsn = None
    for req in reqs:
        was_over = m.done or m.failed
        resp = m.receive(req)
        assert isinstance(resp, LoginResponse)
        if statsn is not None:
            assert resp.statsn == (statsn + 1) % 2**32
        statsn = resp.statsn
        if was_over:
            assert m.failed
        if m.failed:
            assert resp.status_class in (2, 3) and not resp.transit and resp.data == b""
        else:
            assert status(resp) == 0 and not (resp.transit and resp.cont)
            assert len(resp.data) <= LOGIN_MAX_DATA
        if m.done:
            assert m.result is not None and resp.transit and resp.nsg == 3 and resp.tsih


def test_prefs_window_sets_max_cmdsn() -> None:
    m = machine(prefs=replace(TargetPreferences(), cmdsn_window=32))
    r = m.receive(op(IDENTITY, cmdsn=2**32 - 4))
    assert (r.expcmdsn, r.maxcmdsn) == (2**32 - 4, 27)
    assert m.result is not None and m.result.exp_cmdsn == 2**32 - 4
