"""Shared fixtures for the SCSI layer tests: a MemoryBackend LU behind a ScsiTarget."""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from iscsi_vmtarget.scsi import (
    LogicalUnit,
    Nexus,
    ScsiResponse,
    ScsiTarget,
    Status,
    UnitIdentity,
)
from iscsi_vmtarget.scsi.sense import parse_sense
from iscsi_vmtarget.storage import BackendError, MemoryBackend
from iscsi_vmtarget.storage.backend import ReadDone, WriteDone

BLOCK = 512
BLOCKS = 2048  # 1 MiB


class CountingBackend(MemoryBackend):
    """MemoryBackend that counts flushes and can be told to fail."""

    def __init__(self, size: int, read_only: bool = False) -> None:
        super().__init__(size, read_only)
        self.flushes = 0
        self.fail_reads = False
        self.fail_writes = False

    def flush(self) -> None:
        self.flushes += 1

    def read_into(self, offset: int, buf: memoryview) -> None:
        if self.fail_reads:
            raise BackendError("injected read failure")
        super().read_into(offset, buf)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self.fail_writes:
            raise BackendError("injected write failure")
        super().write(offset, data)


class DeferredIO:
    """Asynchronous I/O (``storage.backend.AsyncIO``) for a test's memory backend:
    ``start_read``/``start_write`` hand the access, as a function that does it and
    calls ``done``, to :meth:`queue`, which answers it when the test wants."""

    def queue(self, answer: Callable[[], None]) -> None:
        raise NotImplementedError

    def start_read(self, offset: int, length: int, done: ReadDone) -> None:
        def answer() -> None:
            buf = bytearray(length)
            try:
                self.read_into(offset, memoryview(buf))  # type: ignore[attr-defined]
            except BackendError as exc:
                done(exc)
                return
            done(bytes(buf))

        self.queue(answer)

    def start_write(
        self, offset: int, data: bytes | bytearray | memoryview, done: WriteDone
    ) -> None:
        payload = bytes(data)  # as librbd: the caller's buffer may be reused at once

        def answer() -> None:
            try:
                self.write(offset, payload)  # type: ignore[attr-defined]
            except BackendError as exc:
                done(exc)
                return
            done(None)

        self.queue(answer)


