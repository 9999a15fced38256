"""Unit leases: which daemon may serve (write) a unit of a pool several hosts see.

A device pool can sit on a SAN LUN that several hosts see; the state-directory lock
(:func:`.locks.hold_state_dir`) and the per-unit serve locks (:mod:`.locks`) only
protect one host. So every unit a daemon serves from a device pool carries a **delta
lease** on the device itself, the way sanlock's delta leases and VMFS heartbeats work:
the owner writes its id and a heartbeat counter into the unit's lease block and bumps
the counter every ``duration / 4``; nobody compares clocks across hosts. A lease whose
owner is not us is free only once we watched its block stay unchanged for a whole lease
duration (the owner's or ours, the longer), or once its owner released it. A daemon
that could not renew for 3/4 of a duration, or finds another owner's record, considers
the lease lost and stops serving the unit (it fences itself, checking every
``duration / 4``: so within one duration of its last renewal, before anyone else may
take the unit over).

Two hosts may see a free lease at once and both write theirs: each waits ``settle``
(``duration / 10``, far longer than one read-then-write of a block) and reads the block
again; the last writer finds its own record and holds the lease, the other finds a
foreign one and goes back to watching.

Lease block (one 4 KiB block, written with O_DIRECT and O_DSYNC; little-endian)::

      0  8  magic "IVMTLEAS"
      8  2  format version (1)
     10  2  state (0 released, 1 held)
     12  4  lease duration in milliseconds (the owner's renewal promise)
     16 16  unit UUID the lease is for (a block copied along with a unit leases nothing)
     32 16  owner id (per state directory, ``<state-dir>/conf/owner.json``)
     48  8  heartbeat counter (every write of the owner changes it)
     56  8  owner's wall clock at that write, ns since the epoch (messages only)
     64  4  owner PID (messages only)
     68  4  reserved
     72 64  owner host name (UTF-8, NUL padded; messages only)
    136 88  reserved
    224 32  SHA-256 of bytes 0..224

A block of zeros (every unit made before leases existed) is a free lease. This module is
sans-I/O: :class:`LeaseMachine` takes what a read returned and the time, and says what
to write (its transitions are the table :data:`TRANSITIONS`); :class:`UnitLease` drives
it over a :class:`LeaseIO` with an injected clock and sleep.
"""

from __future__ import annotations

import enum
import hashlib
import os
import socket
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

from ...errors import IscsiVmtargetError
from ..vm_errors import InUseError

MAGIC: Final = b"IVMTLEAS"
VERSION: Final = 1
BLOCK: Final = 4096
DEFAULT_SECONDS: Final = 20.0
_FIXED = struct.Struct("<8sHHI16s16sQqII64s88s")
_SUM_AT: Final = 224
assert _FIXED.size == _SUM_AT


@dataclass(frozen=True)
class Owner:
    """Who holds (or wants) a lease. ``owner_id`` decides; the rest is for messages."""

    owner_id: uuid.UUID
    host: str = ""
    pid: int = 0

    @classmethod
    def here(cls, owner_id: uuid.UUID) -> Owner:
        return cls(owner_id, socket.gethostname(), os.getpid())

    def describe(self) -> str:
        return f"owner {self.owner_id} (host {self.host or '?'}, PID {self.pid or '?'})"


@dataclass(frozen=True)
class LeaseRecord:
    unit_uuid: uuid.UUID
    owner: Owner
    heartbeat: int
    duration: float  # seconds
    held: bool = True
    wall_ns: int = 0


def encode_record(record: LeaseRecord) -> bytes:
    body = _FIXED.pack(
        MAGIC,  # marker
        VERSION,  # format version
        1 if record.held else 0,  # state
        round(record.duration * 1000),  # lease duration, ms
        record.unit_uuid.bytes,  # unit UUID
        record.owner.owner_id.bytes,  # owner id
        record.heartbeat,  # heartbeat counter
        record.wall_ns,  # owner's wall clock (messages only)
        record.owner.pid,  # owner PID
        0,  # reserved
        record.owner.host.encode()[:64],  # host name
        b"",  # reserved
    )
    return (body + hashlib.sha256(body).digest()).ljust(BLOCK, b"\0")


