"""iSCSI names (RFC 7143 §4.2.7, RFC 3722): one normal form; ACL matching and login use it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iscsi_vmtarget.iscsi.directory import AccessRule, TargetEntry
from iscsi_vmtarget.iscsi.login import LoginStatus
from iscsi_vmtarget.iscsi.names import IscsiNameError, name_key, normalize_name, same_node
from tests.iscsi.test_login import ISID, TNAME, expect_failure, machine, op, request, status

ACL_NAME = "iqn.2026-11.org.example:host1"
EUI = "eui.02004567a425678d"
NAA16 = "naa.52004567ba64678d"
NAA32 = "naa.62004567ba64678d0123456789abcdef"


@pytest.mark.parametrize(
    ("given_name", "normal"),
    [
        (ACL_NAME, ACL_NAME),
        (ACL_NAME.upper(), ACL_NAME),  # B.2 case folding
        ("Iqn.2026-11.Org.Example:Host1", ACL_NAME),
        ("iqn.2026-11.org.example:\u00adhost1", ACL_NAME),  # B.1: soft hyphen maps to nothing
        ("iqn.2026-11.org.example:host\u200b1", ACL_NAME),  # B.1: zero-width space
        ("\uff49\uff51\uff4e.2026-11.org.example:host1", ACL_NAME),  # NFKC: fullwidth
        ("EUI.02004567A425678D", EUI),
        (NAA16.upper(), NAA16),
        (NAA32, NAA32),
        ("iqn.2026-11.de.example:straße", "iqn.2026-11.de.example:strasse"),
    ],
)
def test_normal_form(given_name: str, normal: str) -> None:
    assert normalize_name(given_name) == normal
    assert normalize_name(normal) == normal  # idempotent


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (" " + ACL_NAME, "a space"),
        (ACL_NAME + " ", "a space"),
        (ACL_NAME + "\t", "a control character"),
        (ACL_NAME + "\n", "a control character"),
        (ACL_NAME + "\x00", "a control character"),
        ("iqn.2026-11.org.example:host\u00a01", "a space"),  # no-break space (C.1.2)
        ("iqn.2026-11.org.example:host\u20281", "a control character"),  # line separator
        ("iqn.2026-11.org.example:host_1", "iSCSI names exclude"),  # RFC 3722 §6.2
        ("iqn.2026-11.org.example:host/1", "iSCSI names exclude"),
        ("iqn.2026-11.org.example:host\u30021", "ideographic full stop"),
        ("iqn.2026-11.org.example:host\ue0001", "private-use"),
        ("iqn.2026-11.org.example:\u202ehost1", "display-changing"),  # RTL override
        ("iqn.2026-11.org.example:\u05d0", "right-to-left"),
        ("iqn.2026-11.org.example:\U000e0041", "tagging"),
        ("iqn.", "is not iqn."),
        ("host1", "is not iqn."),
        ("eui.02004567a425678", "is not iqn."),  # 15 hex digits
        ("eui.02004567a425678dd", "is not iqn."),
        ("eui.02004567a425678g", "is not iqn."),
        ("naa.62004567ba64678d01", "is not iqn."),  # neither 16 nor 32 digits
        ("iqn." + "x" * 220, "longer than 223 bytes"),
    ],
)
def test_not_a_name(bad: str, why: str) -> None:
    with pytest.raises(IscsiNameError, match=why):
        normalize_name(bad)
    assert name_key(bad) is None
    assert not same_node(bad, bad)  # a non-name matches nothing, not even itself


@given(st.text(max_size=40))
def test_an_acl_admits_exactly_its_normal_form(text: str) -> None:
    """For any string, an ACL for ACL_NAME admits it iff its normal form IS ACL_NAME."""
    rule = AccessRule(ACL_NAME)
    assert rule.matches(text, None) == (name_key(text) == ACL_NAME)
    key = name_key(text)
    if key is not None:
        assert normalize_name(key) == key


@pytest.mark.parametrize(
    ("acl", "other"),
    [
        (EUI, "eui.02004567a425678e"),  # one digit off
        (EUI, "naa." + EUI[4:]),  # same digits, another type
        (NAA16, "eui." + NAA16[4:]),
        (NAA32, NAA32[:20]),  # a prefix of it
        (ACL_NAME, ACL_NAME + "0"),
        (ACL_NAME, ACL_NAME[:-1]),
    ],
)
def test_other_nodes_do_not_match(acl: str, other: str) -> None:
    assert not AccessRule(acl).matches(other, None)
    assert not AccessRule(acl).matches(other.upper(), None)
    assert AccessRule(acl).matches(acl.upper(), None)


# -- at login -------------------------------------------------------------------------------

MASKED = TargetEntry(TNAME, acls=(AccessRule(ACL_NAME),))


@pytest.mark.parametrize(
    "bad",
    [" " + ACL_NAME, ACL_NAME + " ", ACL_NAME + "\t", "iqn.2026-11.org.example:host_1", "host1"],
)
def test_login_refuses_what_is_no_name(bad: str) -> None:
    m = machine(MASKED)
    ident = [("InitiatorName", bad), ("SessionType", "Normal"), ("TargetName", TNAME)]
    assert expect_failure(m, request(ident)) == LoginStatus.INITIATOR_ERROR
    assert m.failure_reason is not None and "InitiatorName" in m.failure_reason
    # ... for a discovery session too
    m = machine(MASKED)
    pairs = [("InitiatorName", bad), ("SessionType", "Discovery")]
    assert expect_failure(m, request(pairs)) == LoginStatus.INITIATOR_ERROR


def test_login_knows_the_initiator_by_its_normal_form() -> None:
    m = machine(MASKED)
    ident = [("InitiatorName", ACL_NAME.upper()), ("SessionType", "Normal"), ("TargetName", TNAME)]
    r = m.receive(op(ident))
    assert status(r) == 0 and m.result is not None, m.failure_reason
    assert m.result.params.initiator_name == ACL_NAME  # what PR, logs and SendTargets see
    assert m.sessions.find(ACL_NAME, ISID, TNAME) == m.result.tsih


def test_login_of_another_node_is_authorization_failure() -> None:
    for other in (ACL_NAME + "0", "eui.02004567a425678d"):
        ident = [("InitiatorName", other), ("SessionType", "Normal"), ("TargetName", TNAME)]
        assert expect_failure(machine(MASKED), request(ident)) == LoginStatus.AUTHORIZATION_FAILURE
