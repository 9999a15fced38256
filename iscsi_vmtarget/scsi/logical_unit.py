"""A logical unit: a block backend plus identity, mode pages and unit attentions.

One :class:`LogicalUnit` is one direct-access block device (SBC-3). It may be
shown by several targets and to several I_T nexuses; the unit attention
queues are kept per I_T nexus (SAM-5 §5.14), the mode pages once per LU
(every page is "shared" in the sense of the MODE PAGE POLICY, SPC-4 §7.8.9).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from ..storage.backend import Abilities, BlockBackend
from .alua import PortGroups
from .mode_pages import ModeState
from .pr_state import (
    Initiator,
    PrEvent,
    PrStore,
    ReservationState,
    SharedPrStore,
    dump_events,
    load_events,
)
from .pr_store import FilePrStore
from .sense import Progress, Reason, ScsiError
from .task import ItKey, Remainder

#: IEEE company identifier put in generated NAA type 6 designators (SPC-4 §7.8.6.6.5).
#: A placeholder in the company-ID (CID, first octet ``xA``) space until the project
#: registers its own: it is never an OUI of a real vendor. Pass ``company_id`` to override.
DEFAULT_COMPANY_ID: Final = 0x5A_4D_56
DEFAULT_MAX_TRANSFER_BYTES: Final = 8 * 1024 * 1024
#: Allocation unit of file backends (page and file-system block): the granularity of
#: UNMAP (a smaller hole is zero-filled, not freed) and of WRITE ATOMIC.
ALLOCATION_UNIT_BYTES: Final = 4096
#: Background SANITIZE pace when a clock and sleep are injected (bytes per second).
DEFAULT_SANITIZE_RATE: Final = 128 * 1024 * 1024

Clock = Callable[[], float]
Sleep = Callable[[float], None]
#: Aborts the tasks of every I_T nexus the predicate accepts (PREEMPT AND ABORT); the
#: transport, which holds the tasks, gives it to the LU.
TaskAborter = Callable[[Callable[[Initiator], bool]], None]


def _ascii(value: str, limit: int, what: str) -> None:
    if len(value) > limit or not all(0x20 <= ord(c) <= 0x7E for c in value):
        raise ValueError(f"{what} must be at most {limit} printable ASCII characters")


@dataclass(frozen=True)
class UnitIdentity:
    """What an initiator sees of a unit's identity (INQUIRY and VPD 0x80/0x83).

    ``naa`` is the 16-byte NAA IEEE Registered Extended designator (NAA 6,
    SPC-4 §7.8.6.6.5); ``serial`` the PRODUCT SERIAL NUMBER of VPD 0x80. A
    snapshot shown to a guest keeps the original's identity, so the guest never
    notices it runs on a snapshot.
    """

    naa: bytes
    serial: str
    vendor: str = "ISCSIVMT"
    product: str = "VIRTUAL-DISK"
    revision: str = "0001"

    def __post_init__(self) -> None:
        if len(self.naa) != 16 or self.naa[0] >> 4 != 0x6:
            raise ValueError("naa must be a 16-byte NAA type 6 designator")
        if not self.serial:
            raise ValueError("serial must not be empty")
        _ascii(self.serial, 200, "serial")
        _ascii(self.vendor, 8, "vendor")
        _ascii(self.product, 16, "product")
        _ascii(self.revision, 4, "revision")

    @classmethod
    def from_uuid(
        cls,
        unit_uuid: uuid.UUID,
        name: str | None = None,
        *,
        company_id: int = DEFAULT_COMPANY_ID,
    ) -> UnitIdentity:
        """Derive a stable identity from the unit's UUID; ``name`` (printable ASCII)
        becomes the unit serial number, the UUID in hex when not given.

        NAA 6 layout (SPC-4 §7.8.6.6.5): NAA (4 bits) = 6, IEEE COMPANY_ID
        (24 bits), then 100 bits of VENDOR SPECIFIC IDENTIFIER and its
        EXTENSION, taken from the low 100 bits of the UUID.
        """
        if not 0 <= company_id < 1 << 24:
            raise ValueError("company_id is 24 bits")
        value = (0x6 << 124) | (company_id << 100) | (unit_uuid.int & ((1 << 100) - 1))
        return cls(naa=value.to_bytes(16, "big"), serial=name or unit_uuid.hex)


class RangeLock:
    """Mutual exclusion on LBA ranges: COMPARE AND WRITE, ORWRITE and WRITE ATOMIC
    are atomic against every other command touching their blocks (SBC-3 §5.2).

    Every medium access holds its range, so this is on the data path: one mutex
    acquisition when nothing overlaps, a wait on the condition only when it does.
    :meth:`hold_all` is the whole medium, for a backend swap: it bars new holders
    while it waits, so a stream of overlapping commands cannot starve it.
    """

    __slots__ = ("_barred", "_cond", "_held", "_mutex", "_waiting")

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._held: list[tuple[int, int]] = []
        self._waiting = 0
        self._barred = False  # a hold_all waits or holds: nothing new starts

    def hold(self, lba: int, blocks: int) -> _HeldRange:
        """``with lock.hold(lba, blocks):`` - the range is exclusive inside."""
        return _HeldRange(self, lba, lba + max(blocks, 1))

    def try_hold(self, lba: int, blocks: int) -> tuple[int, int] | None:
        """Take the range if nothing holds any of it now, without waiting (for a
        caller that must not block, :mod:`.medium_transfer`): the span to give to
        :meth:`release`, or None when it would have to wait."""
        span = (lba, lba + max(blocks, 1))
        start, end = span
        with self._mutex:
            held = self._held
            if self._barred or (  # empty most of the time: no generator then
                held and any(first < end and start < last for first, last in held)
            ):
                return None
            held.append(span)
        return span

    def release(self, span: tuple[int, int]) -> None:
        """Give back a span :meth:`try_hold` took (from any thread)."""
        self._release(span)

    def hold_all(self) -> _HeldAll:
        """``with lock.hold_all():`` - no medium access runs inside: those holding a
        range finish first, new ones wait until the block ends."""
        return _HeldAll(self)

    def _acquire(self, span: tuple[int, int]) -> None:
        start, end = span
        with self._mutex:
            held = self._held
            while self._barred or (
                held and any(first < end and start < last for first, last in held)
            ):
                self._wait()
            held.append(span)

    def _wait(self) -> None:
        self._waiting += 1
        try:
            self._cond.wait()
        finally:
            self._waiting -= 1

    def _release(self, span: tuple[int, int]) -> None:
        with self._mutex:
            self._held.remove(span)
            if self._waiting:
                self._cond.notify_all()

    def _acquire_all(self) -> None:
        with self._mutex:
            while self._barred:  # one whole-medium holder at a time
                self._wait()
            self._barred = True
            while self._held:
                self._wait()

    def _release_all(self) -> None:
        with self._mutex:
            self._barred = False
            self._cond.notify_all()


class _HeldRange:
    __slots__ = ("_lock", "_span")

    def __init__(self, lock: RangeLock, start: int, end: int) -> None:
        self._lock = lock
        self._span = (start, end)

    def __enter__(self) -> None:
        self._lock._acquire(self._span)

    def __exit__(self, *exc: object) -> None:
        self._lock._release(self._span)


class _HeldAll:
    __slots__ = ("_lock",)

    def __init__(self, lock: RangeLock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        self._lock._acquire_all()

    def __exit__(self, *exc: object) -> None:
        self._lock._release_all()


@dataclass
class SanitizeProgress:
    """A running SANITIZE (SBC-3 §4.11): other commands get NOT READY, SANITIZE IN
    PROGRESS with this progress indication (SPC-4 §4.5.2.4.4)."""

    total: int
    done: int = 0

    def error(self) -> ScsiError:
        return ScsiError(Reason.SANITIZE_IN_PROGRESS, field=Progress(self.done, self.total))


class LogicalUnit:
    """One LU: a backend, its identity, mode pages and per-nexus unit attentions.

    ``thin_provisioning`` makes the LU logical-block-provisioning managed (SBC-3
    §4.7): LBPME and LBPRZ set, UNMAP and WRITE SAME with UNMAP deallocate (the
    backend punches holes, which read back as zeros), GET LBA STATUS reports what
    the backend's ``allocated_ranges`` says. ``resource_provisioning`` (a
    preallocated, thick LU) is managed too (SBC-4 §4.7.2.2): UNMAP and WRITE SAME
    with UNMAP anchor the range - zeroed in place with its allocation kept, so a
    later write cannot run out of space - and GET LBA STATUS reports what is not
    data (preallocated but unwritten extents) as anchored. ``pr_state_path`` (or ``pr_store``)
    is where APTPL persistent reservations are kept, conventionally
    ``<backing file>.pr``; existing state there is restored. ``pr_shared`` instead
    keeps every registration in a store the LU's other gateways share (their changes
    are announced to it, and its to them). ``clock`` and
    ``sleep`` pace background work (SANITIZE at ``sanitize_rate`` bytes/s); without
    them it runs flat out. ``physical_block_size`` is what READ CAPACITY(16)
    reports (LBPPBE). It defaults to the logical block size: with LBPPBE > 0,
    libiscsi 1.19's GetLBAStatus.UnmapSingle expects the first LBA status
    descriptor for LBA i+1 to start at i+LBPPB, which SBC-4 §5.8.2.3 forbids
    (it must start at the requested LBA), so no conforming target passes it.
    The UNMAP and WRITE ATOMIC granularity (4 KiB) is reported in the Block
    Limits VPD page either way.
    """

    def __init__(
        self,
        backend: BlockBackend,
        identity: UnitIdentity,
        block_size: int = 512,
        read_only: bool = False,
        *,
        max_transfer_bytes: int = DEFAULT_MAX_TRANSFER_BYTES,
        physical_block_size: int | None = None,
        thin_provisioning: bool = False,
        resource_provisioning: bool = False,
        pr_state_path: str | None = None,
        pr_store: PrStore | None = None,
        pr_shared: SharedPrStore | None = None,
        clock: Clock | None = None,
        sleep: Sleep | None = None,
        sanitize_rate: int = DEFAULT_SANITIZE_RATE,
    ) -> None:
        if block_size < 512 or block_size & (block_size - 1) or block_size > 65536:
            raise ValueError("block_size must be a power of two between 512 and 65536")
        if max_transfer_bytes < block_size:
            raise ValueError("max_transfer_bytes must hold at least one block")
        physical = physical_block_size or block_size
        if physical < block_size or physical & (physical - 1):
            raise ValueError("physical_block_size must be a power of two >= block_size")
        if sum(x is not None for x in (pr_state_path, pr_store, pr_shared)) > 1:
            raise ValueError("give one of pr_state_path, pr_store or pr_shared")
        if thin_provisioning and resource_provisioning:
            raise ValueError("an LU is thin or resource provisioned, not both")
        self.backend = backend
        self.abilities = Abilities.of(backend)  # once, not per command
        if resource_provisioning and self.abilities.zero_range is None:
            raise ValueError("a resource-provisioned LU needs a backend with zero_range")
        self.identity = identity
        self.block_size = block_size
        self.read_only = read_only
        self.max_transfer_blocks = max_transfer_bytes // block_size
        self.thin_provisioning = thin_provisioning
        self.resource_provisioning = resource_provisioning
        self.physical_block_size = physical
        self.allocation_unit_blocks = max(1, ALLOCATION_UNIT_BYTES // block_size)
        self.clock = clock
        self.sleep = sleep
        self.sanitize_rate = sanitize_rate
        self.mode = ModeState()
        self._lock = threading.Lock()
        #: unit attention queues per I_T nexus; changed under ``_lock``, read without
        #: it only for "anything pending?" (``pop_attention``, ``scsi/fast_lane.py``)
        self.attentions: dict[ItKey, list[Reason]] = {}
        self.ranges = RangeLock()
        self.pr_lock = threading.Lock()
        store = FilePrStore(pr_state_path) if pr_state_path is not None else pr_store
        self.reservations = ReservationState(store=store, shared=pr_shared)
        self.reservations.restore()
        #: set by the transport: aborts the tasks PREEMPT AND ABORT names
        self.task_aborter: TaskAborter | None = None
        if pr_shared is not None:
            pr_shared.listen(self._pr_announced)
        self.sanitizing: SanitizeProgress | None = None
        #: target port groups and their access states (SPC-4 §5.15), set by a server
        #: that serves this LU through several gateways; None: no ALUA (TPGS=00b)
        self.alua: PortGroups | None = None
        self.copy_results: dict[ItKey, dict[int, bytes]] = {}
        self.known_size = backend.size  # what every nexus was told (check_capacity)

    # -- geometry ----------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        """Capacity in logical blocks (read each time: the backend may grow)."""
        return self.backend.size // self.block_size

    @property
    def blocks_per_physical_block(self) -> int:
        """Logical blocks per physical block (READ CAPACITY(16) LBPPBE, SBC-3 §5.16)."""
        return self.physical_block_size // self.block_size

    @property
    def provisioning_managed(self) -> bool:
        """LBPME (SBC-4 §4.7.1): thin or resource provisioned, so UNMAP exists."""
        return self.thin_provisioning or self.resource_provisioning

    def replace_backend(self, backend: BlockBackend) -> None:
        """Serve ``backend`` from now on (a raw view reopened on a moved or grown unit,
        a VM disk that gets its first snapshot layer): its abilities are checked
        again, as when the LU was built. Atomic for the medium: commands accessing it
        (they read ``backend`` inside their :class:`RangeLock` hold) finish on the old
        backend, later ones use the new one. Identity, reservations, mode pages, unit
        attentions and ALUA states are the LU's and stay. The caller must not hold
        anything a command waits for (a chain's quiesce), or the drain never ends."""
        abilities = Abilities.of(backend)
        if self.resource_provisioning and abilities.zero_range is None:
            raise ValueError("a resource-provisioned LU needs a backend with zero_range")
        with self.ranges.hold_all():
            self.backend, self.abilities = backend, abilities

    def refresh_abilities(self) -> None:
        """Check the backend's abilities again, for a backend whose storage changed
        under it (a chain whose units moved to an rbd pool is remote now): served
        anew (:meth:`replace_backend`) if they differ."""
        if Abilities.of(self.backend) != self.abilities:
            self.replace_backend(self.backend)

    def check_capacity(self) -> None:
        """A grown (or shrunk) backend gives every I_T nexus CAPACITY DATA CHANGED
        once (SBC-3 §4.10)."""
        size = self.backend.size
        if size != self.known_size:  # rare: the common case is one comparison
            self.known_size = size
            self.establish_attention(Reason.CAPACITY_DATA_CHANGED)

    # -- write protection (SBC-3 §4.11) --------------------------------------------

    def check_writable(self) -> None:
        """Raise DATA PROTECT when the medium may not be written."""
        if self.read_only or self.backend.read_only:
            raise ScsiError(Reason.WRITE_PROTECTED)
        if self.mode.swp:
            raise ScsiError(Reason.SOFTWARE_WRITE_PROTECTED)

    @property
    def write_protected(self) -> bool:
        """The WP bit of the mode parameter header (SBC-3 §6.4.1)."""
        return self.read_only or self.backend.read_only or self.mode.swp

    # -- unit attention (SAM-5 §5.14) ----------------------------------------------

    def add_nexus(self, key: ItKey) -> None:
        """A new I_T nexus sees POWER ON, RESET, OR BUS DEVICE RESET OCCURRED once."""
        with self._lock:
            self.attentions.setdefault(key, [Reason.POWER_ON_RESET])

    def remove_nexus(self, key: ItKey) -> None:
        """I_T nexus loss: its unit attentions, SPC-2 reservation and copy results go."""
        with self._lock:
            self.attentions.pop(key, None)
        with self.pr_lock:
            self.reservations.nexus_lost(key)
            self.copy_results.pop(key, None)

    def attention_where(self, reason: Reason, wanted: Callable[[Initiator], bool]) -> None:
        """Queue ``reason`` for every known I_T nexus ``wanted`` accepts (used by
        persistent reservations, whose rules name initiator ports)."""
        with self._lock:
            for key, queue in self.attentions.items():
                if reason not in queue and wanted(Initiator.from_key(key)):
                    queue.append(reason)

    def publish_pr_events(self, events: list[PrEvent]) -> None:
        """What a stored reservation change implies, here and then on the LU's other
        gateways (which have taken it when this returns): unit attentions for the I_T
        nexuses named, their tasks aborted for PREEMPT AND ABORT."""
        self._apply_pr_events(events)
        shared = self.reservations.shared
        if shared is not None:
            shared.announce(dump_events(events))

    def _apply_pr_events(self, events: list[PrEvent]) -> None:
        for event in events:
            if event.reset:
                self._reset_here(event.reason)
            self.attention_where(event.reason, event.wants)
            if event.abort and self.task_aborter is not None:
                self.task_aborter(event.wants)

    def _pr_announced(self, message: bytes) -> None:
        """Another gateway stored a change: take the newest state known (under the
        lock, so never an older one over a change of this gateway's own)."""
        shared = self.reservations.shared
        assert shared is not None
        with self.pr_lock:
            self.reservations.adopt(shared.latest())
        self._apply_pr_events(load_events(message))

    def known_nexuses(self) -> list[ItKey]:
        with self._lock:
            return list(self.attentions)

    def establish_attention(self, reason: Reason, *, exclude: ItKey | None = None) -> None:
        """Queue ``reason`` for every known I_T nexus except ``exclude``."""
        with self._lock:
            for key, queue in self.attentions.items():
                if key != exclude and reason not in queue:
                    queue.append(reason)

    def pending_attentions(self, key: ItKey) -> tuple[Reason, ...]:
        with self._lock:
            return tuple(self.attentions.get(key, ()))

    def pop_attention(self, key: ItKey) -> Reason | None:
        """Take the unit attention to report now: resets (ASC 29h) first, then oldest."""
        if not self.attentions.get(key):  # fast path without the lock: nothing pending
            return None
        with self._lock:
            queue = self.attentions.get(key)
            if not queue:
                return None
            for index, reason in enumerate(queue):
                if reason in _RESET_ATTENTIONS:
                    return queue.pop(index)
            return queue.pop(0)

    def reset(self, reason: Reason = Reason.BUS_DEVICE_RESET) -> None:
        """Logical unit reset (SAM-5 §6.3.3): mode parameters back to their defaults
        (nothing is saved) and a unit attention for every I_T nexus - also on the LU's
        other gateways, which abort their tasks on it (one LU however many gateways
        reach it; they have taken it when this returns)."""
        remainder = self.begin_reset(reason)
        if remainder is not None:
            remainder()

    def begin_reset(self, reason: Reason = Reason.BUS_DEVICE_RESET) -> Remainder | None:
        """:meth:`reset` in two steps: here at once; then the returned call tells the
        LU's other gateways (blocking, up to their notify timeout: a transport runs it
        off its event loop) - None when no other gateway shares the LU."""
        self._reset_here(reason)
        shared = self.reservations.shared
        if shared is None:
            return None
        message = dump_events([PrEvent(reason, (), abort=True, reset=True)])
        return lambda: shared.announce(message)

    def _reset_here(self, reason: Reason) -> None:
        self.mode.restore_defaults()
        with self.pr_lock:
            self.reservations.reset()
        self.establish_attention(reason)


_RESET_ATTENTIONS: Final = frozenset(
    {
        Reason.POWER_ON_RESET,
        Reason.POWER_ON_OCCURRED,
        Reason.BUS_DEVICE_RESET,
        Reason.I_T_NEXUS_LOSS,
    }
)
