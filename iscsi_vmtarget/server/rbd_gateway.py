"""One RBD LUN served by several gateways: ownership by RBD's exclusive lock, and the
ALUA state (SPC-4 §5.15) each gateway tells its initiators.

Each ``serve`` process (gateway) that opens a writable LUN on an RBD image gives the
logical unit :class:`~iscsi_vmtarget.scsi.alua.PortGroups` with its own target port
group: the target's ``tpgt`` (one target name on every gateway, a different ``tpgt``
on each). The gateway holding the image's exclusive lock
(:class:`~iscsi_vmtarget.storage.rbd_lock.ImageLock`: the lock is the lease) is
active/optimized and records its group in the image's metadata
(``iscsi_vmtarget.alua.owner``) so the others can report it; the others are standby,
refusing media access with NOT READY, so no write of theirs reaches the image (librbd
would refuse it too: the lock is held in managed mode). A thread checks every
:data:`POLL_SECONDS`: a standby whose owner's watch has expired fences it (OSD
blocklist), breaks its lock and becomes active; an owner that lost its lock (it was
fenced while paused) becomes standby. Each change raises the unit attention
ASYMMETRIC ACCESS STATE CHANGED.

**Active/non-optimized non-owners** (``alua_non_owner = "active-non-optimized"`` on the
LUN, as ceph-iscsi reported its other gateways): every gateway serves READs and WRITEs.
Nobody takes the exclusive lock explicitly: librbd's cooperative exclusive lock moves
to whichever handle writes (the holder releases it after its in-flight I/O when
asked), and librbd breaks and blocklists a dead holder's lock
(``rbd_blocklist_on_break_lock``), so only the lock's holder writes and a paused
ex-holder cannot. Reads need no lock (RBD's cache is off on a gateway's connection:
every acknowledged write is on the OSDs). The ALUA owner is then a *role*, not the
lock: the gateway recorded with its client address in a RADOS object beside the image
(:mod:`.alua_role`), active/optimized while that address watches the image; the others
are active/non-optimized. So the reported states do not change while the lock moves
with the writes (and no unit attention is raised for that). When the role's holder
died (its watch is gone) the gateways that notice fence its address first (OSD
blocklist), then record themselves by compare-and-swap: exactly one succeeds, the one
state change, with ASYMMETRIC ACCESS STATE CHANGED; the others read the winner and
stay active/non-optimized. A gateway that stops cleanly gives the role up at once.
Every gateway of a LUN must use the same mode.
"""

from __future__ import annotations

import atexit
import logging
import threading
from dataclasses import dataclass, field

from ..scsi import LogicalUnit, Reason
from ..scsi.alua import AccessState, PortGroups
from ..storage import BackendError
from ..storage.rbd import RbdBackend
from ..storage.rbd_lock import ImageLock
from .alua_role import OWNER_KEY, OwnerRole, parse_record

log = logging.getLogger("iscsi_vmtarget")

#: The values of a LUN's ``alua_non_owner`` and the state each gives a non-owner.
NON_OWNER_STATES = {
    "standby": AccessState.STANDBY,
    "active-non-optimized": AccessState.ACTIVE_NON_OPTIMIZED,
}


def check_non_owner(text: str) -> str:
    """A LUN's ``alua_non_owner``; ValueError naming a bad value."""
    if text not in NON_OWNER_STATES:
        raise ValueError(
            f"alua_non_owner {text!r} is not one of: {', '.join(map(repr, NON_OWNER_STATES))}"
        )
    return text


#: How many times a gateway reads the owner role in one round at most: after losing
#: the compare-and-swap for it, the next read finds the winner (alive).
_TAKE_TRIES = 3

#: How often each gateway checks its images' locks (seconds). A dead owner is
#: noticed once its watch expired (``osd client watch timeout``, 30 s by default).
POLL_SECONDS = 1.0


@dataclass(eq=False)
class _Served:
    lu: LogicalUnit
    backend: RbdBackend
    groups: PortGroups
    lock: ImageLock
    #: the owner role (active/non-optimized mode only)
    role: OwnerRole | None = None
    why: str = field(default="")


