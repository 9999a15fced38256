"""Persistent reservations (SPC-4 §5.13, §6.15, §6.16) and SPC-2 RESERVE/RELEASE:
every PERSISTENT RESERVE OUT service action, the conflict table for all six types,
unit attentions, APTPL persistence, SPEC_I_PT and ALL_TG_PT."""

from __future__ import annotations

import struct
import uuid
from typing import TYPE_CHECKING

import pytest

from iscsi_vmtarget.scsi import (
    LogicalUnit,
    Nexus,
    ScsiTarget,
    Status,
    TmfFunction,
    UnitIdentity,
)
from iscsi_vmtarget.scsi.pr_store import FilePrStore, MemoryPrStore
from iscsi_vmtarget.storage import MemoryBackend

if TYPE_CHECKING:
    from pathlib import Path

    from tests.scsi.conftest import Harness

BLOCK = 512
INVALID_FIELD = (0x5, 0x24, 0x00)
INVALID_PARAM = (0x5, 0x26, 0x00)
PARAM_LENGTH = (0x5, 0x1A, 0x00)
INVALID_RELEASE = (0x5, 0x26, 0x04)
RESERVATIONS_PREEMPTED = (0x6, 0x2A, 0x03)
RESERVATIONS_RELEASED = (0x6, 0x2A, 0x04)
REGISTRATIONS_PREEMPTED = (0x6, 0x2A, 0x05)
POWER_ON = (0x6, 0x29, 0x00)
LU_RESET = (0x6, 0x29, 0x03)

REGISTER, RESERVE, RELEASE, CLEAR, PREEMPT, PREEMPT_ABORT, REGISTER_IGNORE, MOVE = range(8)
WE, EA, WE_RO, EA_RO, WE_AR, EA_AR = 1, 3, 5, 6, 7, 8
TUR = bytes(6)


def prout(
    action: int,
    key: int = 0,
    sark: int = 0,
    kind: int = 0,
    flags: int = 0,
    extra: bytes = b"",
) -> tuple[bytes, bytes]:
    data = struct.pack(">QQIBBH", key, sark, 0, flags, 0, 0) + extra
    cdb = struct.pack(">BBBHIB", 0x5F, action, kind, 0, len(data), 0)
    return cdb, data


def prin(action: int, alloc: int = 4096) -> bytes:
    return struct.pack(">BB5sHB", 0x5E, action, b"", alloc, 0)


def transport_id(name: str, isid: str | None = None) -> bytes:
    """iSCSI TransportID (SPC-4 §7.6.4.6), format 00b (name) or 01b (port)."""
    text = name if isid is None else f"{name},i,0x{isid}"
    body = text.encode() + b"\x00"
    body += bytes(-len(body) % 4)
    if len(body) < 20:
        body += bytes(20 - len(body))
    return bytes([0x05 if isid is None else 0x45, 0]) + struct.pack(">H", len(body)) + body


def nexus(initiator: str, isid: int = 1, tpgt: int = 1) -> Nexus:
    target = "iqn.2024-01.test:target"
    port = f"{initiator},i,0x{isid:012x}"
    return Nexus(
        initiator_name=initiator,
        initiator_port=port,
        target_name=target,
        target_port=f"{target},t,0x{tpgt:04x}",
        relative_port=tpgt,
        transport_id=transport_id(initiator, f"{isid:012x}"),
    )


A_NAME = "iqn.2024-01.test:init"
B_NAME = "iqn.2024-01.test:other"


@pytest.fixture
def two(scsi: Harness) -> tuple[Harness, Nexus, Nexus]:
    """The harness, its nexus A (UA already consumed) and a second initiator B."""
    a = scsi.nexus
    b = nexus(B_NAME)
    scsi.target.nexus_added(b)
    scsi.check(TUR, POWER_ON, nexus=b)
    return scsi, a, b


def out(h: Harness, who: Nexus, action: int, **kw: int) -> None:
    cdb, data = prout(action, **kw)
    h.good(cdb, data, nexus=who)