class Unreadable(IscsiVmtargetError):
    """A block that is neither zeros nor a valid lease record (torn or foreign)."""


def decode_record(raw: bytes | bytearray | memoryview) -> LeaseRecord | None:
    """The record in a lease block; None for a block of zeros (never leased)."""
    raw = bytes(raw[: _SUM_AT + 32])
    if not any(raw):
        return None
    if raw[:8] != MAGIC or hashlib.sha256(raw[:_SUM_AT]).digest() != raw[_SUM_AT:]:
        raise Unreadable("not a lease record")
    _m, version, state, ms, unit, owner, beat, wall, pid, _r, host, _r2 = _FIXED.unpack(
        raw[:_SUM_AT]
    )
    if version > VERSION:
        raise Unreadable(f"lease format version {version}")
    return LeaseRecord(
        uuid.UUID(bytes=unit),
        Owner(uuid.UUID(bytes=owner), host.rstrip(b"\0").decode(errors="replace"), pid),
        beat,
        ms / 1000,
        held=state == 1,
        wall_ns=wall,
    )


class State(enum.Enum):
    IDLE = "idle"  # nothing read yet
    SETTLING = "settling"  # we wrote our record; waiting to see whether it stays
    WATCHING = "watching"  # another owner's record: waiting for it to go stale
    HELD = "held"
    LOST = "lost"  # taken over or not renewed in time: stop serving (terminal)
    RELEASED = "released"  # terminal


class Seen(enum.Enum):
    """What a read of the lease block showed, given what we know."""

    FREE = "free"  # zeros, released, or a record for another unit
    MINE = "mine"  # held by our owner id, but not what we last wrote (a past run of ours)
    CURRENT = "current"  # exactly what we last wrote
    OTHER_NEW = "other-new"  # another owner (or unreadable), changed since last look
    OTHER_SAME = "other-same"  # unchanged, not yet for a whole duration
    OTHER_EXPIRED = "other-expired"  # unchanged for a whole lease duration
    LATE = "late"  # we hold it but did not renew for a whole duration
    RELEASE = "release"  # not a read: we give the lease up


class Action(enum.Enum):
    NONE = "none"
    WRITE = "write"  # write our record with a new heartbeat
    RELEASE = "release"  # write our record marked released
    FENCE = "fence"  # stop writing the unit


#: (state, what was seen) -> (what to do, next state); a pair missing is a bug.
TRANSITIONS: Final[dict[tuple[State, Seen], tuple[Action, State]]] = {
    (State.IDLE, Seen.FREE): (Action.WRITE, State.SETTLING),
    (State.IDLE, Seen.MINE): (Action.WRITE, State.SETTLING),
    (State.IDLE, Seen.OTHER_NEW): (Action.NONE, State.WATCHING),
    (State.IDLE, Seen.RELEASE): (Action.NONE, State.RELEASED),
    (State.SETTLING, Seen.CURRENT): (Action.NONE, State.HELD),
    (State.SETTLING, Seen.FREE): (Action.WRITE, State.SETTLING),
    (State.SETTLING, Seen.MINE): (Action.WRITE, State.SETTLING),
    (State.SETTLING, Seen.OTHER_NEW): (Action.NONE, State.WATCHING),
    (State.SETTLING, Seen.RELEASE): (Action.RELEASE, State.RELEASED),
    (State.WATCHING, Seen.FREE): (Action.WRITE, State.SETTLING),
    (State.WATCHING, Seen.MINE): (Action.WRITE, State.SETTLING),
    (State.WATCHING, Seen.OTHER_NEW): (Action.NONE, State.WATCHING),
    (State.WATCHING, Seen.OTHER_SAME): (Action.NONE, State.WATCHING),
    (State.WATCHING, Seen.OTHER_EXPIRED): (Action.WRITE, State.SETTLING),
    (State.WATCHING, Seen.RELEASE): (Action.NONE, State.RELEASED),
    (State.HELD, Seen.CURRENT): (Action.WRITE, State.HELD),
    (State.HELD, Seen.FREE): (Action.FENCE, State.LOST),
    (State.HELD, Seen.MINE): (Action.FENCE, State.LOST),
    (State.HELD, Seen.OTHER_NEW): (Action.FENCE, State.LOST),
    (State.HELD, Seen.LATE): (Action.FENCE, State.LOST),
    (State.HELD, Seen.RELEASE): (Action.RELEASE, State.RELEASED),
    (State.LOST, Seen.RELEASE): (Action.NONE, State.RELEASED),
}


