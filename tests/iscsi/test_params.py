"""RFC 7143 §6.2 / §13 negotiation: the key table and the Negotiator."""

from __future__ import annotations

from dataclasses import fields

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iscsi_vmtarget.iscsi.params import (
    IRRELEVANCE_RULES,
    KEY_TABLE,
    KEYS,
    KeyRow,
    KeyType,
    NegotiationError,
    Negotiator,
    Phase,
    ResultFunction,
    SessionParams,
    TargetPreferences,
)
from iscsi_vmtarget.iscsi.text import TextFormatError, parse_boolean, parse_list, parse_number

PREFS = TargetPreferences()


def negotiate(*pdus: list[tuple[str, str]], **kwargs: object) -> tuple[Negotiator, list]:
    n = Negotiator(PREFS, **kwargs)  # type: ignore[arg-type]
    answers = [n.negotiate(pdu) for pdu in pdus]
    return n, answers


# -- the table itself ----------------------------------------------------------------------


def test_table_is_consistent() -> None:
    prefs_fields = {f.name for f in fields(TargetPreferences)}
    assert len(KEYS) == len(KEY_TABLE)
    for row in KEY_TABLE:
        assert row.section.startswith("§")
        if row.ours is not None:
            assert row.ours in prefs_fields or row.ours == "auth_methods", row.name
        assert set(row.irrelevant_when) <= IRRELEVANCE_RULES.keys()
        assert row.at_most is None or row.at_most in KEYS
        if row.type in (KeyType.BOOLEAN, KeyType.NUMERIC, KeyType.LIST):
            assert row.ours is not None and row.default is not None, row.name
        if row.type is KeyType.NUMERIC:
            assert row.low <= int(row.default or 0) <= row.high
    # dependencies are evaluated first (table order is evaluation order)
    order = [row.name for row in KEY_TABLE]
    for later, earlier in [
        ("FirstBurstLength", "MaxBurstLength"),
        ("FirstBurstLength", "InitialR2T"),
        ("FirstBurstLength", "ImmediateData"),
        ("MaxBurstLength", "SessionType"),
    ]:
        assert order.index(earlier) < order.index(later)


def test_every_brief_key_is_in_the_table() -> None:
    for key in (
        "HeaderDigest DataDigest MaxConnections SendTargets TargetName InitiatorName "
        "TargetAlias InitiatorAlias TargetAddress TargetPortalGroupTag InitialR2T "
        "ImmediateData MaxRecvDataSegmentLength MaxBurstLength FirstBurstLength "
        "DefaultTime2Wait DefaultTime2Retain MaxOutstandingR2T DataPDUInOrder "
        "DataSequenceInOrder ErrorRecoveryLevel SessionType AuthMethod"
    ).split():
        assert key in KEYS