def conflict(h: Harness, cdb: bytes, who: Nexus, data: bytes | None = None) -> None:
    response = h.run(cdb, data, nexus=who)
    assert response.status == Status.RESERVATION_CONFLICT
    assert response.sense == b""


def keys(h: Harness, who: Nexus | None = None) -> tuple[int, list[int]]:
    data = h.good(prin(0), nexus=who)
    generation, length = struct.unpack(">II", data[:8])
    return generation, [struct.unpack(">Q", data[8 + i : 16 + i])[0] for i in range(0, length, 8)]


def reservation(h: Harness, who: Nexus | None = None) -> tuple[int, int] | None:
    data = h.good(prin(1), nexus=who)
    if struct.unpack(">I", data[4:8])[0] == 0:
        return None
    key, scope_type = struct.unpack(">Q4xxB", data[8:22])[0], data[21]
    return key, scope_type & 0x0F


READ = bytes.fromhex("28 00 00000001 00 0001 00")
WRITE = bytes.fromhex("2a 00 00000001 00 0001 00")


# -- registration -----------------------------------------------------------------------------


def test_register_read_keys_and_generation(two: tuple[Harness, Nexus, Nexus]) -> None:
    h, a, b = two
    assert keys(h) == (0, [])
    out(h, a, REGISTER, sark=0xAA)
    out(h, b, REGISTER_IGNORE, sark=0xBB)
    assert keys(h) == (2, [0xAA, 0xBB])
    out(h, a, REGISTER, key=0xAA, sark=0xAB)  # change the key
    assert keys(h) == (3, [0xAB, 0xBB])
    out(h, a, REGISTER, key=0xAB, sark=0)  # unregister
    assert keys(h) == (4, [0xBB])


def test_register_with_a_wrong_key_is_a_conflict(two: tuple[Harness, Nexus, Nexus]) -> None:
    h, a, _ = two
    cdb, data = prout(REGISTER, key=5, sark=0xAA)
    conflict(h, cdb, a, data)  # not registered, yet a RESERVATION KEY
    out(h, a, REGISTER, sark=0xAA)
    cdb, data = prout(REGISTER, key=0, sark=0xAB)
    conflict(h, cdb, a, data)  # libiscsi ProutRegister: re-register without the key
    out(h, a, REGISTER_IGNORE, sark=0xAC)  # ignoring the existing key works
    assert keys(h)[1] == [0xAC]


def test_unregistered_register_with_zero_key_changes_nothing(scsi: Harness) -> None:
    out(scsi, scsi.nexus, REGISTER, sark=0)
    assert keys(scsi) == (0, [])


def test_read_keys_truncated_keeps_the_full_length(scsi: Harness) -> None:
    out(scsi, scsi.nexus, REGISTER, sark=7)
    assert scsi.good(prin(0, alloc=8)) == struct.pack(">II", 1, 8)


def test_parameter_list_length_must_be_24(scsi: Harness) -> None:
    cdb, data = prout(REGISTER, sark=1)
    scsi.check(cdb[:5] + struct.pack(">I", 20) + cdb[9:], PARAM_LENGTH, data[:20])
    scsi.check(cdb[:5] + struct.pack(">I", 28) + cdb[9:], PARAM_LENGTH, data + bytes(4))
    scsi.check(cdb, PARAM_LENGTH, data[:23])  # announced but not sent


def test_unknown_service_actions(scsi: Harness) -> None:
    for action in range(4, 0x20):
        response = scsi.check(prin(action), INVALID_FIELD)
        assert response.sense[15:18] == bytes.fromhex("cc0001")
    cdb, data = prout(8)
    scsi.check(cdb, INVALID_FIELD, data)