class LeaseMachine:
    """The delta-lease rules for one unit, without I/O: :meth:`observe` a read (or
    :meth:`release`), then write what :attr:`to_write` holds if the action says so."""

    def __init__(
        self,
        unit_uuid: uuid.UUID,
        me: Owner,
        duration: float,
        wall_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.unit_uuid = unit_uuid
        self.wall_ns = wall_ns  # written into the record for messages; never compared
        self.me = me
        self.duration = duration
        self.state = State.IDLE
        self.to_write = b""  # the block of the last WRITE/RELEASE action
        self.written = b""  # the block we last wrote (what a CURRENT read shows)
        self.heartbeat = 0
        self.renewed_at = 0.0  # when our last write was confirmed or renewed
        self.seen = b""  # the foreign block we watch
        self.seen_since = 0.0  # when it last changed, as seen from here
        self.foreign: LeaseRecord | None = None  # its record, if readable

    def classify(self, raw: bytes, now: float) -> Seen:
        if self.overdue(now):
            return Seen.LATE
        if self.written and raw == self.written:
            return Seen.CURRENT
        try:
            record = decode_record(raw)
        except Unreadable:
            record = None
            foreign = True
        else:
            foreign = record is not None and record.held and record.unit_uuid == self.unit_uuid
        if not foreign:
            return Seen.FREE
        if record is not None and record.owner.owner_id == self.me.owner_id:
            return Seen.MINE
        if raw != self.seen:
            self.seen, self.seen_since, self.foreign = raw, now, record
            return Seen.OTHER_NEW
        if now - self.seen_since >= self.expiry():
            return Seen.OTHER_EXPIRED
        return Seen.OTHER_SAME

    def expiry(self) -> float:
        """How long the watched block must stay unchanged: the owner's promise or
        ours, whichever is longer (an unreadable block: ours)."""
        theirs = self.foreign.duration if self.foreign is not None else 0.0
        return max(theirs, self.duration)

    def observe(self, raw: bytes | bytearray, now: float) -> Action:
        return self._step(self.classify(bytes(raw), now), now)

    def release(self, now: float) -> Action:
        return self._step(Seen.RELEASE, now)

    def overdue(self, now: float) -> bool:
        """Held, but not renewed for 3/4 of a duration (the device does not answer, or
        we were stalled): :meth:`fence` then, whether or not a read ever succeeds
        again. Checked every ``duration / 4``, this stops our writes within one
        duration of our last renewal: before anyone else may take the unit over."""
        return self.state is State.HELD and now - self.renewed_at > self.duration * 3 / 4

    def fence(self, now: float) -> Action:
        return self._step(Seen.LATE, now)

    def _step(self, seen: Seen, now: float) -> Action:
        try:
            action, state = TRANSITIONS[(self.state, seen)]
        except KeyError:
            raise AssertionError(f"lease: no transition from {self.state} on {seen}") from None
        if state is State.HELD and self.state is State.SETTLING:
            self.renewed_at = now
        self.state = state
        if action in (Action.WRITE, Action.RELEASE):
            self.heartbeat += 1
            record = LeaseRecord(
                self.unit_uuid,
                self.me,
                self._next_heartbeat(),
                self.duration,
                held=action is Action.WRITE,
                wall_ns=self.wall_ns(),
            )
            self.to_write = encode_record(record)
        return action

    def _next_heartbeat(self) -> int:
        """Above any counter seen on this block, so every write changes it (a watcher
        compares whole blocks; the counter keeps them distinct across restarts)."""
        for raw in (self.written, self.seen):
            try:
                record = decode_record(raw) if raw else None
            except Unreadable:
                continue
            if record is not None:
                self.heartbeat = max(self.heartbeat, record.heartbeat + 1)
        return self.heartbeat

    def wrote(self, now: float) -> None:
        """The block in :attr:`to_write` is on the device."""
        self.written = self.to_write
        if self.state is State.HELD:
            self.renewed_at = now

    def expires_in(self, now: float) -> float:
        """Seconds until the watched lease may be taken, if its owner stops renewing."""
        return max(0.0, self.seen_since + self.expiry() - now)


class LeaseIO(Protocol):
    """Reads and writes one lease block, bypassing every cache (O_DIRECT + O_DSYNC)."""

    def read(self) -> bytes: ...

    def write(self, block: bytes) -> None: ...

    def close(self) -> None: ...


class LeaseHeldError(InUseError):
    """A unit is leased by a live owner elsewhere."""


@dataclass
class UnitLease:
    """One unit's lease, driven over ``io``. :meth:`attempt` never waits a whole
    lease duration: it returns False while another owner's lease is live, and a later
    call goes on watching from where this one left off."""

    io: LeaseIO
    machine: LeaseMachine
    what: str  # "unit <uuid> of VM <name>", for messages
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep

    @property
    def settle(self) -> float:
        return self.machine.duration / 10

    @property
    def renew_interval(self) -> float:
        return self.machine.duration / 4

    @property
    def state(self) -> State:
        return self.machine.state

    def _do(self, action: Action) -> None:
        if action in (Action.WRITE, Action.RELEASE):
            self.io.write(self.machine.to_write)
            self.machine.wrote(self.clock())

    def attempt(self) -> bool:
        """One try at holding the lease; True once held."""
        for _ in range(8):  # a few rounds of contention, then back to the caller
            self._do(self.machine.observe(self.io.read(), self.clock()))
            if self.machine.state is not State.SETTLING:
                break
            self.sleep(self.settle)
        return self.machine.state is State.HELD

    def renew(self) -> bool:
        """Bump the heartbeat; False (and the lease is LOST) if it was taken over or
        not renewed in time."""
        if self.machine.state is not State.HELD:
            return False
        try:
            self._do(self.machine.observe(self.io.read(), self.clock()))
        except OSError:
            if self.machine.overdue(self.clock()):
                self.machine.fence(self.clock())
                return False
            raise  # the caller retries at the next round
        return self.machine.state is State.HELD

    def release(self) -> None:
        """Give the lease up (clean shutdown): the next owner need not wait."""
        if self.machine.state in (State.HELD, State.SETTLING):
            # write released only if the block still holds our record
            if self.io.read() != self.machine.written:
                self.machine.state = State.LOST
        self._do(self.machine.release(self.clock()))

    def busy_message(self) -> str:
        """Why the unit is not ours yet: its owner and when its lease would expire."""
        record = self.machine.foreign
        now = self.clock()
        left = self.machine.expires_in(now)
        at = time.strftime("%H:%M:%S", time.gmtime(time.time() + left))
        owner = record.owner.describe() if record is not None else "an unreadable lease block"
        return (
            f"{self.what} is leased by {owner}; the lease expires at {at} UTC "
            f"(in {left:.1f} s) if not renewed"
        )