class GatewayKeeper:
    """The RBD LUNs this process serves and the thread keeping their ownership."""

    def __init__(self) -> None:
        self._served: list[_Served] = []
        self._lock = threading.Lock()
        #: held through each round of checks: at exit, no round runs on (it could take
        #: the ALUA owner role again once given up)
        self._round = threading.Lock()
        self._thread: threading.Thread | None = None

    def adopt(
        self,
        lu: LogicalUnit,
        backend: RbdBackend,
        group: int,
        non_owner: AccessState = AccessState.STANDBY,
    ) -> None:
        """Serve ``lu`` as target port group ``group``: active/optimized at once if the
        image is free (or its owner dead), ``non_owner`` otherwise."""
        groups = PortGroups(group, non_owner=non_owner)
        role = OwnerRole(backend) if non_owner is AccessState.ACTIVE_NON_OPTIMIZED else None
        served = _Served(lu, backend, groups, ImageLock(backend), role)
        lu.alua = served.groups
        self.check(served)
        with self._lock:
            self._served.append(served)
            if self._thread is None:
                atexit.register(self.release_all)
                self._thread = threading.Thread(target=self._run, name="rbd-gateway", daemon=True)
                self._thread.start()

    def release_all(self) -> None:
        """Give up every lock this process holds (at exit: a gateway that stops
        cleanly hands its images over at once, not after its watch expired)."""
        with self._round, self._lock:
            served, self._served = self._served, []
        for s in served:
            if s.backend.closed:
                continue
            if s.role is not None:
                try:
                    s.role.give_up(s.groups.own, s.lock.address())
                except BackendError as exc:  # the others take it once our watch is gone
                    log.warning("RBD image %s: ALUA owner role kept: %s", s.backend.spec, exc)
            if s.lock.held():
                s.lock.release()
            # and unwatch: a watch a process leaves behind lingers until it times out,
            # and every header update of the others (librbd notifies each watcher:
            # taking the lock or the role, moving the lock) would wait for it
            s.backend.close()

    def _run(self) -> None:
        while True:
            threading.Event().wait(POLL_SECONDS)
            with self._round:
                with self._lock:
                    self._served = [s for s in self._served if not s.backend.closed]
                    served = list(self._served)
                for s in served:
                    self.check(s)

    def check(self, s: _Served) -> None:
        """One round for one LUN: keep, take or lose the image, set the ALUA states."""
        others: dict[int, AccessState] = {}
        try:
            if s.role is not None:
                state, why = self._role(s, s.role, others)
            elif s.lock.held() or s.lock.take_over():
                state, why = AccessState.ACTIVE_OPTIMIZED, "owns the image"
                if s.groups.state is not AccessState.ACTIVE_OPTIMIZED:
                    s.backend.metadata_store(OWNER_KEY).save(str(s.groups.own).encode())
            else:
                state, why = AccessState.STANDBY, "another gateway owns the image"
                owner, _ = parse_record(s.backend.metadata_store(OWNER_KEY).load())
                if owner is not None:
                    others[owner] = AccessState.ACTIVE_OPTIMIZED
        except BackendError as exc:
            if s.backend.closed:
                return
            state, why = AccessState.STANDBY, str(exc)
        if s.groups.set_state(state, others):
            s.lu.establish_attention(Reason.ASYMMETRIC_ACCESS_STATE_CHANGED)
        if why != s.why:
            log.info(
                "RBD image %s: %s, target port group %d %s",
                s.backend.spec,
                why,
                s.groups.own,
                state.name.lower().replace("_", "/"),
            )
            s.why = why

    def _role(
        self, s: _Served, role: OwnerRole, others: dict[int, AccessState]
    ) -> tuple[AccessState, str]:
        """Active/non-optimized mode: keep or take the ALUA owner role (never the lock,
        which librbd moves with the writes); the other holder goes into ``others``."""
        me = s.lock.address()
        for _ in range(_TAKE_TRIES):
            seen = role.holder()
            if (seen.group, seen.address) == (s.groups.own, me):
                return AccessState.ACTIVE_OPTIMIZED, "holds the ALUA owner role"
            # a record without an address (of the standby mode, left by a gateway that
            # stopped) names nobody alive: taken without fencing
            if seen.group is not None and seen.address is not None and s.lock.alive(seen.address):
                others[seen.group] = AccessState.ACTIVE_OPTIMIZED
                return AccessState.ACTIVE_NON_OPTIMIZED, "another gateway holds the ALUA owner role"
            if seen.address is not None and seen.address != me:
                # fence first: a paused ex-holder that wakes up must not write (every
                # gateway that found it dead does; blocklisting twice is harmless)
                log.warning(
                    "RBD image %s: ALUA owner %s is gone; fencing it", s.backend.spec, seen.address
                )
                s.lock.fence(seen.address)
            if role.take(s.groups.own, me, seen):
                return AccessState.ACTIVE_OPTIMIZED, "took the ALUA owner role"
            # another gateway recorded itself since we read: look at the winner
        return AccessState.ACTIVE_NON_OPTIMIZED, "the ALUA owner role is contended"


#: The keeper of this process.
KEEPER = GatewayKeeper()


def serve_rbd_lun(
    lu: LogicalUnit, backend: RbdBackend, group: int, non_owner: str = "standby"
) -> None:
    """Put a writable RBD LUN under ownership and ALUA as target port group ``group``;
    ``non_owner``: what the gateways that do not own it are (:data:`NON_OWNER_STATES`)."""
    KEEPER.adopt(lu, backend, group, NON_OWNER_STATES[check_non_owner(non_owner)])
