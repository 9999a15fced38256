"""A sealed region as a block device (issue 14): plaintext reads, sealed writes of any
size, the stream descriptor, atomicity per chunk, and the unit's other readers."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from iscsi_vmtarget.storage.backend import BackendError
from iscsi_vmtarget.vm import VmManager
from iscsi_vmtarget.vm import snapshot as snaps
from iscsi_vmtarget.vm.format.header import RegionKind, RegionStatus, scan_slots
from iscsi_vmtarget.vm.format.sealed import table_bytes
from iscsi_vmtarget.vm.format.sealed_blocks import CHUNK, ENTRY, BlockMap, block_capacity
from iscsi_vmtarget.vm.layers.region_backend import (
    DESCRIPTOR_BYTES,
    RegionBlockBackend,
    decode_descriptor,
    encode_descriptor,
)
from iscsi_vmtarget.vm.operations.resize import resize_vm

MIB = 1 << 20


def open_region(manager: VmManager, name: str, kind: RegionKind) -> RegionBlockBackend:
    vm = manager.find(name)
    return RegionBlockBackend(
        manager.catalog.get(vm.base.pool), vm.base.ref, kind, manager.keyring()
    )


def unit_bytes(state_dir: Path) -> bytes:
    return b"".join(p.read_bytes() for p in state_dir.rglob("*.unit"))


@pytest.fixture
def vm(manager: VmManager) -> VmManager:
    manager.create("hv", disk=4 * MIB, memory=4 * MIB)
    return manager


def test_capacity_is_the_block_view_plus_descriptor(vm: VmManager) -> None:
    region = vm.find("hv").base.header.require_region(RegionKind.STATE)
    dev = open_region(vm, "hv", RegionKind.STATE)
    try:
        assert dev.size == block_capacity(region.length) + DESCRIPTOR_BYTES
        assert dev.size >= 4 * MIB  # memory fits (headroom pays for the spare slots)
        assert dev.read(0, 4096) == bytes(4096)  # never written: zeros
        assert decode_descriptor(dev.read(dev.size - DESCRIPTOR_BYTES, DESCRIPTOR_BYTES)) == 0
    finally:
        dev.close()


def test_small_writes_anywhere_read_back_sealed(vm: VmManager, state_dir: Path) -> None:
    dev = open_region(vm, "hv", RegionKind.STATE)
    marker = b"HYPERVISOR-PLAINTEXT-MARKER-0123"
    try:
        writes = {0: 512, CHUNK - 512: 1024, 3 * CHUNK + 4096: 4096, dev.size - 8192: 4096}
        for offset, length in writes.items():
            dev.write(offset, (marker * (length // len(marker) + 1))[:length])
        dev.flush()
        for offset, length in writes.items():
            assert dev.read(offset, length) == (marker * (length // len(marker) + 1))[:length]
        assert dev.read(512, 512) == bytes(512)  # the rest of a rewritten chunk stays
    finally:
        dev.close()
    assert marker not in unit_bytes(state_dir)  # sealed at rest


def test_descriptor_records_the_image_for_every_reader(vm: VmManager) -> None:
    image = os.urandom(3 * CHUNK + 777)
    dev = open_region(vm, "hv", RegionKind.STATE)
    try:
        dev.write(0, image.ljust(4 * CHUNK, b"\0"))
        dev.write(dev.size - DESCRIPTOR_BYTES, encode_descriptor(len(image)))
        assert decode_descriptor(dev.read(dev.size - DESCRIPTOR_BYTES, 512)) == len(image)
    finally:
        dev.close()
    region = vm.find("hv").base.header.require_region(RegionKind.STATE)
    assert region.status is RegionStatus.BLOCKS and region.used == len(image)
    assert b"".join(vm.read_state("hv")) == image  # vm state read
    snaps.create_snapshot(vm, "hv", "s1")  # a snapshot keeps it; a revert brings it back
    dev = open_region(vm, "hv", RegionKind.STATE)
    try:
        dev.write(0, b"later" * 100)
        dev.write(dev.size - DESCRIPTOR_BYTES, encode_descriptor(500))
    finally:
        dev.close()
    assert b"".join(vm.read_state("hv")) == b"later" * 100
    snaps.revert(vm, "hv", "s1")
    assert b"".join(vm.read_state("hv")) == image
    dev = open_region(vm, "hv", RegionKind.STATE)
    try:
        assert decode_descriptor(dev.read(dev.size - DESCRIPTOR_BYTES, 512)) == len(image)
        assert dev.read(0, len(image) + 23)[: len(image)] == image
    finally:
        dev.close()


def test_a_legacy_image_is_served_then_converted(vm: VmManager, state_dir: Path) -> None:
    image = os.urandom(2 * CHUNK + 100)
    vm.write_state("hv", io.BytesIO(image), len(image))
    dev = open_region(vm, "hv", RegionKind.STATE)
    try:
        assert decode_descriptor(dev.read(dev.size - DESCRIPTOR_BYTES, 512)) == len(image)
        assert dev.read(0, len(image) - 100 + 512)[: len(image)] == image[: len(image) - 100 + 512]
        dev.write(CHUNK, b"\xaa" * 512)  # converts, keeping the old chunks in place
        expect = image[:CHUNK] + b"\xaa" * 512 + image[CHUNK + 512 :]
        assert dev.read(0, len(image)) == expect
    finally:
        dev.close()
    assert b"".join(vm.read_state("hv")) == expect
    vm.write_state("hv", io.BytesIO(image), len(image))  # back to the whole-region format
    assert b"".join(vm.read_state("hv")) == image


def test_a_torn_write_leaves_the_old_content(vm: VmManager, state_dir: Path) -> None:
    """What a kill -9 in the middle of a write leaves: the new slot's ciphertext half
    written, the old slot intact (not flushed since): the chunk reads as before."""
    dying = open_region(vm, "hv", RegionKind.STATE)
    old = b"\x11" * CHUNK
    dying.write(0, old)
    dying.flush()
    dying.write(0, b"\x22" * 4096)  # and then the process dies: no flush, no close
    vm_unit = vm.find("hv").base
    backend = vm.catalog.get(vm_unit.pool).open(vm_unit.ref)
    try:
        region = scan_slots(backend).header.require_region(RegionKind.STATE)  # type: ignore[union-attr]
        newest = BlockMap.scan(backend, region).chunks[0][0]
        slot_at = region.offset + table_bytes(region.length) + newest.physical * CHUNK
        backend.write(slot_at, os.urandom(CHUNK // 2))  # torn
        backend.flush()
        dev = open_region(vm, "hv", RegionKind.STATE)
        try:
            assert dev.read(0, CHUNK) == old  # the torn new copy fails, the old one holds
            dev.write(512, b"\x33" * 512)  # and a new write goes on from there
            assert dev.read(0, 1024) == b"\x11" * 512 + b"\x33" * 512
        finally:
            dev.close()
    finally:
        backend.close()
        dying._backend.close()  # what the kernel does for a dead process


@pytest.mark.parametrize("kind", [RegionKind.CONFIG, RegionKind.STATE])
def test_tampering_is_a_medium_error_not_wrong_bytes(vm: VmManager, kind: RegionKind) -> None:
    """The config's chunk 0 replaces a converted copy; the empty state's is a first
    copy, confirmed by the flush (so not taken for one a power cut tore)."""
    dev = open_region(vm, "hv", kind)
    try:
        dev.write(0, b"\x44" * CHUNK)
        dev.flush()
    finally:
        dev.close()
    vm_unit = vm.find("hv").base
    backend = vm.catalog.get(vm_unit.pool).open(vm_unit.ref)
    try:
        region = scan_slots(backend).header.require_region(kind)  # type: ignore[union-attr]
        slot = BlockMap.scan(backend, region).chunks[0][0]
        entry = region.offset + slot.physical * ENTRY
        backend.write(entry + 20, b"\x00\x01")  # flip bits of the tag
    finally:
        backend.close()
    dev = open_region(vm, "hv", kind)
    try:
        for length in (512, CHUNK):  # a part of the chunk, the whole chunk
            with pytest.raises(BackendError, match="failed authentication"):
                dev.read(0, length)
    finally:
        dev.close()


def test_an_oversized_descriptor_is_refused(vm: VmManager) -> None:
    dev = open_region(vm, "hv", RegionKind.CONFIG)
    try:
        with pytest.raises(BackendError, match="does not fit"):
            dev.write(dev.size - DESCRIPTOR_BYTES, encode_descriptor(dev.size))
    finally:
        dev.close()


_WRITER = """
import itertools, random, sys
from iscsi_vmtarget.vm import StateDir, VmManager
from iscsi_vmtarget.vm.format.header import RegionKind
from iscsi_vmtarget.vm.layers.region_backend import RegionBlockBackend
with VmManager(StateDir.at(sys.argv[1])) as m:
    vm = m.find("hv")
    dev = RegionBlockBackend(m.catalog.get(vm.base.pool), vm.base.ref, RegionKind.STATE,
                             m.keyring())
    rnd = random.Random(1)
    print("ready", flush=True)
    for i in itertools.count():
        fill = bytes([i % 251 + 1])
        chunk = rnd.randrange(6)
        if i % 3:
            dev.write(chunk * 65536 + rnd.randrange(128) * 512, fill * 512 * rnd.choice((1, 8)))
        else:
            dev.write(chunk * 65536, fill * 65536)
        if i % 7 == 0:
            dev.flush()
