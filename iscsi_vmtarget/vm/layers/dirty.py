"""Dirty-grain tracking: what a live copy of a served volume still owes.

A live move (:mod:`..operations.move`) copies a volume while its LUN keeps serving. Before the
first byte is copied, a :class:`DirtyGrains` is hooked onto the volume's
:class:`~.cow.ChainBackend` (``write_hook``): every write or unmap that completes
from then on marks the 64 KiB grains it touched. The copy then catches up in passes
(:func:`copy_dirty`): take the set, re-read each grain through the served chain,
write it into the copy.

Why this loses nothing: the hook runs *after* the write, inside the chain's I/O gate.
A grain taken for a pass is re-read after it was taken, so the write that marked it
is already in the source; a write that completes after the take marks the next set.
A read torn by a concurrent write is re-copied by the next pass for the same reason.
The last pass runs with the LUN quiesced (no write in flight, none admitted), so the
copy then equals the source exactly.

A grain is copied as a whole grain: into a copy-on-write chain a whole-grain write
never copies up from below, so the copy's top layer ends up holding exactly the grains
the source's top holds (a grain that reads as zeros is unmapped instead, which keeps
sparse files sparse and still marks the grain in a delta's allocation map).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from ...storage.backend import BlockBackend
from .cow import GRAIN, is_zero

#: Reads ``len(buf)`` bytes at a guest offset into ``buf`` (a chain's read_into, or
#: its read_quiesced while the LUN is held).
Reader = Callable[[int, memoryview], None]


class DirtyGrains:
    """The grains of one volume written since the last :meth:`take` (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._grains: set[int] = set()

    def mark(self, offset: int, length: int) -> None:
        """The ``write_hook`` of a chain: ``length`` bytes at ``offset`` were written."""
        if length <= 0:
            return
        first, last = offset // GRAIN, (offset + length - 1) // GRAIN
        with self._lock:
            if first == last:
                self._grains.add(first)
            else:
                self._grains.update(range(first, last + 1))

    def take(self) -> list[int]:
        """The grains marked so far, in order; the set starts empty again."""
        with self._lock:
            grains, self._grains = self._grains, set()
        return sorted(grains)

    def __len__(self) -> int:
        with self._lock:
            return len(self._grains)


def copy_dirty(read: Reader, dest: BlockBackend, grains: Iterable[int], size: int) -> int:
    """Copy whole ``grains`` of a volume of ``size`` bytes from ``read`` into ``dest``;
    returns the bytes copied."""
    buf = bytearray(GRAIN)
    copied = 0
    for grain in grains:
        start = grain * GRAIN
        if start >= size:
            continue
        n = min(GRAIN, size - start)
        piece = memoryview(buf)[:n]
        read(start, piece)
        if is_zero(piece):
            dest.unmap(start, n)
        else:
            dest.write(start, piece)
        copied += n
    return copied
