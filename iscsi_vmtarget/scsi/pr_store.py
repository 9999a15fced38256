"""Where APTPL persistent reservation state lives: a small file beside the backing store.

The one piece of ``scsi/`` that touches the file system, kept behind the
:class:`~.pr_state.PrStore` protocol so the reservation logic stays pure and
tests can pass a :class:`MemoryPrStore`. Writes are crash-atomic: a temporary
file is written and fsynced, renamed over the old one, and the directory is
fsynced, so a restart finds either the old state or the new one.
"""

from __future__ import annotations

import os


class FilePrStore:
    """APTPL state in ``path`` (conventionally ``<backing file>.pr``)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def load(self) -> bytes | None:
        try:
            with open(self.path, "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            return None

    def save(self, data: bytes) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        tmp = f"{self.path}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        _fsync_dir(directory)

    def clear(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return
        _fsync_dir(os.path.dirname(os.path.abspath(self.path)))


class MemoryPrStore:
    """In-memory store for tests (and for LUs that must not persist anything)."""

    def __init__(self, data: bytes | None = None) -> None:
        self.data = data

    def load(self) -> bytes | None:
        return self.data

    def save(self, data: bytes) -> None:
        self.data = bytes(data)

    def clear(self) -> None:
        self.data = None


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