# -- RESERVE / RELEASE and the conflict table --------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "reg_read", "reg_write", "unreg_read", "unreg_write"),
    [
        (EA, False, False, False, False),
        (WE, True, False, True, False),
        (EA_RO, True, True, False, False),
        (WE_RO, True, True, True, False),
        (EA_AR, True, True, False, False),
        (WE_AR, True, True, True, False),
    ],
)
def test_access_under_each_reservation_type(
    two: tuple[Harness, Nexus, Nexus],
    kind: int,
    reg_read: bool,
    reg_write: bool,
    unreg_read: bool,
    unreg_write: bool,
) -> None:
    """libiscsi ProutReserve.Access*: what a second initiator may do (SPC-4 table 64)."""
    h, a, b = two
    out(h, a, REGISTER, sark=1)
    out(h, b, REGISTER, sark=2)
    out(h, a, RESERVE, key=1, kind=kind)
    assert reservation(h) == (0 if kind in (WE_AR, EA_AR) else 1, kind)
    h.good(READ, nexus=a)
    h.good(WRITE, bytes(BLOCK), nexus=a)

    def check(allowed: bool, cdb: bytes, data: bytes | None = None) -> None:
        if allowed:
            h.good(cdb, data, nexus=b)
        else:
            conflict(h, cdb, b, data)

    check(reg_read, READ)
    check(reg_write, WRITE, bytes(BLOCK))
    out(h, b, REGISTER, key=2, sark=0)
    check(unreg_read, READ)
    check(unreg_write, WRITE, bytes(BLOCK))
    h.good(TUR, nexus=b)  # allowed under every type
    h.good(bytes([0x12, 0, 0, 0, 36, 0]), nexus=b)
    h.good(bytes.fromhex("25 00 00000000 0000 00 00"), nexus=b)  # READ CAPACITY
    h.good(prin(0), nexus=b)


def test_reserve_rules(two: tuple[Harness, Nexus, Nexus]) -> None:
    h, a, b = two
    cdb, data = prout(RESERVE, key=1, kind=WE)
    conflict(h, cdb, a, data)  # not registered
    out(h, a, REGISTER, sark=1)
    out(h, b, REGISTER, sark=2)
    cdb, data = prout(RESERVE, key=9, kind=WE)
    conflict(h, cdb, a, data)  # wrong key
    out(h, a, RESERVE, key=1, kind=WE)
    out(h, a, RESERVE, key=1, kind=WE)  # same again: no-op
    cdb, data = prout(RESERVE, key=1, kind=EA)
    conflict(h, cdb, a, data)  # another type
    cdb, data = prout(RESERVE, key=2, kind=WE)
    conflict(h, cdb, b, data)  # held by A
    assert keys(h)[0] == 2  # RESERVE does not bump PRGENERATION


def test_reserve_type_and_scope_are_checked(scsi: Harness) -> None:
    cdb, data = prout(RESERVE, key=1, kind=2)
    response = scsi.check(cdb, INVALID_FIELD, data)
    assert response.sense[15:18] == bytes.fromhex("cb0002")
    cdb, data = prout(RESERVE, key=1, kind=0x10 | WE)
    response = scsi.check(cdb, INVALID_FIELD, data)
    assert response.sense[15:18] == bytes.fromhex("cf0002")


def test_release(two: tuple[Harness, Nexus, Nexus]) -> None:
    h, a, b = two
    out(h, a, REGISTER, sark=1)
    out(h, b, REGISTER, sark=2)
    out(h, a, RESERVE, key=1, kind=WE_RO)
    out(h, b, RELEASE, key=2, kind=WE_RO)  # not the holder: no effect
    assert reservation(h) == (1, WE_RO)
    cdb, data = prout(RELEASE, key=1, kind=WE)
    h.check(cdb, INVALID_RELEASE, data, nexus=a)
    out(h, a, RELEASE, key=1, kind=WE_RO)
    assert reservation(h) is None
    h.check(TUR, RESERVATIONS_RELEASED, nexus=b)  # a registrants-only type was released
    h.good(TUR, nexus=a)


