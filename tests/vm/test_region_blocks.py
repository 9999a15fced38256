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


def test_tampering_is_a_medium_error_not_wrong_bytes(vm: VmManager) -> None:
    dev = open_region(vm, "hv", RegionKind.CONFIG)
    try:
        dev.write(0, b"\x44" * CHUNK)
        dev.flush()
    finally:
        dev.close()
    vm_unit = vm.find("hv").base
    backend = vm.catalog.get(vm_unit.pool).open(vm_unit.ref)
    try:
        region = scan_slots(backend).header.require_region(RegionKind.CONFIG)  # type: ignore[union-attr]
        slot = BlockMap.scan(backend, region).chunks[0][0]
        entry = region.offset + slot.physical * ENTRY
        backend.write(entry + 20, b"\x00\x01")  # flip bits of the tag
    finally:
        backend.close()
    dev = open_region(vm, "hv", RegionKind.CONFIG)
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
