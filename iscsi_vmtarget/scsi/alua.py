"""Asymmetric logical unit access (ALUA, SPC-4 §5.15): the target port groups a logical
unit is reached through and the access state of each.

Every gateway serving one LU is one target port group with one target port (its
relative target port identifier is the group's id). The server tells the LU, through
:class:`PortGroups`, which group this process is and what state each known group is in;
scsi/ neither knows why (who holds a lock) nor how the groups are reached.

- Standard INQUIRY reports TPGS=01b (implicit ALUA only: the device server changes
  states itself; SET TARGET PORT GROUPS is not offered).
- REPORT TARGET PORT GROUPS (MAINTENANCE IN, service action 0Ah, SPC-4 §6.37) lists
  the groups, in either parameter data format.
- A gateway that does not own the LU is standby, or active/non-optimized when its
  server chose so (``non_owner``): it then runs every command, like the owner.
- In the standby state only the commands of SPC-4 §5.15.2.4.4 run; the others get
  NOT READY, LOGICAL UNIT NOT ACCESSIBLE, TARGET PORT IN STANDBY STATE (04h/0Bh), or
  ASYMMETRIC ACCESS STATE TRANSITION (04h/0Ah) while transitioning.
"""

from __future__ import annotations

import struct
import threading
from enum import IntEnum
from typing import Final

from .sense import Reason, ScsiError


class AccessState(IntEnum):
    """ASYMMETRIC ACCESS STATE values (SPC-4 §6.37, table 175)."""

    ACTIVE_OPTIMIZED = 0x0
    ACTIVE_NON_OPTIMIZED = 0x1
    STANDBY = 0x2
    UNAVAILABLE = 0x3
    TRANSITIONING = 0xF


#: Byte 1 of a descriptor: T_SUP, S_SUP, AO_SUP (the states this target enters), and
#: AN_SUP when the non-owners are active/non-optimized.
_SUPPORTED_STATES: Final = 0x80 | 0x04 | 0x01
_AN_SUP: Final = 0x02
#: Seconds an implicit transition may take (extended header): a standby fences the
#: dead owner and takes its lock within a few seconds.
IMPLICIT_TRANSITION_SECONDS: Final = 30

#: Commands a port in standby state runs (SPC-4 §5.15.2.4.4), as (opcode, service
#: action or None); READ CAPACITY(16) too, as Linux's sd reads the capacity of
#: every path (LIO allows it as well).
STANDBY_ALLOWED: Final = frozenset(
    {
        (0x12, None),  # INQUIRY
        (0x4C, None),  # LOG SELECT
        (0x4D, None),  # LOG SENSE
        (0x15, None),  # MODE SELECT(6)
        (0x55, None),  # MODE SELECT(10)
        (0x1A, None),  # MODE SENSE(6)
        (0x5A, None),  # MODE SENSE(10)
        (0xA0, None),  # REPORT LUNS
        (0x1C, None),  # RECEIVE DIAGNOSTIC RESULTS
        (0x1D, None),  # SEND DIAGNOSTIC
        (0x03, None),  # REQUEST SENSE
        (0x5E, None),  # PERSISTENT RESERVE IN
        (0x5F, None),  # PERSISTENT RESERVE OUT
        (0xA3, 0x0A),  # REPORT TARGET PORT GROUPS
        (0xA3, 0x0C),  # REPORT SUPPORTED OPERATION CODES
        (0xA3, 0x0D),  # REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS
        (0x9E, 0x10),  # READ CAPACITY(16)
    }
)


#: the states in which a group serves every command (SPC-4 §5.15.2.2, §5.15.2.3)
_ACTIVE = frozenset({AccessState.ACTIVE_OPTIMIZED, AccessState.ACTIVE_NON_OPTIMIZED})


class PortGroups:
    """The target port groups of one LU as this gateway sees them: its own group
    (``own``) and state, and the last known state of the others; ``non_owner``: the
    state of a group that does not own the LU (standby, or active/non-optimized).
    Thread-safe: the server changes states while commands run."""

    def __init__(
        self,
        own: int,
        state: AccessState = AccessState.STANDBY,
        non_owner: AccessState = AccessState.STANDBY,
    ) -> None:
        if not 0 < own <= 0xFFFF:
            raise ValueError(f"target port group {own} is not 1..65535")
        if non_owner not in (AccessState.STANDBY, AccessState.ACTIVE_NON_OPTIMIZED):
            raise ValueError(f"a non-owner group cannot be {non_owner.name}")
        self.own = own
        self.non_owner = non_owner
        self._supported = _SUPPORTED_STATES | (
            _AN_SUP if non_owner is AccessState.ACTIVE_NON_OPTIMIZED else 0
        )
        self._lock = threading.Lock()
        self._states: dict[int, AccessState] = {own: state}

    @property
    def state(self) -> AccessState:
        return self._states[self.own]

    @property
    def active(self) -> bool:
        """This group's state lets every command through (:meth:`check`; the fast
        lane's test, scsi/fast_lane.py)."""
        return self._states[self.own] in _ACTIVE

    def set_state(self, state: AccessState, others: dict[int, AccessState] | None = None) -> bool:
        """Set this group's state (and the others' when given); True when this group's
        state changed (the caller then raises ASYMMETRIC ACCESS STATE CHANGED)."""
        with self._lock:
            changed = self._states[self.own] != state
            states = {self.own: state}
            if others is not None:
                states.update((g, s) for g, s in others.items() if g != self.own)
            else:
                states.update((g, s) for g, s in self._states.items() if g != self.own)
            self._states = states
            return changed

    def states(self) -> dict[int, AccessState]:
        with self._lock:
            return dict(self._states)

    def check(self, opcode: int, service_action: int | None) -> None:
        """Refuse a command this group's state does not allow (SPC-4 §5.15.2.4)."""
        state = self._states[self.own]  # one read: set_state swaps the dict whole
        if state in _ACTIVE:
            return
        if (opcode, service_action) in STANDBY_ALLOWED or (opcode, None) in STANDBY_ALLOWED:
            return
        if state is AccessState.TRANSITIONING:
            raise ScsiError(Reason.ASYMMETRIC_ACCESS_STATE_TRANSITION)
        raise ScsiError(Reason.TARGET_PORT_IN_STANDBY_STATE)

    def report(self, extended: bool) -> bytes:
        """REPORT TARGET PORT GROUPS parameter data (SPC-4 §6.37.2): one descriptor per
        group, each with its one target port (relative id = group id); the length
        header, or the extended header when ``extended`` (PARAMETER DATA FORMAT 001b)."""
        body = b"".join(
            struct.pack(
                ">BBHBBBBHH",
                int(state),  # PREF=0, ASYMMETRIC ACCESS STATE
                self._supported,  # T_SUP .. AO_SUP
                group,  # TARGET PORT GROUP
                0x00,  # reserved
                0x02 if group == self.own else 0x00,  # STATUS CODE: altered implicitly
                0x00,  # vendor specific
                1,  # TARGET PORT COUNT
                0,  # obsolete
                group,  # RELATIVE TARGET PORT IDENTIFIER
            )
            for group, state in sorted(self.states().items())
        )
        if extended:
            return struct.pack(">IBBH", len(body) + 4, 0x10, IMPLICIT_TRANSITION_SECONDS, 0) + body
        return struct.pack(">I", len(body)) + body
