"""READ and WRITE tried inline without blocking (ScsiTarget.submit, issue 18):
what the page cache does not hold, or what the kernel refuses, comes back as a
BlockedCommand whose run() completes it in a worker thread, exactly once, with the
checks before the medium I/O (unit attention, reservations) done once."""

from __future__ import annotations

import os
import struct
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from iscsi_vmtarget.scsi import LogicalUnit, ScsiResponse, ScsiTarget, Status, UnitIdentity
from iscsi_vmtarget.scsi.sense import Reason, parse_sense
from iscsi_vmtarget.scsi.target_device import BlockedCommand
from iscsi_vmtarget.storage import Abilities, FileBackend, MemoryBackend, nowait
from iscsi_vmtarget.storage.nowait import MODE, RWF_NOWAIT, WouldBlock
from iscsi_vmtarget.testing.page_cache import evict
from iscsi_vmtarget.vm.format.header import Mode
from iscsi_vmtarget.vm.layers.cow import ChainBackend
from iscsi_vmtarget.vm.layers.view import GuestView, SliceBackend
from tests.scsi.conftest import cdb10, make_nexus
from tests.vm.helpers import make_header

BLOCK = 512
SIZE = 1 << 20
READ10, WRITE10, WRITE_SAME10, CAW = 0x28, 0x2A, 0x41, 0x89
WE = 1  # PERSISTENT RESERVE type WRITE EXCLUSIVE


