"""A served VM disk without snapshots is its plain guest view (no chain on its I/O path);
the daemon's live operations (:func:`iscsi_vmtarget.server.actions.served.vm_disks`)
make it a chain when they need one, under the guest's I/O: threads write and read
verifiable blocks through the logical units (SCSI commands, as an initiator sends
them) while a live snapshot, a second one and a merge run; no acknowledged write is
lost, no read returns an older block than the last write acknowledged, every snapshot
holds for each block what was written around its moment, and the LU keeps its VPD
0x83 identity, capacity and reservations across the swap."""

from __future__ import annotations

import random
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from iscsi_vmtarget.scsi import ScsiTarget, Status
from iscsi_vmtarget.server.actions.served import vm_disks
from iscsi_vmtarget.server.config import vm_target
from iscsi_vmtarget.server.vm_luns import VmLuns, export_vm
from iscsi_vmtarget.testing.ceph import CephCluster
from iscsi_vmtarget.vm import StateDir, VmManager
from iscsi_vmtarget.vm.format.header import Mode
from iscsi_vmtarget.vm.layers.cow import ChainBackend
from iscsi_vmtarget.vm.layers.view import GuestView
from iscsi_vmtarget.vm.operations import move as moving
from iscsi_vmtarget.vm.operations import snapshot as snaps
from tests.scsi.test_scsi_pr import prin, prout
from tests.vm.helpers import cdb10, make_nexus, sense_triplet

MIB = 1 << 20
BLOCK = 512
DISKS = (4 * MIB, 2 * MIB)
THREADS = 3
SPAN = 300  # blocks each thread owns per LUN: 2-3 grains, so writes straddle grains
READ10, WRITE10, SYNC10 = 0x28, 0x2A, 0x35


