"""PERSISTENT RESERVE IN/OUT (SPC-4 §6.15, §6.16, §5.13) and SPC-2 RESERVE/RELEASE.

The state and the conflict rules are in :mod:`.pr_state`; these handlers parse
the CDB and parameter list, apply one service action under the LU's
reservation lock, queue the unit attentions the change implies
(RESERVATIONS PREEMPTED / RELEASED, REGISTRATIONS PREEMPTED), bump
PRGENERATION and, when APTPL is in effect, persist the new state.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from functools import partial
from typing import Final

from .command import Command, be, require
from .logical_unit import LogicalUnit
from .pr_state import Initiator, PrType, Registration, Reservation, ReservationState
from .sense import Reason, ReservationConflict, ScsiError, cdb_field, param_field
from .task import Nexus

PROTOCOL_ISCSI: Final = 0x5  # SPC-4 §7.6.1 table 427
SCOPE_LU: Final = 0x0
_BASIC_PARAMETERS: Final = 24  # SPC-4 §6.16.3.2, table 181


class PrIn(IntEnum):
    """PERSISTENT RESERVE IN service actions (SPC-4 §6.15.1, table 160)."""

    READ_KEYS = 0x00
    READ_RESERVATION = 0x01
    REPORT_CAPABILITIES = 0x02
    READ_FULL_STATUS = 0x03


class PrOut(IntEnum):
    """PERSISTENT RESERVE OUT service actions (SPC-4 §6.16.2, table 175)."""

    REGISTER = 0x00
    RESERVE = 0x01
    RELEASE = 0x02
    CLEAR = 0x03
    PREEMPT = 0x04
    PREEMPT_AND_ABORT = 0x05
    REGISTER_AND_IGNORE_EXISTING_KEY = 0x06
    REGISTER_AND_MOVE = 0x07


def initiator(cmd: Command) -> Initiator:
    return initiator_of(cmd.nexus)


def initiator_of(nexus: Nexus) -> Initiator:
    """The reservation rules' view of an I_T nexus."""
    return Initiator(
        port=nexus.initiator_port.lower(),
        name=nexus.initiator_name.lower(),
        target_port=nexus.target_port,
        relative_port=nexus.relative_port,
        transport_id=nexus.transport_id,
    )


# -- TransportIDs (SPC-4 §7.6.4.6, iSCSI) --------------------------------------------------


@dataclass(frozen=True)
class TransportId:
    """An iSCSI TransportID: a device name (format 00b) or an initiator port (01b)."""

    name: str
    port: str | None  # ``<name>,i,0x<isid>`` for format 01b
    raw: bytes


def parse_transport_id(data: bytes, at: int) -> tuple[TransportId, int]:
    """One TransportID at ``at``; returns it and its length. INVALID FIELD IN
    PARAMETER LIST for another protocol or a malformed one."""
    if at + 4 > len(data):
        raise ScsiError(Reason.PARAMETER_LIST_LENGTH_ERROR)
    first = data[at]
    fmt, protocol = first >> 6, first & 0x0F  # FORMAT CODE, PROTOCOL IDENTIFIER
    if protocol != PROTOCOL_ISCSI or fmt > 1:
        raise ScsiError(Reason.INVALID_FIELD_IN_PARAMETER_LIST, field=param_field(at))
    length = 4 + be(data, at + 2, 2)  # ADDITIONAL LENGTH
    if length < 24 or length % 4 or at + length > len(data):
        raise ScsiError(Reason.INVALID_FIELD_IN_PARAMETER_LIST, field=param_field(at + 2))
    text = bytes(data[at + 4 : at + length]).split(b"\x00", 1)[0].decode("utf-8", "replace")
    text = text.lower()
    if fmt == 1:
        name, sep, isid = text.partition(",i,0x")
        if not sep or not name or not isid:
            raise ScsiError(Reason.INVALID_FIELD_IN_PARAMETER_LIST, field=param_field(at + 4))
        return TransportId(name, text, bytes(data[at : at + length])), length
    if not text:
        raise ScsiError(Reason.INVALID_FIELD_IN_PARAMETER_LIST, field=param_field(at + 4))
    return TransportId(text, None, bytes(data[at : at + length])), length


