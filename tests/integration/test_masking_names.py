"""Masking against initiator-name variants and every REPORT LUNS select value, over the
wire to the real server: a name is its RFC 3722 normal form (``IQN.X`` is the node
``iqn.x`` and sees exactly its LUNs), a string with white space or excluded characters
is no name and is refused at login (02/00), an eui./naa. name that differs in one digit
or in its type is another node (02/02). No variant ever sees a LUN that is not its own:
not in SendTargets, not at login, not in REPORT LUNS, not by addressing it."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from iscsi_vmtarget.client import Initiator, LoginFailed
from iscsi_vmtarget.client.initiator import ScsiResult
from tests.conftest import RunningTarget, file_luns, run_tool, start_with_config

A = "iqn.2026-11.org.iscsi-vmtarget:masked"
OPEN = "iqn.2026-11.org.iscsi-vmtarget:open"
H1 = "iqn.2026-11.org.example:host1"
EUI = "eui.02004567a425678d"
NAA = "naa.62004567ba64678d0123456789abcdef"
CONFIG = (
    """
[[target]]
name = "{a}"
"""
    + file_luns("a", "1M", "2M", "3M")
    + """[[target.acl]]
initiator = "{h1}"
luns = [0]
[[target.acl]]
initiator = "{eui}"
luns = [{{number = 3, lun = 1}}]
[[target.acl]]
initiator = "{naa}"
luns = [{{number = 7, lun = 2}}]

[[target]]
name = "{open}"
[[target.lun]]
number = 0
path = "{d}/open.img"
size = "1M"
"""
)
#: node -> the LUNs (number shown -> bytes) its ACL maps on target A
VIEWS = {H1: {0: 1 << 20}, EUI: {3: 2 << 20}, NAA: {7: 3 << 20}}
#: variants that ARE the node (RFC 3722 normal form equal)
SAME_NODE = [
    (H1, H1.upper()),
    (H1, "Iqn.2026-11.Org.Example:HOST1"),
    (H1, "iqn.2026-11.org.example:\u00adhost1"),  # soft hyphen maps to nothing
    (EUI, EUI.upper()),
    (NAA, "NAA." + NAA[4:].upper()),
]
#: strings that name no node: refused at login, discovery included (02/00)
NOT_A_NAME = [
    " " + H1,
    H1 + " ",
    H1 + "\t",
    " " + H1 + " ",
    H1 + "\u00a0",  # no-break space
    "iqn.2026-11.org.example:host_1",
    "iqn.2026-11.org.example:host1\u202e",  # right-to-left override
    "eui.02004567a425678",  # 15 digits
    "naa.62004567ba64678d01",  # neither 16 nor 32 digits
]
#: other nodes: no ACL on A (02/02), SendTargets shows them only the open target
OTHER_NODES = [
    "eui.02004567a425678e",  # one digit off
    "naa." + EUI[4:],  # EUI's digits as an naa. name
    "eui." + NAA[4:20],  # NAA's first 16 digits as an eui. name
    NAA[:-1] + "0",
    H1 + "0",
    "iqn.2026-11.org.example",  # a prefix
]
SELECT_LISTS = (0x00, 0x02, 0x11)  # our LUs are ordinary, non-conglomerate LUs
SELECT_EMPTY = (0x01, 0x10, 0x12)  # well-known, administrative, subsidiary: none
SELECT_INVALID = (0x03, 0x13, 0xF8, 0xFF)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningTarget]:
    tmp = tmp_path_factory.mktemp("names")
    t = start_with_config(tmp, CONFIG.format(a=A, open=OPEN, h1=H1, eui=EUI, naa=NAA, d=tmp))
    yield t
    t.stop()


def login(t: RunningTarget, name: str, target: str | None) -> Initiator:
    ini = Initiator(port=t.port, initiator_name=name, target_name=target)
    try:
        ini.login()
    except BaseException:
        ini.close()
        raise
    return ini


def login_status(t: RunningTarget, name: str, target: str | None) -> tuple[int, int]:
    try:
        login(t, name, target).close()
    except LoginFailed as exc:
        return exc.status_class, exc.status_detail
    return 0, 0


def report_luns(ini: Initiator, select: int) -> ScsiResult:
    cdb = bytes([0xA0, 0, select, 0, 0, 0]) + (4096).to_bytes(4, "big") + bytes(2)
    return ini.command(cdb, read_length=4096)


def listed(result: ScsiResult) -> list[int]:
    assert result.status == 0, result
    n = int.from_bytes(result.data[:4], "big") // 8
    return [int.from_bytes(result.data[8 + 8 * i : 10 + 8 * i], "big") & 0x3FFF for i in range(n)]


def check_view(ini: Initiator, view: dict[int, int]) -> int:
    """Everything one session of target A may learn of its LUNs; returns the checks."""
    checks = 0
    for select in SELECT_LISTS:
        assert listed(report_luns(ini, select)) == sorted(view)
        checks += 1
    for select in SELECT_EMPTY:
        assert listed(report_luns(ini, select)) == []
        checks += 1
    for select in SELECT_INVALID:
        bad = report_luns(ini, select)
        assert (bad.status, bad.sense_key, bad.asc_ascq) == (2, 5, (0x24, 0x00))
        checks += 1
    for lun in (0, 1, 2, 3, 5, 7, 255, 16383):
        ini.command(bytes(6), lun=lun)  # a mapped LUN's power-on unit attention first
        cap = ini.command(bytes([0x25]) + bytes(9), lun=lun, read_length=8)
        if lun in view:
            assert cap.status == 0 and int.from_bytes(cap.data[:4], "big") + 1 == view[lun] // 512
        else:
            assert (cap.status, cap.sense_key, cap.asc_ascq) == (2, 5, (0x25, 0x00))
        checks += 1
    return checks


def send_targets(t: RunningTarget, name: str) -> list[str]:
    with login(t, name, None) as discovery:
        return [v for k, v in discovery.send_targets("All") if k == "TargetName"]


@pytest.mark.parametrize(("node", "variant"), SAME_NODE)
def test_a_variant_of_a_node_sees_exactly_its_luns(
    target: RunningTarget, node: str, variant: str
) -> None:
    assert send_targets(target, variant) == [A, OPEN]
    with login(target, variant, A) as ini:
        check_view(ini, VIEWS[node])


@pytest.mark.parametrize("bad", NOT_A_NAME)
def test_what_is_no_name_is_refused_at_login(target: RunningTarget, bad: str) -> None:
    for session_target in (A, OPEN, None):  # normal sessions and discovery alike
        assert login_status(target, bad, session_target) == (2, 0)
    assert "InitiatorName" in target.log() and "RFC" in target.log()


@pytest.mark.parametrize("other", OTHER_NODES)
def test_another_node_sees_no_lun_of_the_masked_target(target: RunningTarget, other: str) -> None:
    assert send_targets(target, other) == [OPEN]
    assert login_status(target, other, A) == (2, 2)
    with login(target, other, OPEN) as ini:  # the open target shows its own LUN only
        ini.command(bytes(6))
        assert listed(report_luns(ini, 0)) == [0]


def test_each_node_sees_its_own_map(target: RunningTarget) -> None:
    for node, view in VIEWS.items():
        with login(target, node, A) as ini:
            assert check_view(ini, view) == 18


@pytest.mark.parametrize(
    "method", ["00", "40", "80", "d2"], ids=["peripheral", "flat", "logical-unit", "extended"]
)
def test_an_unmapped_lun_is_not_reached_in_any_addressing_method(
    target: RunningTarget, method: str
) -> None:
    """host1 is mapped LUN 0 only; target A's unit 1 stays out of reach however its
    number is written, and LUN 0 is host1's 1 MiB unit in every method."""

    def lun(n: int) -> bytes:
        if method == "d2":  # extended flat space: the number in bytes 1-3
            return bytes([0xD2]) + n.to_bytes(3, "big") + bytes(4)
        return bytes([int(method, 16), n]) + bytes(6)

    with login(target, H1, A) as ini:
        ini.command(bytes(6))  # LUN 0's power-on unit attention
        cap = ini.command(bytes([0x25]) + bytes(9), read_length=8, lun_raw=lun(0))
        assert cap.status == 0 and int.from_bytes(cap.data[:4], "big") + 1 == (1 << 20) // 512
        for n in (1, 2, 3, 7):
            cap = ini.command(bytes([0x25]) + bytes(9), read_length=8, lun_raw=lun(n))
            assert (cap.status, cap.sense_key, cap.asc_ascq) == (2, 5, (0x25, 0x00))


