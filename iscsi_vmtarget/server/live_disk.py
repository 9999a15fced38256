"""The live disk behind a served VM LUN: its plain guest view until an operation needs a
chain, then a copy-on-write chain.

A VM disk without snapshot layers is served by its unit's
:class:`~..vm.layers.view.GuestView` itself, so a guest's READ or WRITE goes to the
view with no chain to pass (and no second range check). The daemon's live operations
(snapshot, revert, delete, move, clone, unlink: the ``live`` volumes of
:mod:`..vm.operations`) ask :meth:`LiveDisk.chain`; a plain view is then wrapped in a
:class:`~..vm.layers.cow.ChainBackend` with no layers (:meth:`~..vm.layers.cow.ChainBackend.over`:
it reads and writes the same bytes) which takes the view's place in the logical unit
at once (:meth:`~..scsi.LogicalUnit.replace_backend`: commands on the medium finish on
the view, later ones go through the chain). The LU is the same object throughout: its
identity (VPD 0x83, 0x80), reservations, mode pages, ALUA states and capacity
listeners do not change, nor does its capacity.

Back to the plain view: when the last action using the disk ends
(:meth:`LiveDisk.using`, entered by :func:`~.actions.served.vm_disks`), a chain with
no layers (after a live move of a VM without snapshots, or a snapshot that failed)
gives its view back to the LU, the same way. A chain with layers stays one while
served: the live top, which the guest writes, is never merged into the unit under a
served VM (:func:`~..vm.operations.snapshot.collect` merges only frozen layers live:
folding the top would hold the guest's I/O for a whole copy), so a disk that had a
snapshot keeps at least its top until the VM is served anew. Its LU then checks the
chain's abilities again (:meth:`~..scsi.LogicalUnit.refresh_abilities`): a chain
moved into an rbd pool is remote storage, whose commands run in worker threads.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from ..scsi import LogicalUnit
from ..vm.layers.cow import ChainBackend
from ..vm.layers.view import GuestView


class LiveDisk:
    """The live disk of one guest LUN (:mod:`module docstring <.live_disk>`); a
    :class:`~..vm.layers.cow.LiveVolume` for the VM operations, and what the LUN's
    raw view reads the guest disk through (:class:`~..vm.layers.flat.DiskSource`)."""

    def __init__(self, lu: LogicalUnit) -> None:
        self.lu = lu
        self._lock = threading.Lock()  # one swap at a time; guards _users
        self._users = 0

    # -- what a raw view reads (whatever the LU serves now) ---------------------------------

    @property
    def size(self) -> int:
        return self.lu.backend.size

    def read_into(self, offset: int, buf: memoryview) -> None:
        self.lu.backend.read_into(offset, buf)

    # -- what the operations use -------------------------------------------------------------

    def chain(self) -> ChainBackend:
        """The disk as a chain: the LU's, or a new one with no layers over its plain
        view, swapped in now. Never call it while a chain of this VM is quiesced: the
        swap waits for the commands in flight."""
        with self._lock:
            backend = self.lu.backend
            if isinstance(backend, ChainBackend):
                return backend
            if not isinstance(backend, GuestView):
                raise TypeError(f"a served VM disk is a guest view or a chain, not {backend!r}")
            chain = ChainBackend.over(backend)
            self.lu.replace_backend(chain)
            return chain

    @property
    def view(self) -> GuestView | None:
        """The guest view the disk rests on: the plain view the LU serves, or its
        chain's root (a unit of another VM for a linked clone)."""
        backend = self.lu.backend
        if isinstance(backend, ChainBackend):
            backend = backend.root
        return backend if isinstance(backend, GuestView) else None

    @property
    def layered(self) -> ChainBackend | None:
        """The chain the LU serves, if it serves one."""
        backend = self.lu.backend
        return backend if isinstance(backend, ChainBackend) else None

    @contextlib.contextmanager
    def using(self) -> Iterator[LiveDisk]:
        """An action's use of the disk; when the last one ends, a chain with no layers
        gives the LU its plain view back."""
        with self._lock:
            self._users += 1
        try:
            yield self
        finally:
            with self._lock:
                self._users -= 1
                if not self._users and not self._settle():
                    # a chain whose units moved (into an rbd pool: remote now)
                    self.lu.refresh_abilities()

    def _settle(self) -> bool:
        """Serve the plain view again if the chain has no layers; whether it did."""
        chain = self.layered
        view = chain.release_root() if chain is not None else None
        if view is None:
            return False
        self.lu.replace_backend(view)
        return True
