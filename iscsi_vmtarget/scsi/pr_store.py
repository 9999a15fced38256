"""Where APTPL persistent reservation state lives: a small file beside the backing store.

The one piece of ``scsi/`` that touches the file system, kept behind the
:class:`~.pr_state.PrStore` protocol so the reservation logic stays pure and
tests can pass a :class:`MemoryPrStore`. Writes are crash-atomic
(:mod:`iscsi_vmtarget.storage.atomic_file`, a plain file helper that knows nothing
of SCSI): a restart finds either the old state or the new one.
"""

from __future__ import annotations

from ..storage import atomic_file


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
        atomic_file.write_file(self.path, data, tmp=f"{self.path}.tmp", mode=0o600)

    def clear(self) -> None:
        atomic_file.remove(self.path, missing_ok=True)


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
