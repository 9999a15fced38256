"""The block backend interface: what every storage backend offers the layers above.

The storage layer knows nothing of SCSI: it sees byte offsets and lengths on a flat
object of fixed size, in the spirit of LIO's ``exec_cmd_ops`` (rw, sync, unmap).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..errors import IscsiVmtargetError


class BackendError(IscsiVmtargetError):
    """An I/O error from a backend (maps to MEDIUM ERROR or similar above)."""


@runtime_checkable
class BlockBackend(Protocol):
    """A fixed-size byte-addressed store.

    Callers guarantee ``0 <= offset`` and ``offset + length <= size``; backends
    still refuse out-of-range requests with :class:`ValueError` as a last guard for
    management callers (unit headers, pool copies), nothing more. Who owns the check
    of a guest's request: the SCSI layer's ``check_lba_range`` (LOGICAL BLOCK ADDRESS
    OUT OF RANGE sense, SBC-3 §4.5) for an initiator; ``vm.view.GuestView`` for
    isolation (no byte outside the guest's disk, whoever asks); ``vm.cow.ChainBackend``
    only where it maps offsets to delta layers itself (with no layers it trusts its
    guest view).
    Optional abilities are the protocols below (:class:`AllocationMap`,
    :class:`WrittenMap`, :class:`Zeroing`, :class:`CryptoErasable`,
    :class:`CapacityNotifier`, :class:`AsyncIO`, :class:`NowaitCapable`), read once
    into :class:`Abilities` where a logical unit is built, never looked up per command.
    """

    @property
    def size(self) -> int:
        """Size in bytes."""
        ...

    @property
    def read_only(self) -> bool: ...

    def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` from ``offset``; holes read as zeros."""
        ...

    def read(self, offset: int, length: int) -> bytearray:
        """Return ``length`` bytes from ``offset``."""
        ...

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``offset`` (may stay in the page cache until flush)."""
        ...

    def flush(self) -> None:
        """Make every completed write durable (fdatasync)."""
        ...

    def unmap(self, offset: int, length: int) -> None:
        """Deallocate a range; it then reads as zeros."""
        ...

    def resize(self, size: int) -> None:
        """Grow (or shrink) to ``size`` bytes."""
        ...

    def close(self) -> None: ...


Ranges = list[tuple[int, int]]
RangeFinder = Callable[[int, int], Ranges]
CapacityListener = Callable[[int, int], None]


@runtime_checkable
class AllocationMap(Protocol):
    """Knows which extents hold data (holes are not), for GET LBA STATUS (SBC-3 §5.7)."""

    def allocated_ranges(self, offset: int, length: int) -> Ranges:
        """``(offset, length)`` of the data extents within the range, in order."""
        ...


@runtime_checkable
class WrittenMap(Protocol):
    """Tells written data from preallocated but unwritten extents (a thick LU's
    anchored blocks, SBC-4 §4.7.2.2)."""

    def written_ranges(self, offset: int, length: int) -> Ranges: ...


@runtime_checkable
class Zeroing(Protocol):
    """Zeros a range and keeps its allocation (what a resource-provisioned LU's
    UNMAP does, SBC-4 §4.7.2.2)."""

    def zero_range(self, offset: int, length: int) -> None: ...


@runtime_checkable
class CryptoErasable(Protocol):
    """Encrypts what it stores and can replace the key (SANITIZE CRYPTO ERASE,
    SBC-3 §5.30.3): every block becomes unreadable at once."""

    def crypto_erase(self) -> None: ...


@runtime_checkable
class CapacityNotifier(Protocol):
    """Changes size under its user (a live resize, a revert) and says so."""

    def add_capacity_listener(self, listener: CapacityListener) -> None:
        """Call ``listener(old_size, new_size)`` after every size change."""
        ...


@runtime_checkable
class Remeasurable(Protocol):
    """Sees its object grown through another handle once asked (an RBD image that
    another open image resized): measures itself again and returns the new size."""

    def remeasure(self) -> int: ...


ReadDone = Callable[["bytes | BackendError"], None]
WriteDone = Callable[["BackendError | None"], None]


@runtime_checkable
class AsyncIO(Protocol):
    """Starts a read or write and returns at once (librbd's ``aio_*``): a remote
    backend's caller then need not hold a thread for each round trip. ``done`` is
    called exactly once, from whatever thread the backend completes in, with the data
    read (holes as zeros, always the full length) or a :class:`BackendError`; it
    must not block. A request the backend refuses outright raises instead (and
    ``done`` is not called); one it refuses only when it sends it on (RBD sends the
    requests of one event-loop turn together, merged: storage/rbd_aio.py) fails
    through ``done``. Writes are acknowledged like :meth:`BlockBackend.write`:
    durable only after :meth:`BlockBackend.flush`."""

    def start_read(self, offset: int, length: int, done: ReadDone) -> None: ...

    def start_write(self, offset: int, data: bytes | bytearray | memoryview,
                    done: WriteDone) -> None: ...


@runtime_checkable
class MergeCounting(Protocol):
    """Sends adjacent requests on merged, and counts them: what iostat's rrqm/s and
    wrqm/s count for a block device (RBD: storage/rbd_aio.py)."""

    def merged_requests(self) -> tuple[int, int]:
        """Reads and writes merged into an adjacent one so far."""
        ...


@runtime_checkable
class NowaitCapable(Protocol):
    """Honours nowait mode (:mod:`.nowait`) for the kinds of I/O ``nowait_io`` names
    ("read", "write"): in it such an I/O either completes without blocking or raises
    :class:`~.nowait.WouldBlock`, and one cut off that way has had no effect but bytes
    of a write written, so running the same I/O again completes it. Only for a pure
    offset mapping onto files (a file, a window of one, a guest view over them), never
    for a store that does other work before the medium I/O (a copy-on-write chain
    copies up, then writes: cut off, its second run differs)."""

    @property
    def nowait_io(self) -> frozenset[str]: ...


@dataclass(frozen=True)
class Abilities:
    """What one backend offers beyond :class:`BlockBackend`, checked once
    (:meth:`of`) where its logical unit is built: the bound methods, or None."""

    allocated_ranges: RangeFinder | None = None
    written_ranges: RangeFinder | None = None
    zero_range: Callable[[int, int], None] | None = None
    crypto_erase: Callable[[], None] | None = None
    #: every read and write is a network round trip (``remote_io = True`` on the
    #: backend, e.g. RBD): the server runs its medium accesses in worker threads,
    #: or, with :attr:`aio`, starts plain reads and writes without waiting
    remote: bool = False
    #: reads and writes can be started without waiting (:class:`AsyncIO`)
    aio: AsyncIO | None = None
    #: kinds of I/O ("read", "write") tried without blocking (:class:`NowaitCapable`)
    nowait: frozenset[str] = frozenset()

    @classmethod
    def of(cls, backend: object) -> Abilities:
        return cls(
            allocated_ranges=(
                backend.allocated_ranges if isinstance(backend, AllocationMap) else None
            ),
            written_ranges=backend.written_ranges if isinstance(backend, WrittenMap) else None,
            zero_range=backend.zero_range if isinstance(backend, Zeroing) else None,
            crypto_erase=backend.crypto_erase if isinstance(backend, CryptoErasable) else None,
            remote=is_remote(backend),
            aio=backend if isinstance(backend, AsyncIO) else None,
            nowait=backend.nowait_io if isinstance(backend, NowaitCapable) else frozenset(),
        )


def is_remote(backend: object) -> bool:
    """True if I/O on ``backend`` is a network round trip: its own ``remote_io`` (RBD),
    which backends layered over others (views, chains, regions) pass on from theirs."""
    return bool(getattr(backend, "remote_io", False))


def check_range(size: int, offset: int, length: int) -> None:
    """Last-line bounds guard shared by all backends."""
    if offset < 0 or length < 0 or offset + length > size:
        raise ValueError(f"range {offset}+{length} outside backend of {size} bytes")
