"""RBD's exclusive lock as a gateway's ownership of an image, with fencing.

In the standby mode of ALUA (``server/rbd_gateway.py``) the gateway that serves an
image takes the lock explicitly (``lock_acquire``): librbd then runs it in "managed"
mode and never hands it to another client that asks for it (a write through another
handle fails with EROFS instead of moving the lock). The lock is the lease: it lives
as long as its owner's watch on the image header, which the OSDs drop ``osd client
watch timeout`` seconds after the owner stopped answering. (In the active/non-optimized
mode nobody takes it explicitly: librbd moves it to whichever gateway writes, and only
:meth:`ImageLock.alive`, :meth:`ImageLock.fence` and :meth:`ImageLock.address` serve.)

Taking over from a dead owner (:meth:`ImageLock.take_over`): the owner's client address
is first put on the OSD blocklist (``osd blocklist add`` through the monitors), then
its lock is broken, and only then is the lock taken. Blocklisting is the fence: a
gateway that was only paused (SIGSTOP, a long GC, a VM migration) and wakes up has
every later operation refused by the OSDs, so it cannot write over the new owner's
data, whatever it still believes.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from .backend import BackendError
from .rbd import RbdBackend, bindings

log = logging.getLogger(__name__)


class ImageLock:
    """The exclusive lock of one open (writable) image."""

    def __init__(self, backend: RbdBackend) -> None:
        self.backend = backend
        _, self._rbd = bindings()

    def _image(self) -> Any:
        return self.backend.handle()

    def held(self) -> bool:
        """Whether this handle holds the lock now (False when the cluster refuses to
        answer: a fenced client holds nothing)."""
        try:
            return bool(self._image().is_exclusive_lock_owner())
        except (self._rbd.Error, BackendError):
            return False

    def try_take(self) -> bool:
        """Take the lock if nobody holds it; True when held now."""
        try:
            self._image().lock_acquire(self._rbd.RBD_LOCK_MODE_EXCLUSIVE)
        except self._rbd.Error:
            return False
        return self.held()

    def owner(self) -> str | None:
        """The client address of the lock's owner, or None when it is free."""
        try:
            owners = list(self._image().lock_get_owners())
        except self._rbd.Error as exc:
            raise BackendError(f"RBD image {self.backend.spec}: lock owner unknown: {exc}") from exc
        return str(owners[0]["owner"]) if owners else None

    def address(self) -> str:
        """This client's address, as lock owners and watchers name it."""
        return self.backend.client_address()

    def alive(self, address: str) -> bool:
        """Whether the client at ``address`` still watches the image (its session with
        the OSDs is alive)."""
        return address in self.backend.watchers()

    def fence(self, address: str) -> None:
        """Put ``address`` on the OSD blocklist (SPC's "fencing": its later I/O fails)."""
        command = {"prefix": "osd blocklist", "blocklistop": "add", "addr": address}
        ret, _, status = self.backend.cluster.mon_command(json.dumps(command), b"")
        if ret:
            raise BackendError(f"cannot blocklist {address}: {status} (errno {-ret})")

    def take_over(self) -> bool:
        """Own the image if it is free, or if its owner is dead: fence the owner, break
        its lock, take it. False (nothing done) while a live owner holds it."""
        if self.held():
            return True
        owner = self.owner()
        if owner is None:
            return self.try_take()
        if self.alive(owner):
            return False
        log.warning("RBD image %s: owner %s is gone; fencing it", self.backend.spec, owner)
        self.fence(owner)
        try:
            self._image().lock_break(self._rbd.RBD_LOCK_MODE_EXCLUSIVE, owner)
        except self._rbd.ImageNotFound:
            pass  # broken meanwhile
        except self._rbd.Error as exc:
            raise BackendError(
                f"RBD image {self.backend.spec}: cannot break the lock: {exc}"
            ) from exc
        return self.try_take()

    def release(self) -> None:
        try:
            self._image().lock_release()
        except (self._rbd.Error, BackendError):
            pass