@pytest.mark.parametrize(
    "bad",
    [
        {"max_burst_length": 65536},  # below the RFC default: could not be enforced
        {"first_burst_length": 2048},
        {"first_burst_length": 2_000_000, "max_burst_length": 1_048_576},
        {"default_time2wait": 10},  # Max key above its default
        {"error_recovery_level": 3},
        {"header_digests": ("MD5",)},
        {"header_digests": ()},
        {"max_recv_data_segment_length": 100},
        {"cmdsn_window": 0},
        {"chap_challenge_length": 8},
    ],
)
def test_preferences_are_checked_against_the_table(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        TargetPreferences(**bad)  # type: ignore[arg-type]


# -- defined behaviour -----------------------------------------------------------------------


def test_defaults_when_nothing_is_offered() -> None:
    n, _ = negotiate([("InitiatorName", "iqn.i")])
    assert n.session_params() == SessionParams(initiator_name="iqn.i")


def test_typical_open_iscsi_offer() -> None:
    n, (answers,) = negotiate(
        [
            ("HeaderDigest", "None"),
            ("DataDigest", "None"),
            ("MaxConnections", "1"),
            ("InitialR2T", "Yes"),
            ("ImmediateData", "Yes"),
            ("MaxRecvDataSegmentLength", "262144"),
            ("MaxBurstLength", "16776192"),
            ("FirstBurstLength", "262144"),
            ("DefaultTime2Wait", "0"),
            ("DefaultTime2Retain", "0"),
            ("MaxOutstandingR2T", "1"),
            ("DataPDUInOrder", "Yes"),
            ("DataSequenceInOrder", "Yes"),
            ("ErrorRecoveryLevel", "0"),
            ("IFMarker", "No"),
            ("OFMarker", "No"),
        ]
    )
    assert answers == [
        ("HeaderDigest", "None"),
        ("DataDigest", "None"),
        ("MaxConnections", "1"),
        ("InitialR2T", "Yes"),
        ("ImmediateData", "Yes"),
        ("MaxBurstLength", "1048576"),
        ("FirstBurstLength", "262144"),
        ("DefaultTime2Wait", "2"),
        ("DefaultTime2Retain", "0"),
        ("MaxOutstandingR2T", "1"),
        ("DataPDUInOrder", "Yes"),
        ("DataSequenceInOrder", "Yes"),
        ("ErrorRecoveryLevel", "0"),
        ("IFMarker", "Reject"),  # §13.25: SHOULD answer Reject, never NotUnderstood
        ("OFMarker", "Reject"),
    ]
    assert n.operational_declarations() == [("MaxRecvDataSegmentLength", "262144")]
    assert n.operational_declarations() == []  # declared once
    p = n.session_params()
    assert (p.max_recv_data_segment_length, p.target_max_recv_data_segment_length) == (
        262144,
        262144,
    )
    assert (p.max_burst_length, p.first_burst_length, p.initial_r2t) == (1048576, 262144, True)
    assert p.default_time2wait == 2 and p.default_time2retain == 0


@pytest.mark.parametrize(
    ("offer", "prefs", "answer", "flag"),
    [
        ("CRC32C,None", ("None", "CRC32C"), "CRC32C", True),
        ("None,CRC32C", ("None", "CRC32C"), "None", False),
        ("CRC32C", ("None",), "Reject", False),
        ("CRC32C,None", ("None",), "None", False),
        ("MD5,CRC32C", ("CRC32C",), "CRC32C", True),
        ("None,,CRC32C", ("None", "CRC32C"), "Reject", False),
    ],
)
def test_digest_choice(offer: str, prefs: tuple[str, ...], answer: str, flag: bool) -> None:
    n = Negotiator(TargetPreferences(header_digests=prefs))
    assert n.negotiate([("HeaderDigest", offer)]) == [("HeaderDigest", answer)]
    assert n.session_params().header_digest is flag


@pytest.mark.parametrize(
    ("key", "offer", "answer"),
    [
        ("ErrorRecoveryLevel", "2", "0"),
        ("MaxConnections", "8", "1"),
        ("MaxOutstandingR2T", "16", "1"),
        ("DefaultTime2Wait", "20", "20"),
        ("MaxBurstLength", "0x8000", "32768"),
        ("MaxBurstLength", "511", "Reject"),
        ("MaxBurstLength", "16777216", "Reject"),
        ("MaxBurstLength", "-1", "Reject"),
        ("MaxBurstLength", "big", "Reject"),
        ("ErrorRecoveryLevel", "3", "Reject"),
        ("ImmediateData", "No", "No"),
        ("InitialR2T", "No", "No"),
        ("ImmediateData", "maybe", "Reject"),
        ("iSCSIProtocolLevel", "2", "1"),
        ("TaskReporting", "FastAbort,RFC3720", "RFC3720"),
        ("TaskReporting", "FastAbort", "Reject"),
        ("OFMarkInt", "2048~8192", "Reject"),
        ("X-com.example.thing", "1", "NotUnderstood"),
        ("X#NodeArchitecture", "Linux", "NotUnderstood"),
        ("NoSuchKey", "1", "NotUnderstood"),
    ],
)
def test_single_answers(key: str, offer: str, answer: str) -> None:
    _, (answers,) = negotiate([(key, offer)])
    assert answers == [(key, answer)]


def test_rejected_key_keeps_its_default() -> None:
    n, _ = negotiate([("MaxBurstLength", "1")])
    assert n.session_params().max_burst_length == 262144


def test_or_function_outcome_yes_wins() -> None:
    n = Negotiator(TargetPreferences(data_pdu_in_order=False))
    assert n.negotiate([("DataPDUInOrder", "No")]) == [("DataPDUInOrder", "No")]
    n = Negotiator(TargetPreferences(initial_r2t=True))
    assert n.negotiate([("InitialR2T", "No")]) == [("InitialR2T", "Yes")]


def test_first_burst_irrelevant_without_unsolicited_data_same_pdu() -> None:
    # FirstBurstLength comes first in the PDU; table order settles its dependencies first.
    n = Negotiator(TargetPreferences(initial_r2t=True, immediate_data=False))
    answers = n.negotiate(
        [("FirstBurstLength", "65536"), ("InitialR2T", "Yes"), ("ImmediateData", "Yes")]
    )
    assert answers == [
        ("FirstBurstLength", "Irrelevant"),
        ("InitialR2T", "Yes"),
        ("ImmediateData", "No"),
    ]


def test_first_burst_clamped_to_max_burst() -> None:
    _, (answers,) = negotiate([("FirstBurstLength", "262144"), ("MaxBurstLength", "16384")])
    assert answers == [("FirstBurstLength", "16384"), ("MaxBurstLength", "16384")]
    # MaxBurstLength lowered in a later PDU: the outcome is clamped (§13.14 integrity rule)
    n, _ = negotiate([("FirstBurstLength", "262144")], [("MaxBurstLength", "4096")])
    p = n.session_params()
    assert (p.first_burst_length, p.max_burst_length) == (4096, 4096)


def test_discovery_makes_data_keys_irrelevant() -> None:
    n, (answers,) = negotiate(
        [
            ("MaxBurstLength", "65536"),
            ("SessionType", "Discovery"),
            ("ImmediateData", "Yes"),
            ("MaxConnections", "1"),
            ("HeaderDigest", "None"),
            ("ErrorRecoveryLevel", "0"),
        ]
    )
    assert answers == [
        ("MaxBurstLength", "Irrelevant"),
        ("ImmediateData", "Irrelevant"),
        ("MaxConnections", "Irrelevant"),
        ("HeaderDigest", "None"),
        ("ErrorRecoveryLevel", "0"),
    ]
    assert n.session_params().session_type == "Discovery"


def test_leading_only_keys_irrelevant_on_non_leading_connection() -> None:
    _, (answers,) = negotiate(
        [("MaxBurstLength", "65536"), ("HeaderDigest", "None")], leading=False
    )
    assert answers == [("MaxBurstLength", "Irrelevant"), ("HeaderDigest", "None")]


def test_declarations() -> None:
    n, (answers,) = negotiate(
        [
            ("InitiatorName", "iqn.2024-01.org.example:i"),
            ("InitiatorAlias", "host"),
            ("TargetName", "iqn.t"),
            ("MaxRecvDataSegmentLength", "0x10000"),
            ("SessionType", "Normal"),
        ]
    )
    assert answers == []
    p = n.session_params()
    assert (p.initiator_name, p.initiator_alias, p.target_name) == (
        "iqn.2024-01.org.example:i",
        "host",
        "iqn.t",
    )
    assert p.max_recv_data_segment_length == 65536
    assert p.target_max_recv_data_segment_length == 8192  # not declared yet


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("MaxRecvDataSegmentLength", "511"),
        ("MaxRecvDataSegmentLength", "16777216"),
        ("SessionType", "Bogus"),
        ("InitiatorName", ""),
        ("TargetName", "x" * 224),
    ],
)
def test_bad_declarations_are_rejected(key: str, value: str) -> None:
    n, (answers,) = negotiate([(key, value)])
    assert answers == [(key, "Reject")]
    assert n.session_params() == SessionParams()


