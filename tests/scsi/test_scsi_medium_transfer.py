"""READ and WRITE started without waiting on a backend with asynchronous I/O
(scsi/medium_transfer.py): every check still runs first, data lands as with the
synchronous path, a range held by another command is waited for in a thread, and a
backend failure is MEDIUM ERROR sense."""

from __future__ import annotations

import queue
import threading
import uuid
from collections.abc import Callable

from iscsi_vmtarget.scsi import LogicalUnit, ScsiTarget, UnitIdentity
from iscsi_vmtarget.scsi.medium_transfer import MediumTransfer
from iscsi_vmtarget.scsi.task import ScsiResponse, Status
from iscsi_vmtarget.storage import Abilities
from iscsi_vmtarget.storage.backend import AsyncIO
from tests.scsi.conftest import (
    BLOCK,
    CountingBackend,
    DeferredIO,
    Harness,
    cdb6,
    cdb10,
    cdb16,
    make_nexus,
)

READ10, WRITE10, READ16, WRITE16 = 0x28, 0x2A, 0x88, 0x8A
FUA = 0x08


class AsyncBackend(DeferredIO, CountingBackend):
    """A remote-like memory backend: ``start_*`` complete in another thread, in the
    reverse order of their start once ``release()`` is called (as a cluster may)."""

    remote_io = True

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.pending: list[threading.Thread] = []

    def queue(self, answer: Callable[[], None]) -> None:
        self.pending.append(threading.Thread(target=answer))

    def release(self) -> None:
        threads, self.pending = self.pending[::-1], []
        for t in threads:
            t.start()
            t.join()


def async_harness(**options: object) -> tuple[Harness, AsyncBackend]:
    backend = AsyncBackend(2048 * BLOCK)
    identity = UnitIdentity.from_uuid(uuid.UUID("12345678-1234-5678-1234-567812345678"))
    lu = LogicalUnit(backend, identity, block_size=BLOCK, **options)  # type: ignore[arg-type]
    target = ScsiTarget({0: lu})
    harness = Harness(backend, lu, target, make_nexus())
    target.nexus_added(harness.nexus)
    harness.run(bytes(6))  # the power-on unit attention
    return harness, backend


def submit(h: Harness, cdb: bytes, data: bytes | None = None) -> ScsiResponse | MediumTransfer:
    view = None if data is None else memoryview(bytearray(data))
    return h.target.submit(h.nexus, 0, cdb, view)


def finish(transfer: ScsiResponse | MediumTransfer, backend: AsyncBackend) -> ScsiResponse:
    """Start a transfer, let the backend answer, and return the completion."""
    assert isinstance(transfer, MediumTransfer)
    called: queue.SimpleQueue[int] = queue.SimpleQueue()
    assert transfer.start(lambda: called.put(1))
    backend.release()
    assert called.get(timeout=5) == 1 and called.empty()  # exactly once
    return transfer.response()


def test_ability_is_seen_and_only_plain_read_write_are_started_unwaited() -> None:
    h, backend = async_harness()
    assert Abilities.of(backend).aio is backend and isinstance(backend, AsyncIO)
    target = h.target
    for cdb in (cdb10(READ10, 0, 8), cdb16(WRITE16, 0, 8), cdb6(0x08, 0, 1)):
        assert not target.may_block(cdb, 0)  # runs on the caller's (event loop) thread
    assert target.may_block(cdb10(WRITE10, 0, 8, FUA), 0)  # FUA: a flush, in a thread
    assert target.may_block(cdb16(0x89, 0, 1), 0)  # COMPARE AND WRITE: in a thread
    with h.lu.pr_lock:  # a PERSISTENT RESERVE OUT storing its change in a worker thread
        assert target.may_block(cdb10(READ10, 0, 8), 0)  # would wait for it: in a thread
    # the synchronous path keeps working for every caller of execute()
    h.good(cdb10(WRITE10, 4, 1), b"s" * BLOCK)
    assert h.good(cdb10(READ10, 4, 1)) == b"s" * BLOCK