def test_unregistering_the_holder_releases(two: tuple[Harness, Nexus, Nexus]) -> None:
    """libiscsi ProutReserve.Ownership*: the reservation goes with its holder, except
    the all-registrants types, which last while any registrant is left."""
    h, a, b = two
    out(h, a, REGISTER, sark=1)
    out(h, b, REGISTER, sark=2)
    out(h, a, RESERVE, key=1, kind=EA)
    out(h, a, REGISTER, key=1, sark=0)
    assert reservation(h) is None
    out(h, a, REGISTER, sark=1)
    out(h, a, RESERVE, key=1, kind=EA_AR)
    out(h, a, REGISTER, key=1, sark=0)
    assert reservation(h) == (0, EA_AR)
    out(h, b, RELEASE, key=2, kind=EA_AR)  # any registrant holds it
    assert reservation(h) is None


def test_clear(two: tuple[Harness, Nexus, Nexus]) -> None:
    h, a, b = two
    out(h, a, REGISTER, sark=1)
    out(h, b, REGISTER, sark=2)
    out(h, a, RESERVE, key=1, kind=EA)
    generation = keys(h)[0]
    out(h, a, CLEAR, key=1)
    assert keys(h) == (generation + 1, [])
    assert reservation(h) is None
    h.check(TUR, RESERVATIONS_PREEMPTED, nexus=b)
    h.good(TUR, nexus=a)


def test_preempt_a_registration(two: tuple[Harness, Nexus, Nexus]) -> None:
    """libiscsi ProutPreempt.RemoveRegistration: no reservation, just the key goes."""
    h, a, b = two
    out(h, a, REGISTER, sark=1)
    out(h, b, REGISTER, sark=2)
    generation = keys(h)[0]
    out(h, b, PREEMPT, key=2, sark=1, kind=EA)
    assert keys(h, b) == (generation + 1, [2])
    assert reservation(h, b) is None
    h.check(TUR, REGISTRATIONS_PREEMPTED, nexus=a)


def test_preempt_the_holder_takes_the_reservation(two: tuple[Harness, Nexus, Nexus]) -> None:
    h, a, b = two
    out(h, a, REGISTER, sark=1)
    out(h, b, REGISTER, sark=2)
    out(h, a, RESERVE, key=1, kind=WE)
    out(h, b, PREEMPT_ABORT, key=2, sark=1, kind=EA)
    assert reservation(h, b) == (2, EA)
    assert keys(h, b)[1] == [2]
    h.check(TUR, REGISTRATIONS_PREEMPTED, nexus=a)
    conflict(h, READ, a)


def test_preempt_errors(two: tuple[Harness, Nexus, Nexus]) -> None:
    h, a, b = two
    out(h, a, REGISTER, sark=1)
    cdb, data = prout(PREEMPT, key=1, sark=0, kind=WE)
    response = h.check(cdb, INVALID_PARAM, data, nexus=a)
    assert response.sense[15:18] == bytes.fromhex("800008")  # SERVICE ACTION RESERVATION KEY
    cdb, data = prout(PREEMPT, key=1, sark=77, kind=WE)
    conflict(h, cdb, a, data)  # nobody holds key 77
    cdb, data = prout(PREEMPT, key=2, sark=1, kind=WE)
    conflict(h, cdb, b, data)  # B is not registered


def test_preempt_all_registrants_with_zero_key(two: tuple[Harness, Nexus, Nexus]) -> None:
    h, a, b = two
    out(h, a, REGISTER, sark=1)
    out(h, b, REGISTER, sark=2)
    out(h, a, RESERVE, key=1, kind=WE_AR)
    out(h, b, PREEMPT, key=2, sark=0, kind=WE)
    assert reservation(h, b) == (2, WE)
    assert keys(h, b)[1] == [2]
    h.check(TUR, REGISTRATIONS_PREEMPTED, nexus=a)


def test_register_and_move(two: tuple[Harness, Nexus, Nexus]) -> None:
    h, a, b = two
    out(h, a, REGISTER, sark=1)
    out(h, a, RESERVE, key=1, kind=WE)
    tid = transport_id(B_NAME, "000000000001")
    move = struct.pack(">QQBBHI", 1, 0xB0, 0, 0x02, 1, len(tid)) + tid  # UNREG, port 1
    h.good(struct.pack(">BBBHIB", 0x5F, MOVE, WE, 0, len(move), 0), move, nexus=a)
    assert reservation(h) == (0xB0, WE)
    assert keys(h)[1] == [0xB0]  # A unregistered itself
    h.good(WRITE, bytes(BLOCK), nexus=b)
    conflict(h, WRITE, a, bytes(BLOCK))


