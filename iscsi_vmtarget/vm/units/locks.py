"""Advisory locks (flock) that tell management commands a unit is in use.

A server exporting a unit holds ``<state-dir>/locks/<unit uuid>.lock`` shared for as
long as it runs; ``vm delete`` and ``vm resize`` need it exclusive and so refuse while
a server exports the VM (a daemon admin socket, which could also tell whether sessions
are logged in, does not exist yet). Every management command that writes takes
``pool.<name>.lock`` exclusive, so two of them never interleave their commits (nor
allocations in a device pool's table); a command that works in several such steps
holds an :func:`operation` lock meanwhile, so a repair elsewhere can tell it from a
crashed one. flock locks die with their process, so a kill -9 never leaves anything
locked.

``serve`` holds ``<state-dir>/locks/daemon.lock`` exclusive for its lifetime
(:func:`hold_state_dir`), with its PID written inside: a second ``serve`` on the same
state directory stops at once, naming the first, instead of exporting the same units a
second time (two writers, two caches over one unit) and taking over ``admin.sock``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import uuid
from collections.abc import Iterator

from ...storage import atomic_file
from ..vm_errors import InUseError


def _path(state_dir: str, unit_uuid: uuid.UUID, suffix: str) -> str:
    directory = os.path.join(state_dir, "locks")
    os.makedirs(directory, exist_ok=True)
    return os.path.join(directory, f"{unit_uuid}.{suffix}")


def _open(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


class ServeLock:
    """Held (shared) by a server for every unit it exports."""

    def __init__(self, state_dir: str, unit_uuid: uuid.UUID) -> None:
        """Waits while a management command (resize, delete) holds the unit."""
        self._fd = _open(_path(state_dir, unit_uuid, "lock"))
        fcntl.flock(self._fd, fcntl.LOCK_SH)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@contextlib.contextmanager
def not_served(state_dir: str, unit_uuid: uuid.UUID, what: str) -> Iterator[None]:
    """Hold the serve lock exclusively: no server exports the unit meanwhile."""
    fd = _open(_path(state_dir, unit_uuid, "lock"))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InUseError(
                f"{what} is exported by a running iscsi-vmtarget server; stop it first "
                "(or --force where offered)"
            ) from None
        yield
    finally:
        os.close(fd)


def is_served(state_dir: str, unit_uuid: uuid.UUID) -> bool:
    return _held_elsewhere(os.path.join(state_dir, "locks", f"{unit_uuid}.lock"))


def _held_elsewhere(path: str) -> bool:
    """Whether another open of the lock file ``path`` holds it (shared or not)."""
    if not os.path.exists(path):
        return False
    fd = _open(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@contextlib.contextmanager
def pool_lock(state_dir: str, pool: str) -> Iterator[None]:
    """Serialise every writing management command on one pool (and its units)."""
    with atomic_file.locked(operation_path(state_dir, f"pool.{pool}")):
        yield


@contextlib.contextmanager
def operation(state_dir: str, name: str) -> Iterator[None]:
    """Held (exclusive) while a multi-step command runs - a clone builds its VM under
    a temporary name between two pool-lock sections - so a repair in another process
    leaves that command's intent alone (:func:`operation_running`)."""
    path = operation_path(state_dir, name)
    with atomic_file.locked(path):
        yield
        os.unlink(path)  # while held: names are never reused, so nobody waits on it


def operation_path(state_dir: str, name: str) -> str:
    """``<state-dir>/locks/<name>.lock``."""
    directory = os.path.join(state_dir, "locks")
    os.makedirs(directory, exist_ok=True)
    return os.path.join(directory, f"{name}.lock")


def operation_running(state_dir: str, name: str) -> bool:
    """Whether a live process holds :func:`operation` ``name`` (kill -9 releases it)."""
    return _held_elsewhere(operation_path(state_dir, name))


DAEMON_LOCK = "daemon"


def hold_state_dir(state_dir: str) -> int:
    """Lock ``state_dir`` for this daemon (exclusive flock, kept until the process
    exits, which releases it even on kill -9) and write our PID and host into the lock
    file; the open descriptor is returned. InUseError, naming the holder, if another
    process holds it."""
    path = operation_path(state_dir, DAEMON_LOCK)
    fd = _open(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise InUseError(
            f"state directory {state_dir} is served by {holder} (lock file {path}); "
            "stop it first or use another --state-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    return fd


def state_dir_holder(state_dir: str) -> str | None:
    """ "PID n on host" of the daemon holding ``state_dir``, or None if none does."""
    path = operation_path(state_dir, DAEMON_LOCK)
    if not os.path.exists(path):
        return None
    fd = _open(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd)
        return None
    finally:
        os.close(fd)


def _read_holder(fd: int) -> str:
    words = os.pread(fd, 256, 0).decode(errors="replace").split()
    if not words:  # the holder has locked but not yet written its PID
        return "another process"
    return f"PID {words[0]}" + (f" on {words[1]}" if len(words) > 1 else "")
