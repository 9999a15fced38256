"""Acknowledged writes survive kill -9, and durability really happens before GOOD.

Two halves, because a kill -9 alone proves less than it seems:

* kill -9 cycles (``iscsi_vmtarget.testing.crash``): writes with FUA and with WRITE +
  SYNCHRONIZE CACHE, a SIGKILL at a random moment, restart on the same state, every
  acknowledged block read back. This proves the target acknowledges nothing it only
  holds in its own memory - but the page cache survives a process kill, so it cannot
  prove the fdatasync.
* the flush itself, at the code level: a real server (asyncio + worker threads) over a
  backend that records when ``flush`` runs, and a FileBackend whose ``os.fdatasync`` is
  counted. FUA, SYNCHRONIZE CACHE and any write with WCE=0 flush before the status PDU
  leaves; a plain write with WCE=1 does not flush.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from iscsi_vmtarget.client import Initiator
from iscsi_vmtarget.iscsi.directory import Portal, TargetEntry
from iscsi_vmtarget.scsi import LogicalUnit, ScsiTarget, UnitIdentity
from iscsi_vmtarget.server.listener import TargetServer
from iscsi_vmtarget.server.registry import Registry, Target
from iscsi_vmtarget.storage import MemoryBackend
from iscsi_vmtarget.storage.file import FileBackend, create_sparse_file
from iscsi_vmtarget.testing.crash import run_cycles

NAME = "iqn.2026-11.org.iscsi-vmtarget:flush"
FLUSH_SECONDS = 0.3


def test_acknowledged_writes_survive_kill_9(tmp_path: Path) -> None:
    cycles = int(os.environ.get("ISCSI_CRASH_CYCLES", "30"))
    stats = run_cycles(tmp_path, cycles, lun_bytes=2 << 20, max_run=0.8, seed=7)
    assert stats.failures == []
    assert stats.cycles == cycles
    assert stats.writes_acked > cycles * 20  # every cycle got real work in
    assert stats.blocks_verified > stats.writes_acked // 4
    assert stats.kills_mid_write > cycles // 2  # most kills hit a write or a sync


class RecordingBackend(MemoryBackend):
    """Records each flush's end time; a flush takes FLUSH_SECONDS, like a slow disk."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.flush_ends: list[float] = []
        self.writes_since_flush = 0

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        super().write(offset, data)
        self.writes_since_flush += 1

    def flush(self) -> None:
        time.sleep(FLUSH_SECONDS)
        self.writes_since_flush = 0
        self.flush_ends.append(time.monotonic())


@pytest.fixture
def server() -> Iterator[tuple[int, RecordingBackend]]:
    backend = RecordingBackend(1 << 20)
    unit = LogicalUnit(backend, UnitIdentity.from_uuid(uuid.UUID(int=3), "flush"))
    registry = Registry(portals=[Portal("127.0.0.1", 0)])
    registry.add_target(Target(TargetEntry(name=NAME), ScsiTarget({0: unit})))
    srv = TargetServer(registry, nop_interval=0)
    ready = threading.Event()
    stop: list[asyncio.Event] = []
    ports: list[int] = []

    async def main() -> None:
        ports.extend(p.port for p in await srv.start())
        stop.append(asyncio.Event())
        ready.set()
        await stop[0].wait()
        await srv.stop()

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    yield ports[0], backend
    loop.call_soon_threadsafe(stop[0].set)
    thread.join(10)


def write10(lba: int, fua: bool = False) -> bytes:
    return bytes([0x2A, 0x08 if fua else 0]) + lba.to_bytes(4, "big") + b"\x00\x00\x01\x00"


def timed(ini: Initiator, cdb: bytes, data: bytes = b"") -> float:
    rsp = ini.command(cdb, data_out=data)
    assert rsp.status == 0, rsp
    return time.monotonic()


def test_fua_sync_cache_and_wce0_flush_before_good(server: tuple[int, RecordingBackend]) -> None:
    port, backend = server
    ini = Initiator(port=port, target_name=NAME)
    ini.login()
    ini.command(bytes(6))
    block = os.urandom(512)

    # WCE=1 (the default): a plain write is acknowledged without a flush ...
    start = time.monotonic()
    timed(ini, write10(1), block)
    assert backend.flush_ends == [] and backend.writes_since_flush == 1
    assert time.monotonic() - start < FLUSH_SECONDS
    # ... FUA flushes, and GOOD arrives only after the flush ended.
    good = timed(ini, write10(2, fua=True), block)
    assert len(backend.flush_ends) == 1 and backend.flush_ends[0] <= good
    assert backend.writes_since_flush == 0
    # SYNCHRONIZE CACHE(10) and (16) flush before GOOD.
    timed(ini, write10(3), block)
    good = timed(ini, bytes([0x35]) + bytes(9))
    assert len(backend.flush_ends) == 2 and backend.flush_ends[1] <= good
    good = timed(ini, bytes([0x91]) + bytes(15))
    assert len(backend.flush_ends) == 3 and backend.flush_ends[2] <= good

    # WCE=0 through MODE SELECT(6) of the caching page: every write flushes before GOOD.
    sense = ini.command(bytes([0x1A, 0x08, 0x08, 0, 0xFF, 0]), read_length=255)
    assert sense.status == 0
    page = bytearray(sense.data[4 : 4 + 2 + sense.data[5]])
    assert page[0] & 0x3F == 0x08 and page[2] & 0x04  # WCE is set
    page[0] &= 0x3F  # PS is reserved in MODE SELECT
    page[2] &= ~0x04
    params = bytes(4) + bytes(page)
    rsp = ini.command(bytes([0x15, 0x10, 0, 0, len(params), 0]), data_out=params)
    assert rsp.status == 0, rsp
    good = timed(ini, write10(4), block)
    assert len(backend.flush_ends) == 4 and backend.flush_ends[3] <= good
    assert backend.writes_since_flush == 0
    assert bytes(backend.read(4 * 512, 512)) == block
    ini.logout()


def test_file_backend_flush_is_fdatasync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "lun.img"
    create_sparse_file(str(path), 1 << 20)
    backend = FileBackend(str(path))
    calls: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append(fd), real(fd))[1])
    backend.write(0, b"x" * 512)
    assert calls == []
    backend.flush()
    assert calls == [backend.fileno()]
    backend.close()