def test_register_and_move_needs_the_holder(two: tuple[Harness, Nexus, Nexus]) -> None:
    h, a, _ = two
    out(h, a, REGISTER, sark=1)
    tid = transport_id(B_NAME, "000000000001")
    move = struct.pack(">QQBBHI", 1, 0xB0, 0, 0, 1, len(tid)) + tid
    conflict(h, struct.pack(">BBBHIB", 0x5F, MOVE, WE, 0, len(move), 0), a, move)


def test_spec_i_pt_registers_other_initiators(two: tuple[Harness, Nexus, Nexus]) -> None:
    h, a, b = two
    tid = transport_id(B_NAME)  # format 00b: every port of B
    extra = struct.pack(">I", len(tid)) + tid
    out(h, a, REGISTER, sark=5, flags=0x08, extra=extra)
    assert keys(h)[1] == [5, 5]
    out(h, b, REGISTER, key=5, sark=6)  # B is registered with the same key
    full = h.good(prin(3))
    _generation, length = struct.unpack(">II", full[:8])
    entries = []
    at = 8
    while at < 8 + length:
        key, flags, rel, tid_len = struct.unpack(">Q4xBx4xHI", full[at : at + 24])
        entries.append((key, flags, rel, full[at + 24 : at + 24 + tid_len]))
        at += 24 + tid_len
    assert entries[0][:3] == (5, 0, 1) and entries[0][3] == a.transport_id
    assert entries[1][:3] == (6, 0, 1) and entries[1][3] == tid


def test_spec_i_pt_refuses_an_already_registered_port(two: tuple[Harness, Nexus, Nexus]) -> None:
    h, a, b = two
    out(h, b, REGISTER, sark=2)
    tid = transport_id(B_NAME, "000000000001")
    cdb, data = prout(REGISTER, sark=5, flags=0x08, extra=struct.pack(">I", len(tid)) + tid)
    h.check(cdb, INVALID_PARAM, data, nexus=a)
    bad = bytes([0x01, 0, 0, 20]) + bytes(20)  # Fibre Channel: another protocol
    cdb, data = prout(REGISTER, sark=5, flags=0x08, extra=struct.pack(">I", len(bad)) + bad)
    h.check(cdb, INVALID_PARAM, data, nexus=a)


def test_all_target_ports(scsi: Harness) -> None:
    a = scsi.nexus
    a_other_port = nexus(A_NAME, isid=1, tpgt=2)
    scsi.target.nexus_added(a_other_port)
    scsi.run(TUR, nexus=a_other_port)
    out(scsi, a, REGISTER, sark=9, flags=0x04)  # ALL_TG_PT
    out(scsi, a, RESERVE, key=9, kind=EA)
    scsi.good(READ, nexus=a_other_port)  # the same initiator port through port 2 holds it
    full = scsi.good(prin(3))
    assert full[8 + 12] == 0x03  # ALL_TG_PT, R_HOLDER
    assert struct.unpack(">H", full[8 + 18 : 8 + 20])[0] == 0  # no single relative port


def test_registration_is_per_target_port_without_all_tg_pt(scsi: Harness) -> None:
    a = scsi.nexus
    a_other_port = nexus(A_NAME, isid=1, tpgt=2)
    scsi.target.nexus_added(a_other_port)
    scsi.run(TUR, nexus=a_other_port)
    out(scsi, a, REGISTER, sark=9)
    out(scsi, a, RESERVE, key=9, kind=EA)
    conflict(scsi, READ, a_other_port)