"""


def test_kill_9_during_writes_leaves_every_chunk_authentic(vm: VmManager, state_dir: Path) -> None:
    import subprocess
    import sys
    import time

    for attempt in range(3):
        child = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(state_dir)], stdout=subprocess.PIPE
        )
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        time.sleep(0.3 + 0.2 * attempt)
        child.kill()  # SIGKILL, mid-write most of the time
        child.wait()
        dev = open_region(vm, "hv", RegionKind.STATE)
        try:
            data = dev.read(0, 6 * CHUNK)  # raises (MEDIUM ERROR) if any chunk fails
        finally:
            dev.close()
        sectors = [data[i : i + 512] for i in range(0, len(data), 512)]
        assert all(s == s[:1] * 512 for s in sectors)  # each 512 B from one write
        assert any(s != bytes(512) for s in sectors)


def test_growing_the_state_region_keeps_a_block_image(vm: VmManager) -> None:
    image = os.urandom(5 * CHUNK + 3)
    dev = open_region(vm, "hv", RegionKind.STATE)
    try:
        dev.write(0, bytes(6 * CHUNK))
        dev.flush()
        dev.write(0, image.ljust(6 * CHUNK, b"\0"))  # into slots past the content's length
        dev.write(dev.size - DESCRIPTOR_BYTES, encode_descriptor(len(image)))
        old_size = dev.size
    finally:
        dev.close()
    resize_vm(vm, "hv", memory=40 * MIB)  # the region moves and grows: all its slots go along
    assert b"".join(vm.read_state("hv")) == image
    dev = open_region(vm, "hv", RegionKind.STATE)
    try:
        assert dev.size > old_size
        assert dev.read(0, 6 * CHUNK)[: len(image)] == image
    finally:
        dev.close()


class _PowerCutDisk:
    """A block device whose flush takes a while (it runs in the codec's background
    thread) and which can be cut: the state it was in when the last completed flush
    began, plus any subset of the writes since."""

    def __init__(self, size: int) -> None:
        import threading

        self.now = bytearray(size)
        self.durable = bytes(size)
        self.log: list[tuple[int, bytes]] = []  # writes not yet known durable
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return len(self.now)

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.now[offset : offset + length])

    def read_into(self, offset: int, buf: memoryview) -> None:
        buf[:] = self.now[offset : offset + len(buf)]

    def write(self, offset: int, data: bytes | memoryview) -> None:
        with self._lock:
            self.now[offset : offset + len(data)] = data
            self.log.append((offset, bytes(data)))

    def flush(self) -> None:
        import time

        with self._lock:
            image, done = bytes(self.now), len(self.log)
        time.sleep(0.003)  # the disk syncing while the writer goes on
        with self._lock:
            self.durable, self.log = image, self.log[done:]

    def cut(self, rnd: object) -> bytes:
        with self._lock:
            image = bytearray(self.durable)
            for offset, data in self.log:
                if rnd.random() < 0.5:  # type: ignore[attr-defined]
                    image[offset : offset + len(data)] = data
        return bytes(image)


def test_rewrites_flushed_in_the_background_survive_a_cut_anywhere() -> None:
    """A region written from empty, then rewritten whole again and again (recycling its
    few spare slots through background flushes): whenever the power is cut (the last
    completed flush plus any subset of the writes after it), every chunk reads as one
    of its written contents (zeros before its first) and never fails authentication."""
    import random
    import uuid

    from iscsi_vmtarget.vm.format.header import Region
    from iscsi_vmtarget.vm.format.sealed import capacity
    from iscsi_vmtarget.vm.format.sealed_blocks import BlockCodec, slots_of, spare_of

    length = 40 * CHUNK
    region = Region(RegionKind.STATE, 0, length, True, RegionStatus.BLOCKS, 1, 0)
    logical = slots_of(length) - spare_of(length)
    disk = _PowerCutDisk(capacity(length) + table_bytes(length))
    key, unit = os.urandom(32), uuid.uuid4()

    def codec(backend: object) -> BlockCodec:
        return BlockCodec(backend, key, unit, RegionKind.STATE, "test")  # type: ignore[arg-type]

    writer, bmap = codec(disk), BlockMap.scan(disk, region)  # type: ignore[arg-type]
    written: dict[int, set[bytes]] = {i: {bytes(CHUNK)} for i in range(logical)}
    rnd = random.Random(7)
    cuts = 0
    for round_ in range(6):  # every round rewrites every chunk, a few at a time
        for first in range(0, logical, 4):
            count = min(4, logical - first)
            data = b"".join(
                bytes([round_ * 16 + i % 16 + 1]) * CHUNK for i in range(first, first + count)
            )
            writer.write_chunks(bmap, first, data)
            for i in range(count):
                written[first + i].add(data[i * CHUNK : (i + 1) * CHUNK])
            image = _PowerCutDisk(disk.size)
            image.now[:] = disk.cut(rnd)
            survivor = codec(image)
            found = BlockMap.scan(image, region)  # type: ignore[arg-type]
            for i in range(logical):  # raises IntegrityError if a chunk has no good copy
                assert survivor.read_chunk(found, i) in written[i]
            cuts += 1
    writer.flush(bmap)
    assert [writer.read_chunk(bmap, i)[:1] for i in range(logical)] == [
        bytes([5 * 16 + i % 16 + 1]) for i in range(logical)
    ]
    assert cuts == 6 * -(-logical // 4)
