"""The one-call READ/WRITE paths of a guest view and a copy-on-write chain (issue 18):
what each shortcut skips must still hold - copy-on-write, the newest layer's grain,
a revert's new layers, the disk's bound, dirty tracking, and the I/O gate that
closes, quiesces and swaps wait for."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from iscsi_vmtarget.storage import BackendError, FileBackend
from iscsi_vmtarget.storage.backend import BlockBackend
from iscsi_vmtarget.storage.file import create_sparse_file
from iscsi_vmtarget.vm import VmManager
from iscsi_vmtarget.vm.format.header import MIB, Mode
from iscsi_vmtarget.vm.layers.cow import GRAIN, ChainBackend
from iscsi_vmtarget.vm.layers.dirty import DirtyGrains
from iscsi_vmtarget.vm.layers.view import GuestView
from iscsi_vmtarget.vm.operations import snapshot as snaps
from tests.vm.helpers import make_header

DISK = 4 * MIB  # 64 grains
BLOCK = 4096


def _grain_bytes(tag: int) -> bytes:
    return bytes([tag]) * GRAIN


@pytest.fixture
def layered(manager: VmManager) -> Iterator[ChainBackend]:
    """VM ``v``'s live disk behind snapshots s0, s1, s2: grain g holds byte
    ``g % 3`` - written before s0 (in the unit), s1 or s2 (in the two layers under
    the empty top)."""
    manager.create("v", disk=DISK, memory=MIB)
    for tag in range(3):
        live = snaps.open_live(manager, manager.find("v"))
        try:
            for g in range(DISK // GRAIN):
                if tag == 0 or g % 3 == tag:
                    live.write(g * GRAIN, _grain_bytes(tag))
            live.flush()
        finally:
            live.close()
        snaps.create_snapshot(manager, "v", f"s{tag}")
    chain = snaps.open_live(manager, manager.find("v"))
    assert isinstance(chain, ChainBackend) and len(chain.layers) == 3
    assert not any(chain.layers[0].bits)  # the top is empty
    yield chain
    chain.close()


def test_reads_find_the_newest_layer_holding_each_grain(layered: ChainBackend) -> None:
    for g in range(DISK // GRAIN):
        for at in (0, GRAIN // 2, GRAIN - BLOCK):  # the one-grain path, twice per grain
            assert layered.read(g * GRAIN + at, BLOCK) == bytes([g % 3]) * BLOCK
    layered.write(5 * GRAIN, b"T" * GRAIN)  # now the top holds grain 5
    assert layered.read(5 * GRAIN + BLOCK, BLOCK) == b"T" * BLOCK
    assert layered.read(4 * GRAIN, 3 * GRAIN) == (  # several grains, several layers
        _grain_bytes(1) + b"T" * GRAIN + _grain_bytes(0)
    )


def test_partial_writes_into_a_shared_grain_merge_and_leave_the_snapshot_intact(
    manager: VmManager, layered: ChainBackend
) -> None:
    g = 7  # in the s1 layer (7 % 3 == 1), shared with snapshots s1 and s2
    base = g * GRAIN
    layered.write(base + BLOCK, b"a" * BLOCK)  # the top lacks the grain: copy-up
    layered.write(base + 3 * BLOCK, b"b" * BLOCK)  # the top holds it now: written in place
    layered.write(base + GRAIN - 512, b"c" * 512)
    expected = bytearray(_grain_bytes(1))
    expected[BLOCK : 2 * BLOCK] = b"a" * BLOCK
    expected[3 * BLOCK : 4 * BLOCK] = b"b" * BLOCK
    expected[GRAIN - 512 :] = b"c" * 512
    assert layered.read(base, GRAIN) == expected
    layered.flush()
    for snap in ("s1", "s2"):
        frozen = snaps.open_snapshot(manager, "v", snap)
        try:
            assert frozen.read(base, GRAIN) == _grain_bytes(1)
        finally:
            frozen.close()
    again = snaps.open_live(manager, manager.find("v"))  # the map bit and data are stored
    try:
        assert again.read(base, GRAIN) == expected
    finally:
        again.close()


def test_a_read_after_a_live_revert_sees_the_reverted_data(
    manager: VmManager, layered: ChainBackend
) -> None:
    g = 8  # in the s2 layer
    assert layered.read(g * GRAIN, BLOCK) == bytes([2]) * BLOCK  # cached: the s2 layer
    layered.write(g * GRAIN, b"N" * GRAIN)
    layered.write(GRAIN, b"M" * BLOCK)  # grain 1 (s1 layer) copied up
    assert layered.read(g * GRAIN, BLOCK) == b"N" * BLOCK
    snaps.revert(manager, "v", "s1", live={0: layered})  # s1: grains % 3 == 2 are zeros
    assert layered.read(g * GRAIN, BLOCK) == bytes([0]) * BLOCK
    assert layered.read(GRAIN, BLOCK) == bytes([1]) * BLOCK
    assert layered.read(2 * GRAIN + BLOCK, BLOCK) == bytes([0]) * BLOCK


@pytest.mark.parametrize("layers", [False, True], ids=["view", "chain"])
def test_io_past_the_disk_is_refused_and_changes_nothing(manager: VmManager, layers: bool) -> None:
    manager.create("v", disk=DISK, memory=MIB)
    state = b"state"
    manager.write_state("v", io.BytesIO(state), len(state))
    if layers:
        snaps.create_snapshot(manager, "v", "s0")
    disk = snaps.open_live(manager, manager.find("v"))
    try:
        assert isinstance(disk, ChainBackend if layers else GuestView)
        assert disk.size == DISK
        disk.write(DISK - BLOCK, b"L" * BLOCK)  # the last block is the guest's
        assert disk.read(DISK - BLOCK, BLOCK) == b"L" * BLOCK
        for offset, length in ((DISK - BLOCK, 2 * BLOCK), (DISK, BLOCK), (-BLOCK, BLOCK)):
            with pytest.raises(ValueError, match="outside"):
                disk.read(offset, length)
            with pytest.raises(ValueError, match="outside"):
                disk.write(offset, b"X" * length)
        disk.flush()
    finally:
        disk.close()
    assert b"".join(manager.read_state("v")) == state


def test_dirty_tracking_records_writes_into_grains_the_top_holds(
    layered: ChainBackend,
) -> None:
    dirty = DirtyGrains()
    layered.write_hook = dirty.mark
    layered.write(3 * GRAIN + BLOCK, b"x" * BLOCK)  # copy-up
    assert dirty.take() == [3]
    layered.write(3 * GRAIN + 2 * BLOCK, b"y" * BLOCK)  # in place: the top holds grain 3
    layered.write(9 * GRAIN, b"z" * GRAIN)  # a whole grain
    layered.write(11 * GRAIN - BLOCK, b"w" * 2 * BLOCK)  # across two grains
    assert dirty.take() == [3, 9, 10, 11]


class Held:
    """A backend whose reads wait for :attr:`go` (I/O in flight, as long as a test
    needs); it records a close that came while a read ran."""

    def __init__(self, inner: BlockBackend) -> None:
        self.inner = inner
        self.size = inner.size
        self.read_only = False
        self.entered = threading.Event()
        self.go = threading.Event()
        self.running = 0
        self.closed_under_io = False

    def read_into(self, offset: int, buf: memoryview) -> None:
        self.running += 1
        self.entered.set()
        assert self.go.wait(5)
        self.inner.read_into(offset, buf)
        self.running -= 1

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.inner.write(offset, data)

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.closed_under_io = self.running > 0
        self.inner.close()


def _start(target: object, *args: object) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
    thread.start()
    return thread


def test_closing_a_view_waits_for_the_read_in_flight(tmp_path: Path) -> None:
    header = make_header(Mode.OFFSET, DISK)
    path = tmp_path / "unit"
    create_sparse_file(str(path), header.unit_size)
    held = Held(FileBackend(str(path)))
    view = GuestView(held, header)  # type: ignore[arg-type]
    reader = _start(view.read, 0, BLOCK)
    assert held.entered.wait(5)
    closer = _start(view.close)
    closer.join(0.2)
    assert closer.is_alive()  # the read still runs on the descriptor
    held.go.set()
    reader.join(5)
    closer.join(5)  # woken by the read's end, not left waiting
    assert not closer.is_alive() and not held.closed_under_io


def test_a_quiesce_waits_for_the_read_in_flight(layered: ChainBackend) -> None:
    top = layered.layers[0]
    layered.write(0, b"q" * GRAIN)  # the top holds grain 0
    held = Held(top.backend)
    top.backend = held  # type: ignore[assignment]
    reader = _start(layered.read, BLOCK, BLOCK)
    assert held.entered.wait(5)
    quiesced = threading.Event()

    def quiesce() -> None:
        with layered.quiesce():
            quiesced.set()

    swapper = _start(quiesce)
    assert not quiesced.wait(0.2)  # a swap never runs under a read
    held.go.set()
    assert quiesced.wait(5)
    reader.join(5)
    swapper.join(5)
    top.backend = held.inner


def test_an_owner_looked_up_during_a_copy_up_is_not_left_stale(layered: ChainBackend) -> None:
    """A reader looks grain 4 up (not in the top, found in the s1 layer) while a writer
    copies it up: the writer's owner (the top) must win, whatever the order."""
    g = 4
    lower = layered.layers[1]
    writer: list[threading.Thread] = []

    class Racing(bytearray):
        def __getitem__(self, index):  # type: ignore[no-untyped-def]
            if not writer and threading.current_thread() is threading.main_thread():
                # the reader scans this layer: a copy-up of the grain runs meanwhile
                writer.append(_start(layered.write, g * GRAIN, b"W" * BLOCK))
                writer[0].join(0.3)  # as far as it gets while the scan runs
            return bytearray.__getitem__(self, index)

    lower.bits = Racing(lower.bits)
    try:
        layered.read(g * GRAIN + BLOCK, BLOCK)  # either content: the race is on
        writer[0].join(5)
    finally:
        lower.bits = bytearray(lower.bits)
    assert layered.read(g * GRAIN, BLOCK) == b"W" * BLOCK
    assert layered.read(g * GRAIN + BLOCK, BLOCK) == bytes([1]) * BLOCK


def test_a_view_over_a_read_only_handle_is_read_only_and_refuses_writes(tmp_path: Path) -> None:
    """The handle's read-only flag is looked up once: what the LU's write protection
    (the WP bit, the fast lane's guard) and the view's own check read."""
    header = make_header(Mode.OFFSET, DISK)
    path = tmp_path / "unit"
    create_sparse_file(str(path), header.unit_size)
    view = GuestView(FileBackend(str(path), read_only=True), header)
    try:
        assert view.read_only
        with pytest.raises(BackendError, match="read-only"):
            view.write(0, b"x" * BLOCK)
        assert view.read(0, BLOCK) == bytes(BLOCK)
    finally:
        view.close()