def test_report_capabilities(scsi: Harness) -> None:
    assert scsi.good(prin(2)) == bytes.fromhex("0008 0d 90 ea01 0000")
    out(scsi, scsi.nexus, REGISTER, sark=1, flags=0x01)  # APTPL
    assert scsi.good(prin(2))[3] == 0x91  # PTPL_A


def test_read_full_status_with_a_reservation(two: tuple[Harness, Nexus, Nexus]) -> None:
    h, a, b = two
    out(h, a, REGISTER, sark=1)
    out(h, b, REGISTER, sark=2)
    out(h, a, RESERVE, key=1, kind=EA_RO)
    data = h.good(prin(3))
    first = data[8:32]
    assert struct.unpack(">Q", first[:8])[0] == 1
    assert (first[12], first[13]) == (0x01, EA_RO)  # R_HOLDER, LU_SCOPE / type
    second_at = 8 + 24 + len(a.transport_id)
    assert (data[second_at + 12], data[second_at + 13]) == (0x00, 0x00)


def test_start_stop_unit_with_start_is_allowed_under_exclusive_access(
    two: tuple[Harness, Nexus, Nexus],
) -> None:
    h, a, b = two
    out(h, a, REGISTER, sark=1)
    out(h, a, RESERVE, key=1, kind=EA)
    h.good(bytes([0x1B, 0, 0, 0, 0x01, 0]), nexus=b)  # START=1
    conflict(h, bytes([0x1B, 0, 0, 0, 0x00, 0]), b)  # a stop
    h.good(bytes([0x1E, 0, 0, 0, 0, 0]), nexus=b)  # PREVENT=0
    conflict(h, bytes([0x1E, 0, 0, 0, 1, 0]), b)


# -- APTPL --------------------------------------------------------------------------------------


def _lu(store: object) -> LogicalUnit:
    identity = UnitIdentity.from_uuid(uuid.UUID(int=7))
    return LogicalUnit(MemoryBackend(64 * BLOCK), identity, pr_store=store)  # type: ignore[arg-type]


def test_aptpl_state_survives_a_restart(tmp_path: Path) -> None:
    """Registrations and the reservation made with APTPL=1 come back on a new LU
    built from the same state file (SPC-4 §5.13.5)."""
    from tests.scsi.conftest import Harness

    path = str(tmp_path / "lun.img.pr")
    lu = LogicalUnit(
        MemoryBackend(64 * BLOCK), UnitIdentity.from_uuid(uuid.UUID(int=7)), pr_state_path=path
    )
    target = ScsiTarget({0: lu})
    a, b = nexus(A_NAME), nexus(B_NAME)
    for who in (a, b):
        target.nexus_added(who)
        target.execute(who, 0, TUR, None)
    h = Harness(lu.backend, lu, target, a)  # type: ignore[arg-type]
    out(h, a, REGISTER, sark=0xA1, flags=0x01)
    out(h, b, REGISTER, sark=0xB1, flags=0x01)
    out(h, a, RESERVE, key=0xA1, kind=WE_RO)
    generation = keys(h)[0]

    again = LogicalUnit(
        MemoryBackend(64 * BLOCK), UnitIdentity.from_uuid(uuid.UUID(int=7)), pr_state_path=path
    )
    target2 = ScsiTarget({0: again})
    for who in (a, b):
        target2.nexus_added(who)
        target2.execute(who, 0, TUR, None)
    h2 = Harness(again.backend, again, target2, a)  # type: ignore[arg-type]
    assert keys(h2) == (generation, [0xA1, 0xB1])
    assert reservation(h2) == (0xA1, WE_RO)
    assert h2.good(prin(2))[3] & 0x01  # PTPL_A
    conflict(h2, WRITE, nexus(B_NAME, isid=9), bytes(BLOCK))  # unregistered port of B