def _block(lun: int, thread: int, lba: int, gen: int) -> bytes:
    return struct.pack(">HHIQ", lun, thread, lba, gen) * (BLOCK // 16)


def _gen(lun: int, lba: int, data: bytes) -> int:
    """The generation a block holds (0: never written); AssertionError if it is not
    one of ours for this place."""
    if data == bytes(BLOCK):
        return 0
    got_lun, _thread, got_lba, gen = struct.unpack(">HHIQ", data[:16])
    assert (got_lun, got_lba) == (lun, lba) and data == data[:16] * (BLOCK // 16), data[:16]
    return gen


class Guest:
    """Initiator-side threads on the VM's LUNs: each owns ``SPAN`` blocks of every LUN,
    writes runs of 1-40 of them (a new generation each), reads them back at once and
    a random owned run too, and checks each block is the last one acknowledged."""

    def __init__(self, target: ScsiTarget) -> None:
        self.target = target
        self.nexus = make_nexus()
        target.nexus_added(self.nexus)
        for lun in target.luns:
            target.execute(self.nexus, lun, bytes(6), None)  # the power-on unit attention
        self.latest: dict[tuple[int, int], int] = {}
        #: (lun, lba) -> [[generation, issued, acknowledged]], in order; entered before
        #: the WRITE is sent (acknowledged: infinity until it is)
        self.log: dict[tuple[int, int], list[list[float]]] = {}
        self.errors: list[str] = []
        self.ops = 0
        self._stop = threading.Event()

    def run(self, lun: int, cdb: bytes, data: bytes | None = None) -> bytes:
        payload = None if data is None else memoryview(data)
        response = self.target.execute(self.nexus, lun, cdb, payload)
        if response.status != Status.GOOD:
            raise AssertionError(f"LUN {lun} {cdb.hex()}: {sense_triplet(response)}")
        return bytes(response.data_in or b"")

    def check(self, lun: int, first: int, count: int, data: bytes) -> None:
        for i in range(count):
            lba = first + i
            gen = _gen(lun, lba, data[i * BLOCK : (i + 1) * BLOCK])
            if gen != self.latest.get((lun, lba), 0):
                want = self.latest.get((lun, lba), 0)
                self.errors.append(f"LUN {lun} LBA {lba}: read generation {gen}, wrote {want}")

    def _work(self, index: int) -> None:
        rng = random.Random(index)
        gen = 0
        try:
            while not self._stop.is_set():
                lun = rng.randrange(len(DISKS))
                base = index * SPAN
                first = base + rng.randrange(SPAN)
                count = min(rng.randint(1, 40), base + SPAN - first)
                gen += 1
                data = b"".join(_block(lun, index, first + i, gen) for i in range(count))
                entry = [gen, time.monotonic(), float("inf")]
                for i in range(count):
                    self.log.setdefault((lun, first + i), []).append(entry)
                self.run(lun, cdb10(WRITE10, first, count), data)
                entry[2] = time.monotonic()
                for i in range(count):
                    self.latest[(lun, first + i)] = gen
                self.check(lun, first, count, self.run(lun, cdb10(READ10, first, count)))
                other = base + rng.randrange(SPAN - 8)
                self.check(lun, other, 8, self.run(lun, cdb10(READ10, other, 8)))
                self.ops += 1
        except BaseException as exc:  # reported by the test (errors)
            self.errors.append(f"thread {index}: {exc!r}")

    @contextmanager
    def writing(self) -> Iterator[None]:
        threads = [threading.Thread(target=self._work, args=(i,)) for i in range(THREADS)]
        for thread in threads:
            thread.start()
        try:
            while self.ops < 20 and not self.errors:  # I/O flows before the block starts
                time.sleep(0.01)
            yield
            start = self.ops
            while self.ops < start + 20 and not self.errors:  # and after it
                time.sleep(0.01)
        finally:
            self._stop.set()
            for thread in threads:
                thread.join()
        assert not self.errors, self.errors[:5]

    def check_snapshot(self, images: list[bytes], start: float, end: float) -> None:
        """A snapshot taken between ``start`` and ``end`` holds, per block, a write
        issued before ``end`` and no older than the last acknowledged before ``start``."""
        for lun, image in enumerate(images):
            for index in range(THREADS):
                for lba in range(index * SPAN, (index + 1) * SPAN):
                    gen = _gen(lun, lba, image[lba * BLOCK : (lba + 1) * BLOCK])
                    log = self.log.get((lun, lba), [])
                    floor = max((g for g, _i, acked in log if acked < start), default=0)
                    ceiling = max((g for g, issued, _a in log if issued < end), default=0)
                    assert floor <= gen <= ceiling, (lun, lba, floor, gen, ceiling)


def _runtime(luns: VmLuns) -> Any:
    """What :func:`vm_disks` reads of the daemon's runtime: its registry of targets."""
    target = vm_target(luns)
    return SimpleNamespace(registry=SimpleNamespace(targets={target.name.lower(): target}))


def _identity(guest: Guest, lun: int) -> tuple[bytes, bytes, bytes]:
    """VPD 0x83 (SPC-4 §7.8.6), READ CAPACITY(16) and the registered PR keys."""
    vpd = guest.run(lun, struct.pack(">BBBHB", 0x12, 0x01, 0x83, 255, 0))
    capacity = guest.run(lun, struct.pack(">BB8sIBB", 0x9E, 0x10, bytes(8), 32, 0, 0))
    return vpd, capacity, guest.run(lun, prin(0))


def _images(manager: VmManager, snap: str) -> list[bytes]:
    out = []
    for lun in range(len(DISKS)):
        image = snaps.open_snapshot(manager, "vm", snap, lun)
        try:
            out.append(bytes(image.read(0, image.size)))
        finally:
            image.close()
    return out


def _create(manager: VmManager) -> None:
    manager.create("vm", disk=DISKS[0], memory=MIB, secondaries=DISKS[1:], mode=Mode.ALIGNED)


def test_a_served_vm_without_snapshots_is_its_guest_view(tmp_path: Path) -> None:
    with VmManager(StateDir.at(str(tmp_path / "state"))) as manager:
        _create(manager)
        plain = export_vm(manager.find("vm"), manager.catalog, manager.state.root)
        try:
            assert all(type(lu.backend) is GuestView for lu in plain.guest.values())
            raw = plain.raw[0].backend  # the raw view reads the disk through the LU
            plain.guest[0].backend.write(3 * BLOCK, b"R" * BLOCK)
            assert b"R" * BLOCK in bytes(raw.read(0, raw.size))
        finally:
            plain.close()
        snaps.create_snapshot(manager, "vm", "s1")
        layered = export_vm(manager.find("vm"), manager.catalog, manager.state.root)
        try:
            assert all(isinstance(lu.backend, ChainBackend) for lu in layered.guest.values())
        finally:
            layered.close()


def test_live_snapshot_and_merge_under_guest_io(tmp_path: Path) -> None:
    with VmManager(StateDir.at(str(tmp_path / "state"))) as manager:
        _create(manager)
        luns = export_vm(manager.find("vm"), manager.catalog, manager.state.root)
        runtime = _runtime(luns)
        guest = Guest(ScsiTarget(dict(luns.guest)))
        try:
            for lun in luns.guest:
                cdb, data = prout(0, sark=0xC0FFEE + lun)  # REGISTER
                guest.run(lun, cdb, data)
            before = {lun: _identity(guest, lun) for lun in luns.guest}
            views = {n: lu.backend for n, lu in luns.guest.items()}
            assert all(type(view) is GuestView for view in views.values())
            windows = {}
            with guest.writing():
                for snap in ("s1", "s2"):
                    start = time.monotonic()
                    with vm_disks(runtime, "vm") as disks:
                        snaps.create_snapshot(manager, "vm", snap, live=disks)
                    windows[snap] = (start, time.monotonic())
                    guest.check_snapshot(_images(manager, snap), *windows[snap])
                s2 = _images(manager, "s2")
                with vm_disks(runtime, "vm") as disks:
                    snaps.delete_snapshot(manager, "vm", "s1", live=disks)  # merges into s2
                assert _images(manager, "s2") == s2
            for n, lu in luns.guest.items():  # the top stays: never merged while served
                assert isinstance(lu.backend, ChainBackend) and lu.backend.root is views[n]
                assert _identity(guest, n) == before[n]  # no unit attention either
                for first in range(0, THREADS * SPAN, 64):
                    data = guest.run(n, cdb10(READ10, first, 64))
                    guest.check(n, first, 64, data)
                guest.run(n, cdb10(SYNC10, 0, 0))
            assert not guest.errors, guest.errors[:5]
        finally:
            luns.close()
        assert not manager.served(manager.find("vm"))  # the chain ran the view's release
        vm = manager.find("vm", manager.discover())  # repairs: merges the top offline
        for (lun, lba), gen in guest.latest.items():
            backend = snaps.open_live(manager, vm, lun)
            try:
                assert _gen(lun, lba, bytes(backend.read(lba * BLOCK, BLOCK))) == gen
            finally:
                backend.close()


def test_a_write_in_flight_at_the_first_snapshot_is_in_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The snapshot that turns a plain view into a chain waits for a WRITE the guest
    view is still carrying out: the snapshot holds it, and it never changes after."""
    release, entered = threading.Event(), threading.Event()
    write = GuestView.write

    def held(self: GuestView, offset: int, data: bytes | bytearray | memoryview) -> None:
        if offset == 7 * BLOCK and not release.is_set():
            entered.set()
            release.wait(10)
        write(self, offset, data)

    monkeypatch.setattr(GuestView, "write", held)
    with VmManager(StateDir.at(str(tmp_path / "state"))) as manager:
        _create(manager)
        luns = export_vm(manager.find("vm"), manager.catalog, manager.state.root)
        runtime = _runtime(luns)
        guest = Guest(ScsiTarget(dict(luns.guest)))
        taken: list[bytes] = []

        def snapshot() -> None:
            with vm_disks(runtime, "vm") as disks:
                snaps.create_snapshot(manager, "vm", "s1", live=disks)
            taken.append(_images(manager, "s1")[0])

        writer = threading.Thread(target=guest.run, args=(0, cdb10(WRITE10, 7, 1), b"F" * BLOCK))
        threads = [writer, threading.Thread(target=snapshot)]
        try:
            writer.start()
            assert entered.wait(5)
            threads[1].start()
            time.sleep(0.2)
            assert threads[1].is_alive()  # the swap waits for the WRITE
        finally:
            release.set()
            for thread in threads:
                thread.join(10)
        try:
            assert taken and taken[0][7 * BLOCK : 8 * BLOCK] == b"F" * BLOCK
            guest.run(0, cdb10(WRITE10, 0, 16), b"L" * 16 * BLOCK)  # copies grain 0 up
            assert _images(manager, "s1")[0] == taken[0]
            assert guest.run(0, cdb10(READ10, 0, 16)) == b"L" * 16 * BLOCK
        finally:
            luns.close()


def test_a_chain_left_without_layers_gives_way_to_the_view(tmp_path: Path) -> None:
    """A live move of a VM without snapshots needs a chain (its write hook tracks the
    guest's writes, its root is rebound to the moved unit); once the action ends the
    LU serves the moved unit's plain guest view, with the same identity."""
    with VmManager(StateDir.at(str(tmp_path / "state"))) as manager:
        _create(manager)
        manager.catalog.create_directory("p2", None)
        luns = export_vm(manager.find("vm"), manager.catalog, manager.state.root)
        runtime = _runtime(luns)
        guest = Guest(ScsiTarget(dict(luns.guest)))
        try:
            before = {lun: _identity(guest, lun) for lun in luns.guest}
            old = {n: lu.backend for n, lu in luns.guest.items()}
            with guest.writing(), vm_disks(runtime, "vm") as disks:
                moving.move_live(manager, "vm", "p2", disks, raw=luns.raw)
                assert all(isinstance(lu.backend, ChainBackend) for lu in luns.guest.values())
            for n, lu in luns.guest.items():
                assert type(lu.backend) is GuestView and lu.backend is not old[n]
                assert _identity(guest, n) == before[n]
                for first in range(0, THREADS * SPAN, 64):
                    guest.check(n, first, 64, guest.run(n, cdb10(READ10, first, 64)))
        finally:
            luns.close()
        assert not manager.served(manager.find("vm"))  # the view got its release back
        assert {u.pool for u in manager.find("vm", manager.discover()).all_units} == {"p2"}


def test_a_chain_moved_into_an_rbd_pool_is_served_as_remote(
    tmp_path: Path, ceph_cluster: CephCluster
) -> None:
    """A VM disk with a snapshot keeps its chain through a live move into an rbd pool;
    when the action ends its LU serves it as the remote storage it now is (READs and
    WRITEs in worker threads, never inline on the event loop), with its data."""
    namespace = f"{ceph_cluster.pool}/l{uuid.uuid4().hex[:12]}"
    ceph_cluster.rbd("namespace", "create", namespace)
    with VmManager(StateDir.at(str(tmp_path / "state"))) as manager:
        _create(manager)
        snaps.create_snapshot(manager, "vm", "s1")
        manager.catalog.create_rbd("ceph", namespace, ceph_cluster.conf)
        luns = export_vm(manager.find("vm"), manager.catalog, manager.state.root)
        runtime = _runtime(luns)
        guest = Guest(ScsiTarget(dict(luns.guest)))
        try:
            assert not any(lu.abilities.remote for lu in luns.guest.values())
            with guest.writing(), vm_disks(runtime, "vm") as disks:
                moving.move_live(manager, "vm", "ceph", disks, raw=luns.raw)
            for n, lu in luns.guest.items():
                assert isinstance(lu.backend, ChainBackend) and lu.backend.layers
                assert lu.abilities.remote, n
                for first in range(0, THREADS * SPAN, 64):
                    guest.check(n, first, 64, guest.run(n, cdb10(READ10, first, 64)))
        finally:
            luns.close()