@pytest.mark.parametrize(
    "pdus",
    [
        [[("MaxBurstLength", "4096")], [("MaxBurstLength", "4096")]],
        [[("X-foo", "1")], [("X-foo", "1")]],
        [[("MaxBurstLength", "1"), ("MaxBurstLength", "2")]],
        [[("TargetAlias", "me")]],  # a target-only key from the initiator
        [[("TargetPortalGroupTag", "1")]],
        [[("TargetAddress", "1.2.3.4:3260,1")]],
        [[("SendTargets", "All")]],  # full feature phase only
    ],
)
def test_protocol_violations(pdus: list[list[tuple[str, str]]]) -> None:
    with pytest.raises(NegotiationError) as info:
        negotiate(*pdus)
    assert info.value.status == 0x0200


def test_identical_redeclaration_is_ignored() -> None:
    # libiscsi restates its names in the operational stage after CHAP
    ident = [("InitiatorName", "iqn.i"), ("SessionType", "Normal"), ("TargetName", "iqn.t")]
    _, answers = negotiate(ident, ident)
    assert answers == [[], []]
    with pytest.raises(NegotiationError):
        negotiate(ident, [("TargetName", "iqn.other")])


def test_target_declares_once() -> None:
    n = Negotiator(PREFS)
    assert n.declare("TargetPortalGroupTag", "1") == ("TargetPortalGroupTag", "1")
    assert n.declared("TargetPortalGroupTag")
    with pytest.raises(ValueError):
        n.declare("TargetPortalGroupTag", "1")