@pytest.mark.interop
def test_libiscsi_tools_with_name_variants(target: RunningTarget) -> None:
    """iscsi-ls and iscsi-inq with ``-i`` variants: the upper-case name lists and reads
    host1's LUN 0 only; a name with white space or an underscore gets nothing."""

    def ls(name: str) -> dict[str, list[int]]:
        out = run_tool("iscsi-ls", "-i", name, "-s", f"iscsi://{target.portal}", check=False)
        seen: dict[str, list[int]] = {}
        for line in out.stdout.splitlines():
            if m := re.match(r"Target:(\S+) Portal:", line):
                seen[m.group(1)] = current = []
            elif m := re.match(r"Lun:(\d+)", line):
                current.append(int(m.group(1)))
        return seen

    assert ls(H1.upper()) == {A: [0], OPEN: [0]}
    assert ls(EUI.upper()) == {A: [3], OPEN: [0]}
    assert ls(OTHER_NODES[0]) == {OPEN: [0]}
    for bad in (H1 + " ", "iqn.2026-11.org.example:host_1"):
        assert ls(bad) == {}
    url = f"iscsi://{target.portal}/{A}/"
    assert run_tool("iscsi-inq", "-i", H1.upper(), url + "0").returncode == 0
    for name, lun in ((H1.upper(), 3), (EUI.upper(), 0), (H1 + "\t", 0)):
        assert run_tool("iscsi-inq", "-i", name, url + str(lun), check=False).returncode != 0