def test_aptpl_off_forgets_the_file(tmp_path: Path) -> None:
    store = FilePrStore(str(tmp_path / "x.pr"))
    from tests.scsi.conftest import Harness

    lu = _lu(store)
    target = ScsiTarget({0: lu})
    a = nexus(A_NAME)
    target.nexus_added(a)
    target.execute(a, 0, TUR, None)
    h = Harness(lu.backend, lu, target, a)  # type: ignore[arg-type]
    out(h, a, REGISTER, sark=1, flags=0x01)
    assert store.load() is not None
    out(h, a, REGISTER, key=1, sark=2)  # APTPL=0 now
    assert store.load() is None
    assert keys(h)[1] == [2]  # the live state stays


def test_memory_store_restores(scsi: Harness) -> None:
    store = MemoryPrStore()
    lu = _lu(store)
    target = ScsiTarget({0: lu})
    a = nexus(A_NAME)
    target.nexus_added(a)
    target.execute(a, 0, TUR, None)
    cdb, data = prout(REGISTER, sark=3, flags=0x01)
    assert target.execute(a, 0, cdb, data).status == Status.GOOD
    restored = _lu(store)
    assert [r.key for r in restored.reservations.registrations] == [3]
    assert restored.reservations.generation == 1


# -- SPC-2 RESERVE / RELEASE -------------------------------------------------------------------

RESERVE6 = bytes([0x16, 0, 0, 0, 0, 0])
RELEASE6 = bytes([0x17, 0, 0, 0, 0, 0])
RESERVE10 = bytes([0x56]) + bytes(9)
RELEASE10 = bytes([0x57]) + bytes(9)
MODE_SENSE = bytes([0x1A, 0, 0x3F, 0, 255, 0])


def test_reserve6_between_two_initiators(two: tuple[Harness, Nexus, Nexus]) -> None:
    """libiscsi Reserve6.2Initiators."""
    h, a, b = two
    h.good(RESERVE6, nexus=a)
    h.good(RESERVE6, nexus=a)  # again by the holder
    conflict(h, RESERVE6, b)
    h.good(RELEASE6, nexus=b)  # a no-op
    h.good(MODE_SENSE, nexus=a)
    conflict(h, MODE_SENSE, b)
    conflict(h, TUR, b)
    h.good(bytes([0x12, 0, 0, 0, 36, 0]), nexus=b)
    h.good(bytes.fromhex("a0 00 00 000000 00001000 00 00"), nexus=b)  # REPORT LUNS
    h.good(RELEASE6, nexus=a)
    h.good(RESERVE10, nexus=b)
    conflict(h, RESERVE10, a)
    h.good(RELEASE10, nexus=b)


def test_reserve6_is_released_by_nexus_loss_and_resets(two: tuple[Harness, Nexus, Nexus]) -> None:
    h, a, b = two
    h.good(RESERVE6, nexus=a)
    h.target.nexus_removed(a)
    h.good(RESERVE6, nexus=b)
    h.target.task_management(b, TmfFunction.LOGICAL_UNIT_RESET, 0)
    h.check(TUR, LU_RESET, nexus=b)
    h.target.nexus_added(a)
    h.run(TUR, nexus=a)
    h.run(TUR, nexus=a)
    h.good(RESERVE6, nexus=a)


def test_reserve6_refuses_third_party_and_extents(scsi: Harness) -> None:
    response = scsi.check(bytes([0x16, 0x01, 0, 0, 0, 0]), INVALID_FIELD)
    assert response.sense[15:18] == bytes.fromhex("c80001")
    response = scsi.check(bytes([0x56, 0x10]) + bytes(8), INVALID_FIELD)
    assert response.sense[15:18] == bytes.fromhex("cc0001")


def test_reserve6_and_persistent_reservations_exclude_each_other(
    two: tuple[Harness, Nexus, Nexus],
) -> None:
    h, a, b = two
    out(h, b, REGISTER, sark=2)
    conflict(h, RESERVE6, a)  # registrations exist (CRH=0)
    out(h, b, REGISTER, key=2, sark=0)
    h.good(RESERVE6, nexus=a)
    cdb, data = prout(REGISTER, sark=2)
    conflict(h, cdb, b, data)  # PERSISTENT RESERVE OUT under another's RESERVE
    h.good(prin(0), nexus=b)  # PERSISTENT RESERVE IN is fine