def _registration_for(tid: TransportId, target_port: str | None, relative: int) -> Registration:
    return Registration(
        key=0,
        initiator=tid.port if tid.port is not None else tid.name,
        by_name=tid.port is None,
        target_port=target_port,
        relative_port=relative,
        transport_id=tid.raw,
    )


# -- PERSISTENT RESERVE IN -----------------------------------------------------------------


def persistent_reserve_in(cmd: Command) -> bytes:
    """PERSISTENT RESERVE IN (SPC-4 §6.15). The ADDITIONAL LENGTH always gives the
    full size; the dispatcher trims the data to the ALLOCATION LENGTH."""
    lu = cmd.unit
    action = cmd.cdb[1] & 0x1F  # SERVICE ACTION
    with lu.pr_lock:
        state = lu.reservations
        state.refresh()  # shared by several gateways: what the others did too
        if action == PrIn.READ_KEYS:
            keys = b"".join(struct.pack(">Q", r.key) for r in state.registrations)
            return struct.pack(">II", state.generation, len(keys)) + keys  # PRGENERATION, LENGTH
        if action == PrIn.READ_RESERVATION:
            return _read_reservation(state)
        if action == PrIn.REPORT_CAPABILITIES:
            return _report_capabilities(state)
        if action == PrIn.READ_FULL_STATUS:
            return _read_full_status(state)
    raise ScsiError(Reason.INVALID_FIELD_IN_CDB, field=cdb_field(1, 4))  # not in the table


def _read_reservation(state: ReservationState) -> bytes:
    """READ RESERVATION parameter data (SPC-4 §6.15.3); the key is zero for the
    all-registrants types (SPC-4 §5.13.10)."""
    res = state.reservation
    if res is None:
        return struct.pack(">II", state.generation, 0)  # PRGENERATION, ADDITIONAL LENGTH
    key = 0 if res.holder is None else res.holder.key
    return struct.pack(
        ">IIQIBBH",
        state.generation,  # PRGENERATION
        16,  # ADDITIONAL LENGTH
        key,  # RESERVATION KEY
        0,  # obsolete
        0,  # reserved
        SCOPE_LU << 4 | int(res.type),  # SCOPE, TYPE
        0,  # obsolete
    )


#: PERSISTENT RESERVATION TYPE MASK bits (SPC-4 §6.15.4, table 169): all six types.
_TYPE_MASK: Final = 0xEA01


def _report_capabilities(state: ReservationState) -> bytes:
    """REPORT CAPABILITIES parameter data (SPC-4 §6.15.4)."""
    return struct.pack(
        ">HBBHH",
        8,  # LENGTH
        0x0D,  # RLR_C=0, CRH=0, SIP_C=1, ATP_C=1, PTPL_C=1
        0x80 | 0x01 << 4 | int(state.aptpl),  # TMV=1, ALLOW COMMANDS=001b, PTPL_A
        _TYPE_MASK,  # PERSISTENT RESERVATION TYPE MASK
        0,  # reserved
    )


def _read_full_status(state: ReservationState) -> bytes:
    """READ FULL STATUS parameter data (SPC-4 §6.15.5)."""
    res = state.reservation
    body = bytearray()
    for reg in state.registrations:
        holder = res is not None and (res.type.all_registrants or res.holder is reg)
        flags = (0x02 if reg.target_port is None else 0) | (0x01 if holder else 0)
        scope_type = SCOPE_LU << 4 | int(res.type) if holder and res is not None else 0
        tid = reg.transport_id
        body += struct.pack(
            ">Q4sBB4sHI",
            reg.key,  # RESERVATION KEY
            b"",  # reserved
            flags,  # ALL_TG_PT, R_HOLDER
            scope_type,  # SCOPE, TYPE
            b"",  # reserved
            0 if reg.target_port is None else reg.relative_port,  # RELATIVE TARGET PORT ID
            len(tid),  # ADDITIONAL DESCRIPTOR LENGTH
        )
        body += tid  # TRANSPORTID
    return struct.pack(">II", state.generation, len(body)) + bytes(body)


# -- PERSISTENT RESERVE OUT -----------------------------------------------------------------


@dataclass(frozen=True)
class _Parameters:
    key: int  # RESERVATION KEY
    sark: int  # SERVICE ACTION RESERVATION KEY
    spec_i_pt: bool
    all_tg_pt: bool
    aptpl: bool
    transport_ids: tuple[TransportId, ...] = ()
    unreg: bool = False  # REGISTER AND MOVE only
    relative_port: int = 0  # REGISTER AND MOVE only


