"""SendTargets (RFC 7143 §13.3, Appendix C)."""

from __future__ import annotations

from iscsi_vmtarget.iscsi.directory import Portal, StaticDirectory, TargetEntry
from iscsi_vmtarget.iscsi.send_targets import send_targets

INIT = "iqn.2024-01.org.example:host1"
OTHER = "iqn.2024-01.org.example:host2"
T1 = TargetEntry(
    "iqn.2024-01.org.example:disk1",
    portals=(Portal("192.0.2.1", 3260, 1), Portal("2001:db8::1", 3261, 2)),
)
T2 = TargetEntry("iqn.2024-01.org.example:disk2", tpgt=7)  # no portals configured
T3 = TargetEntry(
    "iqn.2024-01.org.example:secret",
    portals=(Portal("192.0.2.1", 3260, 1),),
    initiators=frozenset({OTHER}),
)
DIRECTORY = StaticDirectory([T1, T2, T3])
HERE = Portal("127.0.0.1", 3260, 1)


def test_all_in_discovery_session_lists_visible_targets() -> None:
    assert send_targets(DIRECTORY, INIT, "All", None, fallback_portal=HERE) == [
        ("TargetName", T1.name),
        ("TargetAddress", "192.0.2.1:3260,1"),
        ("TargetAddress", "[2001:db8::1]:3261,2"),
        ("TargetName", T2.name),
        ("TargetAddress", "127.0.0.1:3260,7"),
    ]


def test_masked_target_visible_to_its_initiator_only() -> None:
    names = [v for k, v in send_targets(DIRECTORY, OTHER, "All", None) if k == "TargetName"]
    assert T3.name in names
    assert send_targets(DIRECTORY, INIT, T3.name, None) == []


def test_target_without_portals_and_no_fallback_has_no_address() -> None:
    assert send_targets(DIRECTORY, INIT, T2.name, None) == [("TargetName", T2.name)]


def test_named_target_case_insensitive() -> None:
    assert send_targets(DIRECTORY, INIT, T1.name.upper(), None)[0] == ("TargetName", T1.name)


def test_unknown_target_gives_empty_answer() -> None:
    assert send_targets(DIRECTORY, INIT, "iqn.2024-01.org.example:nope", None) == []


def test_empty_value_means_the_session_target() -> None:
    assert send_targets(DIRECTORY, INIT, "", T1.name) == [
        ("TargetName", T1.name),
        ("TargetAddress", "192.0.2.1:3260,1"),
        ("TargetAddress", "[2001:db8::1]:3261,2"),
    ]


def test_all_in_normal_session_and_empty_in_discovery_are_rejected() -> None:
    assert send_targets(DIRECTORY, INIT, "All", T1.name) == [("SendTargets", "Reject")]
    assert send_targets(DIRECTORY, INIT, "", None) == [("SendTargets", "Reject")]
