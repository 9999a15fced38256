"""Unit leases on rbd pools: RBD's exclusive lock, with fencing, as the lease.

Every unit a daemon serves from an rbd pool is leased through a small companion image,
``.<unit uuid>.lease`` (thin, 4 KiB, never written; the pool's scan skips names that
start with a dot). Its owner holds that image's exclusive lock explicitly
(:class:`~iscsi_vmtarget.storage.rbd_lock.ImageLock`); the lock lives as long as the
owner's watch on the image, which the OSDs drop ``osd client watch timeout`` seconds
after the owner stopped answering. Not on the unit image itself: a daemon opens one
unit several times (header, data, views) and librbd would refuse every handle but the
one holding the lock.

Taking over from a dead owner fences it first (``osd blocklist add`` of its client
address): a daemon that was only paused and wakes up has every request of its
connection refused, the writes of its data handles too, before anyone else writes the
unit. The object has the interface :class:`~.lease_device.LeaseKeeper` drives
(``attempt``, ``renew``, ``release``, ``busy_message``, ``state``).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from ...storage import BackendError
from ...storage.rbd import RbdBackend, RbdImageSpec, RbdPoolSpec, create_image, image_exists
from ...storage.rbd_lock import ImageLock
from .lease import State

#: Size of a lease image (never written: only its lock and watch matter).
LEASE_IMAGE_SIZE = 4096


def lease_name(unit_uuid: uuid.UUID | str) -> str:
    """The name of a unit's lease image (a leading dot: the pool's scan skips it)."""
    return f".{unit_uuid}.lease"


def lease_image(where: RbdPoolSpec, unit_uuid: uuid.UUID) -> RbdImageSpec:
    return RbdImageSpec(where, lease_name(unit_uuid))


@dataclass(frozen=True)
class _Unit:
    unit_uuid: uuid.UUID


class RbdUnitLease:
    """One unit's lease on an rbd pool (see the module docstring)."""

    def __init__(self, where: RbdPoolSpec, unit_uuid: uuid.UUID, what: str) -> None:
        self.machine = _Unit(unit_uuid)  # what LeaseKeeper.status reads
        self.what = what
        self.io = self  # LeaseKeeper closes ``lease.io``
        self.spec = lease_image(where, unit_uuid)
        self._backend: RbdBackend | None = None
        self._state = State.IDLE
        self._owner: str | None = None

    @property
    def state(self) -> State:
        return self._state

    def _lock(self) -> ImageLock:
        if self._backend is None:
            if not image_exists(self.spec):
                try:
                    create_image(self.spec, LEASE_IMAGE_SIZE)
                except BackendError:
                    if not image_exists(self.spec):  # not just made by another daemon
                        raise
            self._backend = RbdBackend(self.spec)
        return ImageLock(self._backend)

    def attempt(self) -> bool:
        """Hold the lease if it is free or its owner is gone (fenced first)."""
        try:
            lock = self._lock()
            held = lock.take_over()
            self._owner = None if held else lock.owner()
        except BackendError as exc:  # cluster unreachable: wait, as for a live owner
            held, self._owner = False, f"? ({exc})"
        self._state = State.HELD if held else State.WATCHING
        return held

    def renew(self) -> bool:
        """Still ours? False (LOST) once the lock was broken or our connection fenced."""
        if self._state is not State.HELD:
            return False
        if self._backend is None or not ImageLock(self._backend).held():
            self._state = State.LOST
            return False
        return True

    def release(self) -> None:
        if self._backend is not None and self._state is State.HELD:
            ImageLock(self._backend).release()
        self._state = State.RELEASED

    def busy_message(self) -> str:
        return (
            f"{self.what} is leased by the RBD client at {self._owner}; taken over "
            "(fenced first) once its watch on the lease image expires"
        )

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None


def held_elsewhere(where: RbdPoolSpec, unit_uuid: uuid.UUID) -> str | None:
    """The client address of another process holding a live lease on the unit (its
    lock owner still watches the lease image), or None: never leased, released, its
    owner dead, or this very process (a command run inside the serving daemon)."""
    spec = lease_image(where, unit_uuid)
    if not image_exists(spec):
        return None
    backend = RbdBackend(spec)  # librbd lists lock owners through writable handles only
    try:
        lock = ImageLock(backend)
        owner = lock.owner()
        if owner is None or owner == backend.client_address():
            return None
        return owner if lock.alive(owner) else None
    finally:
        backend.close()