def _parameters(cmd: Command, action: int) -> _Parameters:
    """Parse the PERSISTENT RESERVE OUT parameter list (SPC-4 §6.16.3, §6.16.4)."""
    length = be(cmd.cdb, 5, 4)  # PARAMETER LIST LENGTH
    if len(cmd.data_out) < length or length < _BASIC_PARAMETERS:
        raise ScsiError(Reason.PARAMETER_LIST_LENGTH_ERROR)
    data = bytes(cmd.data_out[:length])
    key, sark = be(data, 0, 8), be(data, 8, 8)
    if action == PrOut.REGISTER_AND_MOVE:
        tid_length = be(data, 20, 4)  # TRANSPORTID PARAMETER DATA LENGTH
        if _BASIC_PARAMETERS + tid_length > length:
            raise ScsiError(Reason.PARAMETER_LIST_LENGTH_ERROR)
        tid, _ = parse_transport_id(data[: _BASIC_PARAMETERS + tid_length], _BASIC_PARAMETERS)
        return _Parameters(
            key,
            sark,
            False,
            False,
            bool(data[17] & 0x01),  # APTPL
            (tid,),
            unreg=bool(data[17] & 0x02),  # UNREG
            relative_port=be(data, 18, 2),  # RELATIVE TARGET PORT IDENTIFIER
        )
    flags = data[20]
    spec_i_pt = bool(flags & 0x08)  # SPEC_I_PT
    tids: list[TransportId] = []
    if spec_i_pt:
        if action not in (PrOut.REGISTER,):
            raise ScsiError(Reason.INVALID_FIELD_IN_PARAMETER_LIST, field=param_field(20, 3))
        if length < _BASIC_PARAMETERS + 4:
            raise ScsiError(Reason.PARAMETER_LIST_LENGTH_ERROR)
        tid_length = be(data, 24, 4)  # TRANSPORTID PARAMETER DATA LENGTH
        end = _BASIC_PARAMETERS + 4 + tid_length
        if end != length:
            raise ScsiError(Reason.PARAMETER_LIST_LENGTH_ERROR)
        at = _BASIC_PARAMETERS + 4
        while at < end:
            tid, size = parse_transport_id(data[:end], at)
            tids.append(tid)
            at += size
    elif length != _BASIC_PARAMETERS:
        raise ScsiError(Reason.PARAMETER_LIST_LENGTH_ERROR)
    return _Parameters(
        key, sark, spec_i_pt, bool(flags & 0x04), bool(flags & 0x01), tuple(tids)
    )  # SPEC_I_PT, ALL_TG_PT, APTPL


def _type_and_scope(cmd: Command) -> PrType:
    scope, kind = cmd.cdb[2] >> 4, cmd.cdb[2] & 0x0F  # SCOPE, TYPE
    require(scope == SCOPE_LU, 2, 7)
    require(kind in PrType._value2member_map_, 2, 3)
    return PrType(kind)


def persistent_reserve_out(cmd: Command) -> None:
    """PERSISTENT RESERVE OUT (SPC-4 §6.16, §5.13.11)."""
    lu = cmd.unit
    action = cmd.cdb[1] & 0x1F  # SERVICE ACTION
    require(action in PrOut._value2member_map_, 1, 4)
    kind = None
    if action in (PrOut.RESERVE, PrOut.RELEASE, PrOut.PREEMPT, PrOut.PREEMPT_AND_ABORT):
        kind = _type_and_scope(cmd)
    params = _parameters(cmd, action)
    who = initiator(cmd)
    handler = _OUT_ACTIONS[PrOut(action)]

    def change() -> None:
        if state.spc2_holder is not None and state.spc2_holder != who.key:
            raise ReservationConflict()
        if handler(lu, state, who, params, kind):
            state.generation = (state.generation + 1) & 0xFFFFFFFF
        if action in _APTPL_ACTIONS:
            state.aptpl = params.aptpl

    with lu.pr_lock:
        state = lu.reservations
        state.transact(change)  # stored (APTPL, or shared with other gateways)
        events = state.take_events()
    lu.publish_pr_events(events)  # unit attentions here, and to the other gateways


_APTPL_ACTIONS: Final = frozenset(
    {PrOut.REGISTER, PrOut.REGISTER_AND_IGNORE_EXISTING_KEY, PrOut.REGISTER_AND_MOVE}
)


