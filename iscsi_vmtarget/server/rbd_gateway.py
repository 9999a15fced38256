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

log = logging.getLogger("iscsi_vmtarget")

#: Image metadata key naming the target port group of the gateway owning the image.
OWNER_KEY = "iscsi_vmtarget.alua.owner"
#: How often each gateway checks its images' locks (seconds). A dead owner is
#: noticed once its watch expired (``osd client watch timeout``, 30 s by default).
POLL_SECONDS = 1.0


@dataclass(eq=False)
class _Served:
    lu: LogicalUnit
    backend: RbdBackend
    groups: PortGroups
    lock: ImageLock
    why: str = field(default="")


class GatewayKeeper:
    """The RBD LUNs this process serves and the thread keeping their ownership."""

    def __init__(self) -> None:
        self._served: list[_Served] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def adopt(self, lu: LogicalUnit, backend: RbdBackend, group: int) -> None:
        """Serve ``lu`` as target port group ``group``: active at once if the image is
        free (or its owner dead), standby otherwise."""
        served = _Served(lu, backend, PortGroups(group), ImageLock(backend))
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
        with self._lock:
            served, self._served = self._served, []
        for s in served:
            if not s.backend.closed and s.lock.held():
                s.lock.release()

    def _run(self) -> None:
        while True:
            threading.Event().wait(POLL_SECONDS)
            with self._lock:
                self._served = [s for s in self._served if not s.backend.closed]
                served = list(self._served)
            for s in served:
                self.check(s)

    def check(self, s: _Served) -> None:
        """One round for one LUN: keep, take or lose the image, set the ALUA states."""
        others: dict[int, AccessState] = {}
        try:
            if s.lock.held() or s.lock.take_over():
                state, why = AccessState.ACTIVE_OPTIMIZED, "owns the image"
                if s.groups.state is not AccessState.ACTIVE_OPTIMIZED:
                    s.backend.metadata_store(OWNER_KEY).save(str(s.groups.own).encode())
            else:
                state, why = AccessState.STANDBY, "another gateway owns the image"
                owner = s.backend.metadata_store(OWNER_KEY).load()
                if owner and owner.isdigit():
                    others[int(owner)] = AccessState.ACTIVE_OPTIMIZED
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


#: The keeper of this process.
KEEPER = GatewayKeeper()


def serve_rbd_lun(lu: LogicalUnit, backend: RbdBackend, group: int) -> None:
    """Put a writable RBD LUN under ownership and ALUA as target port group ``group``."""
    KEEPER.adopt(lu, backend, group)
