"""ALUA (SPC-4 §5.15): TPGS in standard INQUIRY, the target port group designator of
VPD 0x83, REPORT TARGET PORT GROUPS (§6.37) and the standby state's NOT READY."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import pytest

from iscsi_vmtarget.scsi.alua import AccessState, PortGroups

if TYPE_CHECKING:
    from tests.scsi.conftest import Harness

STANDBY = (0x2, 0x04, 0x0B)  # NOT READY, LU NOT ACCESSIBLE, TARGET PORT IN STANDBY STATE
TRANSITION = (0x2, 0x04, 0x0A)


def rtpg(data_format: int = 0, alloc: int = 1024) -> bytes:
    return struct.pack(">BBIIBB", 0xA3, data_format << 5 | 0x0A, 0, alloc, 0, 0)


@pytest.fixture
def alua(scsi: Harness) -> Harness:
    scsi.lu.alua = PortGroups(2, AccessState.ACTIVE_OPTIMIZED)
    return scsi


def designators(page: bytes) -> dict[int, bytes]:
    """VPD 0x83 descriptors by designator type (the last of each type)."""
    out, at = {}, 4
    while at < len(page):
        kind, length = page[at + 1] & 0x0F, page[at + 3]
        out[kind] = page[at + 4 : at + 4 + length]
        at += 4 + length
    return out


def test_without_alua_nothing_is_announced(scsi: Harness) -> None:
    assert scsi.good(bytes([0x12, 0, 0, 0, 96, 0]))[5] & 0x30 == 0  # TPGS=00b
    assert 5 not in designators(scsi.good(bytes([0x12, 1, 0x83, 1, 0, 0])))
    scsi.check(rtpg(), (0x5, 0x24, 0x00))  # MAINTENANCE IN: service action not offered


def test_implicit_alua_and_the_group_designator(alua: Harness) -> None:
    assert alua.good(bytes([0x12, 0, 0, 0, 96, 0]))[5] & 0x30 == 0x10  # TPGS=01b
    found = designators(alua.good(bytes([0x12, 1, 0x83, 1, 0, 0])))
    assert found[5] == bytes([0, 0, 0, 2])  # TARGET PORT GROUP 2


def test_report_target_port_groups(alua: Harness) -> None:
    alua.lu.alua.set_state(AccessState.STANDBY, {1: AccessState.ACTIVE_OPTIMIZED})
    data = alua.good(rtpg())
    assert struct.unpack(">I", data[:4])[0] == len(data) - 4 == 24
    groups = {}
    for at in range(4, len(data), 12):
        state, supported, group, _, _, _, count, _, port = struct.unpack(
            ">BBHBBBBHH", data[at : at + 12]
        )
        assert supported & 0x85 == 0x85 and count == 1 and port == group
        groups[group] = state & 0x0F
    assert groups == {1: AccessState.ACTIVE_OPTIMIZED, 2: AccessState.STANDBY}
    extended = alua.good(rtpg(data_format=1))
    assert extended[4] >> 4 == 1 and extended[5] > 0  # FORMAT TYPE 1, transition time
    assert extended[8:] == data[4:]
    assert alua.good(rtpg(alloc=8)) == data[:8]
    alua.check(rtpg(data_format=2), (0x5, 0x24, 0x00))


def test_standby_refuses_media_access(alua: Harness) -> None:
    alua.good(alua.cdb10(0x2A, 0, 1), b"\x11" * 512)  # active: a write lands
    alua.lu.alua.set_state(AccessState.STANDBY)
    alua.check(alua.cdb10(0x28, 0, 1), STANDBY)  # READ(10)
    alua.check(alua.cdb10(0x2A, 0, 1), STANDBY, b"\x22" * 512)  # WRITE(10)
    alua.check(bytes(6), STANDBY)  # TEST UNIT READY
    assert alua.backend.read(0, 512) == b"\x11" * 512  # nothing written
    alua.good(bytes([0x12, 0, 0, 0, 96, 0]))  # INQUIRY, REPORT LUNS, RTPG still answer
    alua.good(bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]))
    alua.good(rtpg())
    alua.good(bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 32) + bytes(2))
    alua.lu.alua.set_state(AccessState.TRANSITIONING)
    alua.check(alua.cdb10(0x28, 0, 1), TRANSITION)
    alua.lu.alua.set_state(AccessState.ACTIVE_OPTIMIZED)
    assert alua.good(alua.cdb10(0x28, 0, 1)) == b"\x11" * 512


def test_active_non_optimized_non_owner_runs_media_access(scsi: Harness) -> None:
    """A gateway whose non-owners are active/non-optimized says so (AN_SUP) and, in
    that state, reads and writes (SPC-4 §5.15.2.4.3)."""
    scsi.lu.alua = PortGroups(2, non_owner=AccessState.ACTIVE_NON_OPTIMIZED)
    scsi.lu.alua.set_state(AccessState.ACTIVE_NON_OPTIMIZED, {1: AccessState.ACTIVE_OPTIMIZED})
    data = scsi.good(rtpg())
    assert [(data[at] & 0x0F, data[at + 1]) for at in (4, 16)] == [(0x0, 0x87), (0x1, 0x87)]
    scsi.good(scsi.cdb10(0x2A, 0, 1), b"\x33" * 512)
    assert scsi.good(scsi.cdb10(0x28, 0, 1)) == b"\x33" * 512
    scsi.good(bytes(6))  # TEST UNIT READY
    assert PortGroups(2).report(False)[5] == 0x85  # standby non-owners: no AN_SUP
    with pytest.raises(ValueError, match="UNAVAILABLE"):
        PortGroups(2, non_owner=AccessState.UNAVAILABLE)
