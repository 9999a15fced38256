"""librbd's C-API aio finished on the event loop (storage/rbd_aio.py), against a real
Ceph cluster (tests/conftest.py ``ceph_cluster``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import threading
import time
from pathlib import Path

from iscsi_vmtarget.buffers import uninitialized
from iscsi_vmtarget.storage import BackendError
from iscsi_vmtarget.storage.rbd import RbdBackend, RbdImageSpec
from iscsi_vmtarget.storage.rbd_aio import ImageEvents, image_handle, read_result
from iscsi_vmtarget.storage.rbd_lock import ImageLock
from iscsi_vmtarget.testing.ceph import CephCluster

MiB = 1 << 20
OBJECT = 4 * MiB


def test_the_c_handle_is_found_on_this_machines_python3_rbd(ceph_cluster: CephCluster) -> None:
    """The gateway's fast aio path needs the rbd_image_t behind python3-rbd's Image:
    if a package update changes its layout, this fails (and the gateway silently
    falls back to the binding's slower callbacks)."""
    b = RbdBackend(ceph_cluster.image(4 * MiB))
    try:
        assert image_handle(b.handle()) is not None
        assert image_handle(object()) is None  # not an rbd.Image: refused, no crash
    finally:
        b.close()


async def _started(start: object, *args: object) -> object:
    """Start one request; its outcome, checking ``done`` ran on this loop's thread."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[object] = loop.create_future()
    me = threading.get_ident()

    def done(outcome: object) -> None:
        assert threading.get_ident() == me, "done() ran off the event loop"
        fut.set_result(outcome)

    start(*args, done)  # type: ignore[operator]
    return await asyncio.wait_for(fut, 60)


def test_requests_in_flight_finish_on_the_loop_and_read_back(ceph_cluster: CephCluster) -> None:
    spec = ceph_cluster.image(8 * MiB)
    b = RbdBackend(spec)
    chunk = 64 << 10
    data = {n: os.urandom(chunk) for n in range(32)}
    at = {n: OBJECT // 2 + n * (chunk + 4096) for n in data}  # one straddles 2 objects

    async def main() -> None:
        writes = [_started(b.start_write, at[n], memoryview(bytearray(p))) for n, p in data.items()]
        writes.append(_started(b.start_write, 0, b"\x01" * 4096))  # bytes: passed as is
        assert await asyncio.gather(*writes) == [None] * (len(data) + 1)
        assert isinstance(b._events, ImageEvents)  # the C path, not the binding's
        reads = await asyncio.gather(*(_started(b.start_read, at[n], chunk) for n in data))
        assert dict(zip(data, reads, strict=True)) == data
        assert await _started(b.start_read, 7 * MiB, 4096) == bytes(4096)  # never written
        assert await _started(b.start_read, 0, 4096) == b"\x01" * 4096

    try:
        asyncio.run(main())
        assert bytes(b.read(at[3], chunk)) == data[3]  # the synchronous path agrees
    finally:
        b.close()


def test_a_short_read_never_sends_old_memory() -> None:
    """Read buffers are not zeroed up front; whatever librbd did not fill is zeroed
    before the buffer leaves."""
    for _ in range(64):  # leave freed, dirty 64 KiB blocks for the allocator to reuse
        dirty = bytearray(b"\xa5" * (64 << 10))
        del dirty
    out = uninitialized(64 << 10)
    out[:100] = b"\x01" * 100  # what librbd read
    assert read_result(out, 100) == b"\x01" * 100 + bytes((64 << 10) - 100)
    whole = bytearray(b"\x02" * 4096)
    assert read_result(whole, 4096) is whole and whole == b"\x02" * 4096


def test_holes_read_as_zeros_into_unzeroed_buffers(ceph_cluster: CephCluster) -> None:
    """Reads of never-written objects and of the holes around a small write, many in
    flight, into buffers the allocator hands back dirty: every byte is librbd's."""
    spec = ceph_cluster.image(16 * MiB)
    b = RbdBackend(spec)
    chunk = 64 << 10
    small = os.urandom(4096)

    async def main() -> None:
        await _started(b.start_write, OBJECT + 30000, small)  # inside object 1
        for _ in range(3):
            junk = [bytearray(b"\xa5" * chunk) for _ in range(64)]
            del junk  # freed dirty: the reads' buffers come from these blocks
            offsets = [o * OBJECT + n * chunk for o in (0, 1, 3) for n in range(16)]
            reads = await asyncio.gather(*(_started(b.start_read, o, chunk) for o in offsets))
            for offset, got in zip(offsets, reads, strict=True):
                want = bytearray(chunk)
                lo = OBJECT + 30000 - offset
                if -4096 < lo < chunk:
                    want[max(lo, 0) : lo + 4096] = small[max(-lo, 0) : chunk - lo]
                assert got == want, f"read at {offset} is not what is stored"

    try:
        asyncio.run(main())
        assert isinstance(b._events, ImageEvents)
    finally:
        b.close()


def test_close_waits_for_requests_in_flight(ceph_cluster: CephCluster) -> None:
    """Closing an image (a unit closed, a backend swapped) while requests run: every
    one finishes (its ``done`` called exactly once) before the handle goes."""
    spec = ceph_cluster.image(8 * MiB)
    b = RbdBackend(spec)
    outcomes: list[object] = []

    async def main() -> None:
        for n in range(64):
            b.start_write(n * 65536, os.urandom(65536), outcomes.append)
        await asyncio.to_thread(b.close)  # from a worker thread, as units close
        assert b.closed

    asyncio.run(main())
    assert outcomes == [None] * 64


def test_a_fenced_clients_writes_fail_on_the_c_path(ceph_cluster: CephCluster,
                                                     tmp_path: Path) -> None:
    spec = ceph_cluster.image(4 * MiB)
    conf = tmp_path / "ceph.conf"  # another path to the same cluster: its own client
    shutil.copy(ceph_cluster.conf, conf)
    fenced = RbdBackend(RbdImageSpec.parse(str(spec), conf=str(conf)))
    owner = RbdBackend(spec, read_only=True)

    async def main() -> object:
        assert ImageLock(fenced).try_take()
        assert await _started(fenced.start_write, 0, b"old!" * 1024) is None
        ImageLock(owner).fence(fenced.client_address())
        deadline = time.monotonic() + 60
        while True:  # the OSD refuses once it has the new map
            outcome = await _started(fenced.start_write, 0, b"new!" * 1024)
            if outcome is not None or time.monotonic() > deadline:
                return outcome
            await asyncio.sleep(0.2)

    try:
        outcome = asyncio.run(main())
        assert isinstance(outcome, BackendError) and "write failed" in str(outcome)
    finally:
        owner.close()
        with contextlib.suppress(BackendError):  # a blocklisted client may not close cleanly
            fenced.close()