def test_auth_method_choice_uses_runtime_set() -> None:
    n = Negotiator(PREFS, auth_methods=("CHAP",))
    assert n.negotiate([("AuthMethod", "None,CHAP")]) == [("AuthMethod", "CHAP")]
    n = Negotiator(PREFS, auth_methods=("None",))
    assert n.negotiate([("AuthMethod", "CHAP,SRP")]) == [("AuthMethod", "Reject")]


# -- generated offers: every answer is legal for its row ---------------------------------------

SPECIAL = ["X-com.example.a", "X#NodeArchitecture", "Unknown", "CHAP_Z", "targetname"]
key_strategy = st.one_of(st.sampled_from([row.name for row in KEY_TABLE]), st.sampled_from(SPECIAL))
SAMPLE_VALUES = (
    "Yes No None CRC32C CRC32C,None None,CRC32C CHAP,None KRB5 Discovery Normal RFC3720 "
    "FastAbort,RFC3720 Reject Irrelevant 0x 0b iqn.2024-01.org.example:x , None,,CRC32C"
).split() + [""]
value_strategy = st.one_of(
    st.sampled_from(SAMPLE_VALUES),
    st.integers(min_value=-5, max_value=2**25).map(str),
    st.integers(min_value=0, max_value=2**25).map(hex),
    st.text(max_size=12),
)
pdu_strategy = st.lists(st.tuples(key_strategy, value_strategy), max_size=10)


def _number(value: str) -> int | None:
    try:
        return parse_number(value)
    except TextFormatError:
        return None


def _assert_legal(row: KeyRow | None, offered: str, answer: str | None, leading: bool) -> None:
    if row is None:
        assert answer == "NotUnderstood"
        return
    if answer == "Irrelevant":
        assert row.irrelevant_when or (not leading and row.phase is Phase.LEADING_ONLY)
        return
    if row.type is KeyType.DECLARATIVE:
        assert answer in (None, "Reject")
        return
    if row.type is KeyType.OBSOLETE:
        assert answer == "Reject"
        return
    assert answer is not None
    if answer == "Reject":
        return
    if row.type is KeyType.BOOLEAN:
        got, offer = parse_boolean(answer), parse_boolean(offered)
        if row.result is ResultFunction.AND:
            assert got <= offer  # Yes only if the offer said Yes
        else:
            assert got >= offer  # No only if the offer said No
    elif row.type is KeyType.NUMERIC:
        got, offer = parse_number(answer), _number(offered)
        assert offer is not None and row.low <= got <= row.high
        assert got <= offer if row.result is ResultFunction.MIN else got >= offer
    elif row.type is KeyType.LIST:
        assert answer in parse_list(offered) and answer in row.values


@settings(max_examples=300, deadline=None)
@given(st.lists(pdu_strategy, min_size=1, max_size=4), st.booleans())
def test_generated_offers_get_legal_answers(pdus: list, leading: bool) -> None:
    n = Negotiator(PREFS, leading=leading, auth_methods=("CHAP", "None"))
    for pdu in pdus:
        try:
            answers = n.negotiate(pdu)
        except NegotiationError as exc:
            assert exc.status == 0x0200
            break
        answered = dict(answers)
        assert len(answered) == len(answers)
        assert [k for k, _ in answers] == [k for k, _ in pdu if k in answered]
        for key, value in pdu:
            _assert_legal(KEYS.get(key), value, answered.get(key), leading)
    p = n.session_params()
    assert 512 <= p.first_burst_length <= p.max_burst_length <= 2**24 - 1
    assert p.error_recovery_level == 0 and p.max_connections == 1
    assert p.session_type in ("Normal", "Discovery")
    assert 512 <= p.max_recv_data_segment_length < 2**24