def test_writes_complete_out_of_order_and_read_back() -> None:
    h, backend = async_harness()
    transfers = [submit(h, cdb10(WRITE10, n * 8, 8), bytes([n]) * 8 * BLOCK) for n in range(16)]
    called: queue.SimpleQueue[int] = queue.SimpleQueue()
    for t in transfers:
        assert isinstance(t, MediumTransfer) and t.data_out_length == 8 * BLOCK
        assert t.start(lambda: called.put(1))
    assert backend.read(0, 16 * 8 * BLOCK) == bytes(16 * 8 * BLOCK)  # nothing written yet
    backend.release()  # the last started answers first
    for t in transfers:
        assert called.get(timeout=5) == 1
        assert t.response().status == Status.GOOD
    for n in range(16):
        reading = submit(h, cdb10(READ10, n * 8, 8))
        assert bytes(finish(reading, backend).data_in) == bytes([n]) * 8 * BLOCK


def test_every_check_runs_before_a_transfer_is_made() -> None:
    h, backend = async_harness()
    out_of_range = submit(h, cdb10(READ10, 2047, 2))
    assert isinstance(out_of_range, ScsiResponse)
    assert h.sense(out_of_range) == (0x5, 0x21, 0x00)  # LBA OUT OF RANGE
    mode = h.lu.mode
    control = mode.page(0x0A)
    mode.apply({0x0A: control[:4] + bytes([control[4] | 0x08]) + control[5:]})  # SWP=1
    protected = submit(h, cdb10(WRITE10, 0, 1), b"x" * BLOCK)
    assert isinstance(protected, ScsiResponse) and h.sense(protected)[0] == 0x7
    assert not backend.pending
    mode.apply({0x0A: control})
    # FUA and a disabled write cache keep the synchronous, flushing path
    fua = submit(h, cdb10(WRITE10, 0, 1, FUA), b"f" * BLOCK)
    assert isinstance(fua, ScsiResponse) and fua.status == Status.GOOD and backend.flushes == 1
    mode.apply({0x08: mode.page(0x08)[:2] + bytes(18)})  # WCE=0
    assert h.target.may_block(cdb10(WRITE10, 0, 1), 0)
    assert isinstance(submit(h, cdb10(WRITE10, 0, 1), b"w" * BLOCK), ScsiResponse)
    assert backend.flushes == 2 and not backend.pending


def test_backend_failure_is_medium_error_sense() -> None:
    h, backend = async_harness()
    backend.fail_writes = backend.fail_reads = True
    wrote = finish(submit(h, cdb10(WRITE10, 0, 1), b"x" * BLOCK), backend)
    assert wrote.status == Status.CHECK_CONDITION and h.sense(wrote) == (0x3, 0x0C, 0x00)
    read = finish(submit(h, cdb10(READ10, 0, 1)), backend)
    assert h.sense(read) == (0x3, 0x11, 0x00)  # UNRECOVERED READ ERROR
    # a backend refusing a request outright answers the same way, through done()
    backend.start_read = None  # type: ignore[assignment]  # a bug: not callable
    broken = submit(h, cdb10(READ10, 0, 1))
    assert isinstance(broken, MediumTransfer)
    called: list[int] = []
    assert broken.start(lambda: called.append(1)) and called == [1]
    assert h.sense(broken.response()) == (0x4, 0x44, 0x00)  # INTERNAL TARGET FAILURE
    assert not h.lu.ranges._held  # every range given back


def test_a_held_range_is_waited_for_in_a_thread() -> None:
    h, backend = async_harness()
    transfer = submit(h, cdb10(WRITE10, 8, 8), b"n" * 8 * BLOCK)
    assert isinstance(transfer, MediumTransfer)
    with h.lu.ranges.hold(12, 1):  # e.g. a COMPARE AND WRITE in a worker thread
        assert not transfer.start(lambda: None)  # nothing started, the loop not blocked
        worker = threading.Thread(target=transfer.run)
        worker.start()
        worker.join(0.2)
        assert worker.is_alive() and backend.read(8 * BLOCK, 1) == b"\0"  # waits for the range
    worker.join(5)
    assert transfer.response().status == Status.GOOD
    assert backend.read(8 * BLOCK, 8 * BLOCK) == b"n" * 8 * BLOCK
    # and while a started transfer holds its range, another command waits for it
    first = submit(h, cdb10(WRITE10, 0, 4), b"a" * 4 * BLOCK)
    second = submit(h, cdb10(WRITE10, 2, 4), b"b" * 4 * BLOCK)
    assert isinstance(first, MediumTransfer) and isinstance(second, MediumTransfer)
    assert first.start(lambda: None) and not second.start(lambda: None)
    backend.release()
    assert second.start(lambda: None)
    backend.release()
    assert backend.read(0, 6 * BLOCK) == b"a" * 2 * BLOCK + b"b" * 4 * BLOCK