class Lun:
    """A ScsiTarget over one file LU and a logged-in nexus (its power-on UA taken)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.write_bytes(os.urandom(SIZE))
        self.backend = FileBackend(str(path))
        identity = UnitIdentity.from_uuid(uuid.UUID(int=18))
        self.lu = LogicalUnit(self.backend, identity, block_size=BLOCK)
        self.target = ScsiTarget({0: self.lu})
        self.nexus = make_nexus()
        self.target.nexus_added(self.nexus)
        self.target.execute(self.nexus, 0, bytes(6), None)

    def nowait(self, cdb: bytes, data: bytes | None = None, nexus: object = None):  # type: ignore[no-untyped-def]
        return self.target.submit(nexus or self.nexus, 0, cdb, data)

    def medium(self, lba: int, blocks: int = 1) -> bytes:
        with open(self.path, "rb") as fh:
            fh.seek(lba * BLOCK)
            return fh.read(blocks * BLOCK)


@pytest.fixture
def lun(tmp_path: Path) -> Iterator[Lun]:
    unit = Lun(tmp_path / "lun.img")
    yield unit
    unit.backend.close()


@pytest.fixture
def refuse_writes(monkeypatch: pytest.MonkeyPatch, lun: Lun) -> None:
    """Writes tried nowait and refused as a throttled kernel refuses them (the
    backend's seam; the LU reads its backend's abilities again)."""
    monkeypatch.setattr(nowait, "refused", frozenset({"write"}))
    lun.lu.replace_backend(lun.backend)
    assert lun.lu.abilities.nowait == {"read", "write"}


def _good(response: ScsiResponse | BlockedCommand) -> ScsiResponse:
    assert isinstance(response, ScsiResponse)
    assert response.status == Status.GOOD, parse_sense(response.sense)
    return response


def test_read_not_in_page_cache_runs_again_in_a_thread(lun: Lun) -> None:
    expected = lun.medium(8, 8)
    if not evict(str(lun.path)):
        pytest.skip("this file system keeps no nowait reads (tmpfs) or the pages")
    blocked = lun.nowait(cdb10(READ10, 8, 8))
    assert isinstance(blocked, BlockedCommand)
    assert MODE.flags == 0  # nowait mode ends with the inline attempt
    out: list[ScsiResponse] = []
    worker = threading.Thread(target=lambda: out.append(blocked.run()))
    worker.start()
    worker.join(10)
    assert bytes(_good(out[0]).data_in) == expected
    # now cached: served inline
    assert bytes(_good(lun.nowait(cdb10(READ10, 8, 8))).data_in) == expected


def test_cached_read_and_write_are_served_inline(lun: Lun) -> None:
    data = os.urandom(4 * BLOCK)
    _good(lun.nowait(cdb10(WRITE10, 100, 4), data))
    assert bytes(_good(lun.nowait(cdb10(READ10, 100, 4))).data_in) == data


def _refused_write(lun: Lun, lba: int) -> tuple[bytes, BlockedCommand]:
    """A WRITE(10) of 8 blocks the seam refuses: its data, the command to run again."""
    data = os.urandom(8 * BLOCK)
    blocked = lun.nowait(cdb10(WRITE10, lba, 8), data)
    assert isinstance(blocked, BlockedCommand)
    return data, blocked


def test_refused_write_lands_whole_once_and_releases_its_range(
    lun: Lun, refuse_writes: None
) -> None:
    data, blocked = _refused_write(lun, 16)
    assert lun.medium(16, 4) == data[: 4 * BLOCK]  # cut off half way, as the seam does
    # the range lock was released: an overlapping command does not wait for the rerun
    probe = threading.Thread(
        target=lambda: lun.target.execute(lun.nexus, 0, cdb10(READ10, 16, 8), None)
    )
    probe.start()
    probe.join(5)
    assert not probe.is_alive()
    response = blocked.run()  # not in nowait mode: the whole write, blocking
    assert _good(response).data_out_length == len(data)
    assert lun.medium(16, 8) == data


def test_unit_attention_is_reported_not_written(lun: Lun, refuse_writes: None) -> None:
    before = lun.medium(32, 8)
    lun.lu.establish_attention(Reason.MODE_PARAMETERS_CHANGED)
    response = lun.nowait(cdb10(WRITE10, 32, 8), os.urandom(8 * BLOCK))
    assert isinstance(response, ScsiResponse)  # no medium I/O tried, nothing to run again
    assert parse_sense(response.sense) == (0x6, 0x2A, 0x01)
    assert lun.medium(32, 8) == before


def test_rerun_does_not_take_a_unit_attention_raised_meanwhile(
    lun: Lun, refuse_writes: None
) -> None:
    data, blocked = _refused_write(lun, 40)
    lun.lu.establish_attention(Reason.MODE_PARAMETERS_CHANGED)  # after the checks ran
    _good(blocked.run())
    assert lun.medium(40, 8) == data
    # the attention is still there for the next command, reported once
    response = lun.target.execute(lun.nexus, 0, bytes(6), None)
    assert parse_sense(response.sense) == (0x6, 0x2A, 0x01)


def test_reservation_conflict_is_reported_not_written(lun: Lun, refuse_writes: None) -> None:
    holder = make_nexus("iqn.2024-01.test:holder", isid=2)
    lun.target.nexus_added(holder)
    lun.target.execute(holder, 0, bytes(6), None)
    for action, kind in ((0, 0), (1, WE)):  # REGISTER key 7, then RESERVE
        params = struct.pack(
            ">QQIBBH", 0 if action == 0 else 7, 7 if action == 0 else 0, 0, 0, 0, 0
        )
        cdb = struct.pack(">BBBHIB", 0x5F, action, kind, 0, len(params), 0)
        assert lun.target.execute(holder, 0, cdb, params).status == Status.GOOD
    before = lun.medium(48, 8)
    response = lun.nowait(cdb10(WRITE10, 48, 8), os.urandom(8 * BLOCK))
    assert isinstance(response, ScsiResponse)
    assert response.status == Status.RESERVATION_CONFLICT
    assert lun.medium(48, 8) == before


def test_commands_not_safe_to_run_twice_never_run_nowait(lun: Lun, refuse_writes: None) -> None:
    block = os.urandom(BLOCK)
    same = struct.pack(">BBIBHB", WRITE_SAME10, 0, 64, 0, 4, 0)
    _good(lun.nowait(same, block))  # blocking inline: the seam never sees it
    assert lun.medium(64, 4) == block * 4
    caw = struct.pack(">BBQBBBBBB", CAW, 0, 64, 0, 0, 0, 1, 0, 0)
    _good(lun.nowait(caw, block + os.urandom(BLOCK)))


def test_backends_that_may_be_cut_off_say_so(tmp_path: Path) -> None:
    path = tmp_path / "f.img"
    path.write_bytes(bytes(SIZE))
    backend = FileBackend(str(path))
    try:
        # writes stay blocking (NOWAIT_WRITES: measured, not worth it)
        assert Abilities.of(backend).nowait == {"read"}
        assert Abilities.of(SliceBackend(backend, 4096, 8192)).nowait == {"read"}
        assert not Abilities.of(SliceBackend(MemoryBackend(SIZE), 0, 4096)).nowait
        assert not Abilities.of(MemoryBackend(SIZE)).nowait
        # a guest view: a pure offset mapping over its unit handle
        header = make_header(Mode.ALIGNED, 2 << 20)
        path.write_bytes(bytes(header.unit_size))
        unit = FileBackend(str(path))
        try:
            assert Abilities.of(GuestView(unit, header)).nowait == {"read"}
        finally:
            unit.close()
        assert not Abilities.of(GuestView(MemoryBackend(header.unit_size), header)).nowait
        # a copy-on-write chain copies up before it writes: never cut off
        assert not hasattr(ChainBackend, "nowait_io")
    finally:
        backend.close()


def test_file_backend_in_nowait_mode_blocks_or_says_so(tmp_path: Path) -> None:
    """Whatever the file system supports (ext4: no nowait writes; tmpfs: no nowait at
    all), I/O in nowait mode completes or raises WouldBlock, never an OSError."""
    for where in (tmp_path, Path("/dev/shm")):
        if not where.is_dir():
            continue
        path = where / f"nowait-{os.getpid()}.img"
        path.write_bytes(bytes(SIZE))
        backend = FileBackend(str(path))
        try:
            data = os.urandom(8192)
            MODE.flags = RWF_NOWAIT
            try:
                for _ in range(2):  # the second time after any EOPNOTSUPP was learnt
                    backend.write(4096, data)
                    assert backend.read(4096, 8192) == data
            except WouldBlock:
                pass
            finally:
                MODE.flags = 0
            assert backend.read(4096, 8192) == data
        finally:
            backend.close()
            path.unlink()


class _Opaque:
    """A backend over a file that does not declare nowait I/O (as a COW chain)."""

    def __init__(self, inner: FileBackend) -> None:
        self.inner = inner
        self.size, self.read_only = inner.size, inner.read_only
        self.read_into, self.read, self.write = inner.read_into, inner.read, inner.write
        self.flush, self.unmap, self.resize = inner.flush, inner.unmap, inner.resize

    def close(self) -> None:
        pass


class _SwapOnHold:
    """An LU's range lock that runs ``swap`` once, as the first command takes a range:
    a backend swap landing between the dispatcher's look and the handler's hold."""

    def __init__(self, lu: LogicalUnit, swap: Callable[[], None]) -> None:
        self.real, self.swap = lu.ranges, swap

    def hold(self, lba: int, blocks: int) -> object:
        swap, self.swap = self.swap, lambda: None
        swap()
        return self.real.hold(lba, blocks)

    def hold_all(self) -> object:
        return self.real.hold_all()


def test_backend_swapped_after_the_dispatcher_looked_is_not_cut_off(
    lun: Lun, refuse_writes: None
) -> None:
    """The dispatcher turned nowait mode on for a file LU; a live snapshot put a chain
    in its place before the WRITE took its range: the write must not be cut off."""
    lu = lun.lu
    lu.ranges = _SwapOnHold(lu, lambda: lu.replace_backend(_Opaque(lun.backend)))  # type: ignore[assignment]
    data = os.urandom(8 * BLOCK)
    _good(lun.nowait(cdb10(WRITE10, 72, 8), data))  # done blocking, not cut off
    assert MODE.flags == 0
    assert lun.medium(72, 8) == data