def _register(
    lu: LogicalUnit,
    state: ReservationState,
    who: Initiator,
    params: _Parameters,
    kind: PrType | None,
    ignore_key: bool = False,
) -> bool:
    """REGISTER and REGISTER AND IGNORE EXISTING KEY (SPC-4 §5.13.7, §5.13.11.2)."""
    reg = state.registration_of(who)
    if reg is None:
        if not ignore_key and params.key != 0:
            raise ReservationConflict()
        if params.sark == 0:
            if params.spec_i_pt:
                raise ScsiError(Reason.INVALID_FIELD_IN_PARAMETER_LIST, field=param_field(8))
            return False
        target_port = None if params.all_tg_pt else who.target_port
        new = Registration(
            params.sark,
            who.port,
            False,
            target_port,
            0 if params.all_tg_pt else who.relative_port,
            who.transport_id,
        )
        extra = [
            _registration_for(tid, target_port, new.relative_port) for tid in params.transport_ids
        ]
        for other in extra:
            other.key = params.sark
            if any(r.same_nexus(other) for r in state.registrations) or other.same_nexus(new):
                raise ScsiError(Reason.INVALID_FIELD_IN_PARAMETER_LIST, field=param_field(28))
        state.add(new)
        for other in extra:
            state.add(other)
        return True
    if not ignore_key and params.key != reg.key:
        raise ReservationConflict()
    if params.spec_i_pt:
        raise ScsiError(Reason.INVALID_FIELD_IN_PARAMETER_LIST, field=param_field(20, 3))
    if params.sark == 0:
        state.remove(reg)
    else:
        reg.key = params.sark
    return True


def _registered(state: ReservationState, who: Initiator, params: _Parameters) -> Registration:
    """The sender's registration, whose key must match RESERVATION KEY."""
    reg = state.registration_of(who)
    if reg is None or reg.key != params.key:
        raise ReservationConflict()
    return reg


def _reserve(
    lu: LogicalUnit,
    state: ReservationState,
    who: Initiator,
    params: _Parameters,
    kind: PrType | None,
) -> bool:
    """RESERVE (SPC-4 §5.13.9): a second reservation by the holder with the same
    type is a no-op; anything else while reserved is a conflict."""
    assert kind is not None
    reg = _registered(state, who, params)
    res = state.reservation
    if res is not None:
        if not state.is_holder(who, reg) or res.type != kind:
            raise ReservationConflict()
        return False
    state.reservation = Reservation(kind, None if kind.all_registrants else reg)
    return False


def _release(
    lu: LogicalUnit,
    state: ReservationState,
    who: Initiator,
    params: _Parameters,
    kind: PrType | None,
) -> bool:
    """RELEASE (SPC-4 §5.13.11.2.2): only the holder releases, with the right type."""
    assert kind is not None
    reg = _registered(state, who, params)
    res = state.reservation
    if res is None or not state.is_holder(who, reg):
        return False
    if res.type != kind:
        raise ScsiError(Reason.INVALID_RELEASE_OF_PERSISTENT_RESERVATION)
    state.reservation = None
    if res.type.registrants_have_access:
        state.notify_registrants(Reason.RESERVATIONS_RELEASED, exclude=who)
    return False


def _clear(
    lu: LogicalUnit,
    state: ReservationState,
    who: Initiator,
    params: _Parameters,
    kind: PrType | None,
) -> bool:
    """CLEAR (SPC-4 §5.13.11.2.4): every registration and the reservation go; the
    other registered I_T nexuses get RESERVATIONS PREEMPTED."""
    _registered(state, who, params)
    state.notify_registrants(Reason.RESERVATIONS_PREEMPTED, exclude=who)
    state.registrations = []
    state.reservation = None
    return True


