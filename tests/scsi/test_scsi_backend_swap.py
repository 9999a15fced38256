"""LogicalUnit.replace_backend under I/O: a command on the medium finishes on the old
backend, the swap waits for it, commands after it use the new one; nothing of the
LU's own changes (a VM disk that gets its first snapshot is swapped like this)."""

from __future__ import annotations

import threading
import time

from iscsi_vmtarget.scsi.logical_unit import RangeLock
from iscsi_vmtarget.storage import MemoryBackend
from tests.scsi.conftest import BLOCK, BLOCKS, Harness

READ10, WRITE10 = 0x28, 0x2A


class HeldBackend(MemoryBackend):
    """A memory backend whose writes wait until ``release`` is set."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.entered = threading.Event()
        self.release = threading.Event()

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.entered.set()
        assert self.release.wait(10)
        super().write(offset, data)


def _thread(target: object) -> threading.Thread:
    thread = threading.Thread(target=target)  # type: ignore[arg-type]
    thread.start()
    return thread


def test_a_swap_waits_for_the_command_in_flight_and_new_ones_use_the_new_backend() -> None:
    scsi = Harness.create()
    old = HeldBackend(BLOCKS * BLOCK)
    scsi.lu.replace_backend(old)
    new = MemoryBackend(BLOCKS * BLOCK)
    identity = scsi.good(bytes([0x12, 0x01, 0x83, 0, 255, 0]))  # VPD 0x83
    writer = _thread(lambda: scsi.good(scsi.cdb10(WRITE10, 5, 1), b"O" * BLOCK))
    threads = [writer]
    try:
        assert old.entered.wait(5)
        threads.append(_thread(lambda: scsi.lu.replace_backend(new)))
        reads: list[bytes] = []
        time.sleep(0.05)
        threads.append(_thread(lambda: reads.append(scsi.good(scsi.cdb10(READ10, 100, 1)))))
        time.sleep(0.1)
        assert all(t.is_alive() for t in threads)  # the swap and the READ wait for the WRITE
    finally:
        old.release.set()
        for thread in threads:
            thread.join(5)
    assert old.read(5 * BLOCK, BLOCK) == b"O" * BLOCK  # it finished where it began
    assert scsi.lu.backend is new and reads == [bytes(BLOCK)]
    scsi.good(scsi.cdb10(WRITE10, 6, 1), b"N" * BLOCK)
    assert new.read(6 * BLOCK, BLOCK) == b"N" * BLOCK and old.read(6 * BLOCK, BLOCK) == bytes(BLOCK)
    assert scsi.good(bytes([0x12, 0x01, 0x83, 0, 255, 0])) == identity
    assert scsi.good(bytes(6)) == b""  # no unit attention: same capacity


def test_hold_all_bars_new_holders_while_it_waits() -> None:
    """A hold of the whole medium is not overtaken by a stream of commands: a range
    asked for after it waits, even one that overlaps no range held."""
    lock = RangeLock()
    order: list[str] = []
    first = lock.hold(0, 8)
    first.__enter__()

    def whole() -> None:
        with lock.hold_all():
            order.append("all")

    def late() -> None:
        with lock.hold(100, 1):
            order.append("late")

    swap = _thread(whole)
    time.sleep(0.05)
    other = _thread(late)
    time.sleep(0.05)
    assert order == [] and swap.is_alive() and other.is_alive()
    first.__exit__(None, None, None)
    swap.join(5)
    other.join(5)
    assert order == ["all", "late"]
