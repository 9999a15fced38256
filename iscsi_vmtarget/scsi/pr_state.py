"""Persistent reservation state of one logical unit (SPC-4 §5.13) and SPC-2 reservations.

:class:`ReservationState` holds the registrations, the persistent reservation,
the PRGENERATION counter and the SPC-2 (RESERVE/RELEASE) holder, and answers
one question for the dispatcher: may this I_T nexus run this command
(:meth:`ReservationState.check_access`, SPC-4 §5.13.1 table 64, SBC-3 §4.17
table 13)? The PERSISTENT RESERVE IN/OUT service actions that change it live
in :mod:`.pr`.

An I_T nexus is identified by its initiator port name (``<iqn>,i,0x<isid>``)
and its target port name. A registration remembers the initiator either by
port (a normal REGISTER, or a TransportID with an ISID) or by device name only
(a SPEC_I_PT TransportID without ISID: every port of that initiator), and the
target port it was made through, or none when ALL_TG_PT was set.

When APTPL is in effect the state is written to a :class:`PrStore` after every
change and read back when the LU is created (SPC-4 §5.13.5).

An LU served by several gateways (processes) keeps its state in a
:class:`SharedPrStore` instead: every change is made by :meth:`ReservationState.transact`
on the latest stored state and stored by compare-and-swap, made again on what is
there when another gateway changed it first. The unit attentions a change implies
are :class:`PrEvent` data (not callbacks), so the other gateways can queue them for
their own I_T nexuses.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Final, Protocol, TypeVar

from .sense import Reason, ReservationConflict, ScsiError
from .task import ItKey

STATE_VERSION: Final = 1
#: Attempts of one change against a shared store before giving up: each failed one
#: means another gateway's change was stored, so the whole set of gateways progresses.
MAX_ATTEMPTS: Final = 32
_T = TypeVar("_T")


class PrType(IntEnum):
    """Persistent reservation TYPE codes (SPC-4 §6.16.3.4, table 178)."""

    WRITE_EXCLUSIVE = 0x1
    EXCLUSIVE_ACCESS = 0x3
    WRITE_EXCLUSIVE_REGISTRANTS_ONLY = 0x5
    EXCLUSIVE_ACCESS_REGISTRANTS_ONLY = 0x6
    WRITE_EXCLUSIVE_ALL_REGISTRANTS = 0x7
    EXCLUSIVE_ACCESS_ALL_REGISTRANTS = 0x8

    @property
    def all_registrants(self) -> bool:
        return self in _ALL_REGISTRANTS

    @property
    def registrants_have_access(self) -> bool:
        """RO and AR types: every registered I_T nexus may read and write."""
        return self in _REGISTRANT_TYPES

    @property
    def write_exclusive(self) -> bool:
        """Reads stay allowed for everyone (the Write Exclusive family)."""
        return self in _WRITE_EXCLUSIVE


_ALL_REGISTRANTS: Final = frozenset(
    {PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS, PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS}
)
_REGISTRANT_TYPES: Final = _ALL_REGISTRANTS | {
    PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY,
    PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY,
}
_WRITE_EXCLUSIVE: Final = frozenset(
    {
        PrType.WRITE_EXCLUSIVE,
        PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY,
        PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS,
    }
)


class PrPolicy(IntEnum):
    """What a command does to the medium, for the conflict rules (SPC-4 table 64)."""

    ALLOWED = 0  # allowed in the presence of any persistent reservation
    READ = 1  # conflicts for non-holders only under Exclusive Access types
    WRITE = 2  # conflicts for non-holders under every type


@dataclass(frozen=True)
class Initiator:
    """The initiator side of an I_T nexus as the reservation rules see it."""

    port: str  # SCSI initiator port name, lower case
    name: str  # SCSI initiator device name, lower case
    target_port: str
    relative_port: int
    transport_id: bytes

    @classmethod
    def from_key(cls, key: ItKey) -> Initiator:
        port, target_port = key
        return cls(port.lower(), _device_name(port), target_port, 0, b"")

    @property
    def key(self) -> ItKey:
        return (self.port, self.target_port)


def _device_name(port: str) -> str:
    """The device name part of an initiator port name (``<name>,i,0x<isid>``)."""
    return port.lower().split(",i,", 1)[0]


@dataclass
class Registration:
    """One registered reservation key (SPC-4 §5.13.7)."""

    key: int
    initiator: str  # initiator port name, or device name when ``by_name``
    by_name: bool  # True: every port of the named initiator device
    target_port: str | None  # None: registered through all target ports (ALL_TG_PT)
    relative_port: int  # RELATIVE TARGET PORT IDENTIFIER (0 with ALL_TG_PT)
    transport_id: bytes  # reported by READ FULL STATUS

    def matches(self, who: Initiator) -> bool:
        if self.target_port is not None and self.target_port != who.target_port:
            return False
        return self.initiator == (who.name if self.by_name else who.port)

    def same_nexus(self, other: Registration) -> bool:
        return (self.initiator, self.by_name, self.target_port) == (
            other.initiator,
            other.by_name,
            other.target_port,
        )

    def dump(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "initiator": self.initiator,
            "by_name": self.by_name,
            "target_port": self.target_port,
            "relative_port": self.relative_port,
            "transport_id": self.transport_id.hex(),
        }

    @classmethod
    def load(cls, data: dict[str, Any]) -> Registration:
        return cls(
            key=int(data["key"]),
            initiator=str(data["initiator"]),
            by_name=bool(data["by_name"]),
            target_port=None if data["target_port"] is None else str(data["target_port"]),
            relative_port=int(data["relative_port"]),
            transport_id=bytes.fromhex(str(data["transport_id"])),
        )


@dataclass
class Reservation:
    """The persistent reservation (scope is always LU_SCOPE, SPC-4 §6.16.3.3)."""

    type: PrType
    holder: Registration | None  # None for the all-registrants types


class PrStore(Protocol):
    """Where APTPL state is kept (a file beside the LU's backing store)."""

    def load(self) -> bytes | None: ...

    def save(self, data: bytes) -> None: ...

    def clear(self) -> None: ...


class SharedPrStore(Protocol):
    """The state every gateway of one LU shares (``storage/rbd_pr.py`` keeps it in a
    RADOS object). The LU calls :meth:`load` and :meth:`commit` under its reservation
    lock, one thread at a time."""

    def load(self) -> bytes | None:
        """The latest stored state (None: none yet); a later :meth:`commit` is
        compared against it."""
        ...

    def commit(self, data: bytes) -> bool:
        """Store ``data`` if the state is still the one :meth:`load` returned; False
        when another gateway stored a change in between (nothing is written)."""
        ...

    def announce(self, message: bytes) -> None:
        """Tell the other gateways of the committed state and ``message`` (the
        :class:`PrEvent` list); returns once they took it, or gave no answer in time."""
        ...

    def latest(self) -> bytes | None:
        """The newest state known, without asking anyone (what was loaded, committed
        or announced last)."""
        ...

    def listen(self, listener: Callable[[bytes], None]) -> None:
        """Call ``listener(message)`` for each announcement of another gateway (empty:
        the state was read again after announcements may have been missed); the
        announced state is then :meth:`latest`."""
        ...

    def alone(self) -> bool:
        """No other gateway serves the LU now (this one starts first: a power on for
        the LU, which ends registrations made without APTPL, SPC-4 §5.13.5)."""
        ...


@dataclass(frozen=True)
class PrEvent:
    """A unit attention a change implies for the I_T nexuses ``registrations`` cover,
    except ``exclude``; ``abort``: their tasks are aborted too (PREEMPT AND ABORT,
    SPC-4 §5.13.11.2.6). Data, so another gateway can apply it to its own nexuses.
    ``reset``: a logical unit reset made through another gateway (SAM-5 §6.3.3), for
    every I_T nexus whatever ``registrations`` says."""

    reason: Reason
    registrations: tuple[Registration, ...]
    exclude: ItKey | None = None
    abort: bool = False
    reset: bool = False

    def wants(self, who: Initiator) -> bool:
        if self.exclude is not None and who.key == self.exclude:
            return False
        return self.reset or any(r.matches(who) for r in self.registrations)

    def dump(self) -> dict[str, Any]:
        out = {
            "reason": self.reason.name,
            "registrations": [r.dump() for r in self.registrations],
            "exclude": None if self.exclude is None else list(self.exclude),
            "abort": self.abort,
        }
        if self.reset:
            out["reset"] = True
        return out

    @classmethod
    def load(cls, data: dict[str, Any]) -> PrEvent:
        exclude = data.get("exclude")
        return cls(
            Reason[str(data["reason"])],
            tuple(Registration.load(r) for r in data["registrations"]),
            None if exclude is None else (str(exclude[0]), str(exclude[1])),
            bool(data.get("abort", False)),
            bool(data.get("reset", False)),
        )


def dump_events(events: Iterable[PrEvent]) -> bytes:
    return json.dumps([e.dump() for e in events]).encode()


def load_events(data: bytes) -> list[PrEvent]:
    """The events of an announcement; none from a malformed one (a gateway of another
    version: the state it announced is taken all the same)."""
    try:
        return [PrEvent.load(e) for e in json.loads(data or b"[]")]
    except (ValueError, KeyError, TypeError, IndexError):
        return []


@dataclass
class ReservationState:
    """Registrations, the persistent reservation and the SPC-2 reservation of one LU."""

    store: PrStore | None = None
    shared: SharedPrStore | None = None
    generation: int = 0
    registrations: list[Registration] = field(default_factory=list)
    reservation: Reservation | None = None
    aptpl: bool = False
    spc2_holder: ItKey | None = None
    #: the unit attentions the change being made implies (see :meth:`transact`)
    events: list[PrEvent] = field(default_factory=list)

    # -- lookups -----------------------------------------------------------------------

    def registration_of(self, who: Initiator) -> Registration | None:
        for reg in self.registrations:
            if reg.matches(who):
                return reg
        return None

    def is_holder(self, who: Initiator, reg: Registration | None = None) -> bool:
        """Is ``who`` a reservation holder (SPC-4 §5.13.10)?"""
        res = self.reservation
        if res is None:
            return False
        reg = reg if reg is not None else self.registration_of(who)
        if reg is None:
            return False
        return res.type.all_registrants or res.holder is reg

    # -- access control (SPC-4 §5.13.1, SPC-2 §5.5.1) ---------------------------------

    def check_access(
        self, who: Initiator, access: PrPolicy, spc2_exempt: bool, pr_relaxed: bool
    ) -> None:
        """Raise :class:`ReservationConflict` if ``who`` may not run the command."""
        if self.spc2_holder is not None and self.spc2_holder != who.key and not spc2_exempt:
            raise ReservationConflict()
        res = self.reservation
        if res is None or access is PrPolicy.ALLOWED or pr_relaxed:
            return
        reg = self.registration_of(who)
        if self.is_holder(who, reg):
            return
        if reg is not None and res.type.registrants_have_access:
            return
        if access is PrPolicy.READ and res.type.write_exclusive:
            return
        raise ReservationConflict()

    # -- SPC-2 RESERVE / RELEASE -----------------------------------------------------

    def spc2_reserve(self, who: Initiator) -> None:
        """RESERVE(6/10) (SPC-2 §7.21): conflicts with another holder or with any
        persistent reservation or registration (SPC-4 §5.13.3, CRH=0)."""
        if self.reservation is not None or self.registrations:
            raise ReservationConflict()
        if self.spc2_holder is not None and self.spc2_holder != who.key:
            raise ReservationConflict()
        self.spc2_holder = who.key

    def spc2_release(self, who: Initiator) -> None:
        """RELEASE(6/10) (SPC-2 §7.17): a release by a non-holder is a no-op."""
        if self.reservation is not None:
            raise ReservationConflict()
        if self.spc2_holder == who.key:
            self.spc2_holder = None

    def nexus_lost(self, key: ItKey) -> None:
        """I_T nexus loss releases its SPC-2 reservation (SPC-2 §5.5.1); persistent
        reservations survive it."""
        if self.spc2_holder == key:
            self.spc2_holder = None

    def reset(self) -> None:
        """Logical unit reset releases the SPC-2 reservation only (SAM-5 §6.3.3)."""
        self.spc2_holder = None

    # -- changes used by PERSISTENT RESERVE OUT ----------------------------------------

    def add(self, reg: Registration) -> None:
        self.registrations.append(reg)

    def remove(self, reg: Registration) -> None:
        """Remove one registration; an unregistered holder loses its reservation
        (SPC-4 §5.13.11.2.3), the others get RESERVATIONS RELEASED for RO types."""
        self.registrations = [r for r in self.registrations if r is not reg]
        res = self.reservation
        if res is None:
            return
        if res.type.all_registrants:
            if not self.registrations:
                self.reservation = None
        elif res.holder is reg:
            self.reservation = None
            if res.type.registrants_have_access:
                self.notify_registrants(Reason.RESERVATIONS_RELEASED)

    def notify_registrants(self, reason: Reason, *, exclude: Initiator | None = None) -> None:
        """Queue ``reason`` for every registered I_T nexus (but ``exclude``)."""
        self.notify(reason, self.registrations, exclude=exclude)

    def notify(
        self,
        reason: Reason,
        regs: Iterable[Registration],
        *,
        exclude: Initiator | None = None,
        abort: bool = False,
    ) -> None:
        """Queue ``reason`` for the I_T nexuses ``regs`` cover, once the change is stored."""
        snapshot = tuple(Registration.load(r.dump()) for r in regs)
        key = None if exclude is None else exclude.key
        self.events.append(PrEvent(reason, snapshot, key, abort))

    def registrations_for(self, key: int) -> list[Registration]:
        return [r for r in self.registrations if r.key == key]

    # -- changes, kept in a store ----------------------------------------------------

    def transact(self, change: Callable[[], _T]) -> _T:
        """Make ``change`` on the latest state and store it. With a shared store the
        state is read first and written by compare-and-swap; when another gateway
        stored a change in between, the change is made again on that one (its checks
        too: a registration may have gone). :attr:`events` then holds what the
        stored change implies. An error leaves the stored state as it was."""
        for _ in range(MAX_ATTEMPTS):
            self.refresh()
            self.events.clear()
            try:
                result = change()
            except BaseException:
                self.events.clear()
                if self.shared is not None:
                    self.refresh()  # undo what the change did before it failed
                raise
            if self.shared is None:
                self.persist()
                return result
            if self.shared.commit(self.dumps()):
                return result
        self.refresh()
        raise ScsiError(Reason.INTERNAL_TARGET_FAILURE)  # no progress: a gateway loops

    def take_events(self) -> list[PrEvent]:
        events, self.events = self.events, []
        return events

    def refresh(self) -> None:
        """Read the shared state again (nothing to do without a shared store)."""
        if self.shared is not None:
            self.adopt(self.shared.load())

    def adopt(self, raw: bytes | None) -> None:
        """Take the stored state ``raw`` (None: no registrations); the SPC-2
        reservation, which is this gateway's own, stays."""
        # parsed first, then assigned: the data path reads the reservation without the
        # lock when there is none, so it must never see a held one go away for a moment
        self.generation, self.registrations, self.reservation, self.aptpl = (
            _parse(raw) if raw else (0, [], None, False)
        )

    # -- persistence (APTPL, SPC-4 §5.13.5) --------------------------------------------

    def persist(self) -> None:
        """Write the state when APTPL is in effect; forget the file otherwise."""
        if self.store is None:
            return
        if not self.aptpl:
            self.store.clear()
            return
        self.store.save(self.dumps())

    def dumps(self) -> bytes:
        res = self.reservation
        holder = None
        if res is not None and res.holder is not None:
            holder = next(i for i, r in enumerate(self.registrations) if r is res.holder)
        doc = {
            "version": STATE_VERSION,
            "generation": self.generation,
            "registrations": [r.dump() for r in self.registrations],
            "reservation": None if res is None else {"type": int(res.type), "holder": holder},
            "aptpl": self.aptpl,
        }
        return json.dumps(doc, indent=1, sort_keys=True).encode()

    def restore(self) -> None:
        """Load APTPL state saved by an earlier run, if any; with a shared store the
        state the other gateways use. A gateway that starts alone clears what was
        registered without APTPL (a power on of the LU)."""
        if self.shared is not None:
            self.refresh()
            if self.registrations and not self.aptpl and self.shared.alone():
                self.transact(self._clear_volatile)
            return
        if self.store is None:
            return
        raw = self.store.load()
        if raw:
            self._load(raw)

    def _clear_volatile(self) -> None:
        """A power on without APTPL: no registrations, PRGENERATION 0 (SPC-4 §6.15.2)."""
        if not self.aptpl:
            self.registrations, self.reservation, self.generation = [], None, 0

    def _load(self, raw: bytes) -> None:
        self.generation, self.registrations, self.reservation, self.aptpl = _parse(raw)


def _parse(raw: bytes) -> tuple[int, list[Registration], Reservation | None, bool]:
    """A stored state document: (generation, registrations, reservation, APTPL)."""
    doc = json.loads(raw)
    if doc.get("version") != STATE_VERSION:
        raise ValueError(f"unsupported persistent reservation state version {doc!r:.40}")
    registrations = [Registration.load(r) for r in doc["registrations"]]
    reservation = None
    res = doc.get("reservation")
    if res is not None:
        holder = res["holder"]
        reservation = Reservation(
            PrType(int(res["type"])),
            None if holder is None else registrations[int(holder)],
        )
    aptpl = bool(doc.get("aptpl", True))  # files of earlier versions: APTPL only
    return int(doc["generation"]), registrations, reservation, aptpl


def matching(initiators: Iterable[Initiator], regs: Iterable[Registration]) -> list[Initiator]:
    """The known I_T nexuses that one of ``regs`` covers."""
    regs = list(regs)
    return [who for who in initiators if any(r.matches(who) for r in regs)]