def _preempt(
    lu: LogicalUnit,
    state: ReservationState,
    who: Initiator,
    params: _Parameters,
    kind: PrType | None,
    abort: bool = False,
) -> bool:
    """PREEMPT and PREEMPT AND ABORT (SPC-4 §5.13.11.2.5, §5.13.11.2.6). With
    ``abort`` the preempted I_T nexuses' tasks are aborted: by the LU's task aborter
    (:meth:`~.logical_unit.LogicalUnit.publish_pr_events`), here and on every other
    gateway of a shared LU, before this command completes."""
    assert kind is not None
    mine = _registered(state, who, params)
    res = state.reservation
    sark = params.sark
    if res is not None and res.type.all_registrants and sark == 0:
        victims = [r for r in state.registrations if r is not mine]
        _drop(state, victims, abort)
        state.reservation = Reservation(kind, None if kind.all_registrants else mine)
        return True
    if sark == 0:
        raise ScsiError(Reason.INVALID_FIELD_IN_PARAMETER_LIST, field=param_field(8))
    holder_key = res.holder.key if res is not None and res.holder is not None else None
    if res is not None and not res.type.all_registrants and holder_key == sark:
        victims = [r for r in state.registrations if r.key == sark and r is not mine]
        _drop(state, victims, abort)
        changed_type = res.type != kind
        state.reservation = Reservation(kind, None if kind.all_registrants else mine)
        if changed_type:
            state.notify_registrants(Reason.RESERVATIONS_RELEASED, exclude=who)
        return True
    victims = state.registrations_for(sark)
    if not victims:
        raise ReservationConflict()
    _drop(state, victims, abort)
    return True


def _drop(state: ReservationState, victims: list[Registration], abort: bool) -> None:
    """Remove preempted registrations and tell their I_T nexuses."""
    if not victims:
        return
    gone = list(victims)
    state.notify(Reason.REGISTRATIONS_PREEMPTED, gone, abort=abort)
    ids = {id(r) for r in gone}
    state.registrations = [r for r in state.registrations if id(r) not in ids]
    res = state.reservation
    if res is not None and res.holder is not None and id(res.holder) in ids:
        state.reservation = None


def _register_and_move(
    lu: LogicalUnit,
    state: ReservationState,
    who: Initiator,
    params: _Parameters,
    kind: PrType | None,
) -> bool:
    """REGISTER AND MOVE (SPC-4 §5.13.8): register the I_T nexus named by the
    TransportID and RELATIVE TARGET PORT IDENTIFIER and hand it the reservation."""
    mine = _registered(state, who, params)
    res = state.reservation
    if res is None or not state.is_holder(who, mine) or res.type.all_registrants:
        raise ReservationConflict()
    if params.sark == 0:
        raise ScsiError(Reason.INVALID_FIELD_IN_PARAMETER_LIST, field=param_field(8))
    (tid,) = params.transport_ids
    if params.relative_port != who.relative_port:
        raise ScsiError(Reason.INVALID_FIELD_IN_PARAMETER_LIST, field=param_field(18))
    dest = _registration_for(tid, who.target_port, who.relative_port)
    if dest.same_nexus(mine) or (tid.port is None and tid.name == who.name):
        raise ScsiError(Reason.INVALID_FIELD_IN_PARAMETER_LIST, field=param_field(24))
    existing = next((r for r in state.registrations if r.same_nexus(dest)), None)
    if existing is None:
        dest.key = params.sark
        state.add(dest)
    else:
        existing.key = params.sark
        dest = existing
    state.reservation = Reservation(res.type, dest)
    if params.unreg:
        state.registrations = [r for r in state.registrations if r is not mine]
    return True


_OUT_ACTIONS: Final = {
    PrOut.REGISTER: _register,
    PrOut.RESERVE: _reserve,
    PrOut.RELEASE: _release,
    PrOut.CLEAR: _clear,
    PrOut.PREEMPT: _preempt,
    PrOut.PREEMPT_AND_ABORT: partial(_preempt, abort=True),
    PrOut.REGISTER_AND_IGNORE_EXISTING_KEY: partial(_register, ignore_key=True),
    PrOut.REGISTER_AND_MOVE: _register_and_move,
}


# -- SPC-2 RESERVE / RELEASE -----------------------------------------------------------------


def reserve(cmd: Command) -> None:
    """RESERVE(6) and RESERVE(10) (SPC-2 §7.21, §7.22): the whole LU for this I_T
    nexus. Third-party and extent reservations are refused by the usage mask."""
    lu = cmd.unit
    with lu.pr_lock:
        lu.reservations.spc2_reserve(initiator(cmd))


def release(cmd: Command) -> None:
    """RELEASE(6) and RELEASE(10) (SPC-2 §7.17, §7.18)."""
    lu = cmd.unit
    with lu.pr_lock:
        lu.reservations.spc2_release(initiator(cmd))