class SparseBackend(CountingBackend):
    """A memory backend that tracks allocation per 4 KiB page, like a sparse file:
    writes allocate pages, ``unmap`` frees whole pages and zeroes partial ones, and
    ``allocated_ranges`` reports the allocated pages (as SEEK_DATA/SEEK_HOLE would)."""

    PAGE = 4096

    def __init__(self, size: int, read_only: bool = False) -> None:
        super().__init__(size, read_only)
        self.pages: set[int] = set()

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        super().write(offset, data)
        length = len(memoryview(data).cast("B"))
        if length:
            self.pages.update(range(offset // self.PAGE, (offset + length - 1) // self.PAGE + 1))

    def unmap(self, offset: int, length: int) -> None:
        super().unmap(offset, length)  # zeroes the range
        first = -(-offset // self.PAGE)
        last = (offset + length) // self.PAGE
        self.pages.difference_update(range(first, last))

    def allocated_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        end = offset + length
        for page in sorted(self.pages):
            start, stop = max(page * self.PAGE, offset), min((page + 1) * self.PAGE, end)
            if start >= stop:
                continue
            if out and out[-1][0] + out[-1][1] == start:
                out[-1] = (out[-1][0], out[-1][1] + stop - start)
            else:
                out.append((start, stop - start))
        return out


def make_nexus(initiator: str = "iqn.2024-01.test:init", isid: int = 1) -> Nexus:
    target = "iqn.2024-01.test:target"
    return Nexus(
        initiator_name=initiator,
        initiator_port=f"{initiator},i,0x{isid:012x}",
        target_name=target,
        target_port=f"{target},t,0x0001",
        relative_port=1,
        transport_id=b"\x05" + bytes(3),
    )


def sense_triplet(response: ScsiResponse) -> tuple[int, int, int]:
    """(key, ASC, ASCQ) from fixed or descriptor sense data."""
    return parse_sense(response.sense)


def cdb10(opcode: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", opcode, flags, lba, 0, blocks, 0)


def cdb12(opcode: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIIBB", opcode, flags, lba, blocks, 0, 0)


def cdb16(opcode: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", opcode, flags, lba, blocks, 0, 0)


def cdb6(opcode: int, lba: int, blocks: int) -> bytes:
    return struct.pack(">BBHBB", opcode, (lba >> 16) & 0x1F, lba & 0xFFFF, blocks & 0xFF, 0)


@dataclass
class Harness:
    """A target with LU 0 (and optionally more) and one registered nexus."""

    backend: CountingBackend
    lu: LogicalUnit
    target: ScsiTarget
    nexus: Nexus
    others: list[Nexus] = field(default_factory=list)

    cdb6 = staticmethod(cdb6)
    cdb10 = staticmethod(cdb10)
    cdb12 = staticmethod(cdb12)
    cdb16 = staticmethod(cdb16)
    sense = staticmethod(sense_triplet)
    make_nexus = staticmethod(make_nexus)

    @classmethod
    def create(
        cls,
        read_only: bool = False,
        blocks: int = BLOCKS,
        block: int = BLOCK,
        *,
        thin: bool = False,
        crypto_erase: Callable[[], None] | None = None,
        **options: object,
    ) -> Harness:
        backend = (SparseBackend if thin else CountingBackend)(blocks * block)
        if crypto_erase is not None:  # abilities are declared before the LU is built
            backend.crypto_erase = crypto_erase  # type: ignore[attr-defined]
        identity = UnitIdentity.from_uuid(uuid.UUID("12345678-1234-5678-1234-567812345678"))
        lu = LogicalUnit(
            backend,
            identity,
            block_size=block,
            read_only=read_only,
            thin_provisioning=thin,
            **options,  # type: ignore[arg-type]
        )
        target = ScsiTarget({0: lu})
        nexus = make_nexus()
        target.nexus_added(nexus)
        harness = cls(backend, lu, target, nexus)
        first = harness.run(bytes(6))  # consume the power-on unit attention
        assert sense_triplet(first) == (0x6, 0x29, 0x00)
        return harness

    def run(
        self,
        cdb: bytes,
        data: bytes | bytearray | None = None,
        *,
        lun: int = 0,
        nexus: Nexus | None = None,
    ) -> ScsiResponse:
        view = None if data is None else memoryview(data)
        return self.target.execute(nexus or self.nexus, lun, cdb, view)

    def good(
        self,
        cdb: bytes,
        data: bytes | bytearray | None = None,
        *,
        lun: int = 0,
        nexus: Nexus | None = None,
    ) -> bytes:
        response = self.run(cdb, data, lun=lun, nexus=nexus)
        assert response.status == Status.GOOD, sense_triplet(response)
        return bytes(response.data_in)

    def check(
        self,
        cdb: bytes,
        expected: tuple[int, int, int],
        data: bytes | bytearray | None = None,
        *,
        lun: int = 0,
        nexus: Nexus | None = None,
    ) -> ScsiResponse:
        response = self.run(cdb, data, lun=lun, nexus=nexus)
        assert response.status == Status.CHECK_CONDITION
        assert sense_triplet(response) == expected
        return response


@pytest.fixture
def scsi() -> Harness:
    """A fresh 1 MiB LU (512-byte blocks), its power-on unit attention consumed."""
    return Harness.create()


@pytest.fixture
def thin() -> Harness:
    """A thin-provisioned 1 MiB LU (LBPME=1): UNMAP, WRITE SAME with UNMAP, BLOCK ERASE."""
    return Harness.create(thin=True)


@pytest.fixture
def scsi_ro() -> Harness:
    """The same, read-only."""
    return Harness.create(read_only=True)


@pytest.fixture
def harness_factory() -> type[Harness]:
    """For another geometry: ``harness_factory.create(blocks=..., block=...)``."""
    return Harness
