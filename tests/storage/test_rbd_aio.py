"""librbd's C-API aio finished on the event loop (storage/rbd_aio.py), against a real
Ceph cluster (tests/conftest.py ``ceph_cluster``)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import threading
import time
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from iscsi_vmtarget.buffers import uninitialized
from iscsi_vmtarget.storage import BackendError
from iscsi_vmtarget.storage.rbd import RbdBackend, RbdImageSpec
from iscsi_vmtarget.storage.rbd_aio import (
    MERGE_BYTES,
    ImageEvents,
    finish_run,
    image_handle,
    merged_runs,
    read_result,
)
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


# -- merging adjacent requests (rbd_aio module doc, "Merging") ---------------------------

_request = st.tuples(
    st.integers(0, 64).map(lambda n: n * 4096),  # offset
    st.sampled_from([4096, 65536, 131072]),  # length
    st.booleans(),  # a write
)


@given(st.lists(_request, max_size=40), st.integers(4096, 1 << 20), st.integers(1, 8))
def test_merged_runs_are_maximal_runs_of_adjacent_requests(
    requests: list[tuple[int, int, bool]], max_bytes: int, max_count: int
) -> None:
    ends = merged_runs(requests, max_bytes, max_count)
    assert ends == sorted(set(ends)) and (ends[-1] == len(requests) if requests else not ends)
    begin = 0
    for end in ends:
        run = requests[begin:end]
        assert run, "an empty run"
        for (o1, n1, w1), (o2, _, w2) in itertools.pairwise(run):
            assert o2 == o1 + n1 and w2 == w1  # adjacent, one direction, in order
        assert len(run) <= max_count
        assert len(run) == 1 or sum(n for _, n, _ in run) <= max_bytes
        if end < len(requests):  # the next one could not have joined
            o, n, w = requests[end]
            last_o, last_n, last_w = run[-1]
            assert (
                o != last_o + last_n
                or w != last_w
                or sum(x for _, x, _ in run) + n > max_bytes
                or len(run) == max_count
            )
        begin = end


def test_a_merged_read_gives_each_buffer_its_own_bytes_and_zeroes_what_was_not_read() -> None:
    got: list[object] = []

    def raises(_: object) -> None:
        raise RuntimeError("a caller's bug")

    outs = [bytearray(b"\xa5" * 100) for _ in range(3)]
    run = [(n * 100, 100, None, got.append, out) for n, out in enumerate(outs)]
    run.insert(1, (0, 0, None, raises, bytearray()))  # logged; the others still end
    finish_run(run, 150, lambda what, code: BackendError(f"{what} failed ({code})"))
    assert got == [b"\xa5" * 100, b"\xa5" * 50 + bytes(50), bytes(100)]
    got.clear()
    finish_run(run, -5, lambda what, code: BackendError(f"{what} failed ({code})"))
    assert [str(e) for e in got] == ["read failed (-5)"] * 3


def test_adjacent_requests_of_one_turn_go_to_librbd_merged(ceph_cluster: CephCluster) -> None:
    """Requests started on the loop in one turn while others are in flight: adjacent
    ones of one direction go as one librbd request, each still ends on its own with
    its own data; a read between writes splits them."""
    spec = ceph_cluster.image(8 * MiB)
    b = RbdBackend(spec)
    chunk = 64 << 10
    blocks = [os.urandom(chunk) for _ in range(12)]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        outcomes: dict[int, asyncio.Future[object]] = {}

        def start(n: int, write: bool) -> None:
            fut = outcomes[n] = loop.create_future()
            if write:  # bytes, bytearray and a writable view: each kind of buffer
                kinds = (bytes, bytearray, lambda x: memoryview(bytearray(x)))
                data = kinds[n % 3](blocks[n])
                b.start_write(OBJECT - 4 * chunk + n * chunk, data, fut.set_result)
            else:
                b.start_read(OBJECT - 4 * chunk + n * chunk, chunk, fut.set_result)

        # The first request of a turn with nothing in flight goes at once; the rest
        # wait for the end of the turn.
        for n in range(8):  # one turn: 8 adjacent writes across an object boundary
            start(n, True)
        assert [await outcomes[n] for n in range(8)] == [None] * 8
        events = b._events
        assert isinstance(events, ImageEvents)
        # 8 writes as 2 librbd requests: the first at once, 7 merged into one
        assert (events.merged_reads, events.merged_writes) == (0, 8 - 2)
        for n in (8, 9):
            start(n, True)
        start(10, False)  # never written: zeros, and not merged with the writes
        start(11, True)
        assert [await outcomes[n] for n in (8, 9, 10, 11)] == [None, None, bytes(chunk), None]
        # 8 | 9 | 10 | 11: four librbd requests, none merged
        assert (events.merged_reads, events.merged_writes) == (0, 6)
        for n in range(12):  # all adjacent reads: merged up to MERGE_BYTES
            start(n, False)
        want = [bytes(chunk) if n == 10 else blocks[n] for n in range(12)]  # 10: a hole
        assert [await outcomes[n] for n in range(12)] == want
        # the first at once, the other 11 in requests of at most MERGE_BYTES
        requests = 1 + -(-11 * chunk // MERGE_BYTES)
        assert (events.merged_reads, events.merged_writes) == (12 - requests, 6)

    try:
        asyncio.run(main())
    finally:
        b.close()


def test_requests_after_the_loop_closed_still_finish_once(ceph_cluster: CephCluster) -> None:
    """An image whose loop has closed (its first requests ran under another
    ``asyncio.run``): later requests go to librbd at once and finish when the image
    closes, each ``done`` exactly once, none raising at the start."""
    b = RbdBackend(ceph_cluster.image(4 * MiB))
    outcomes: list[object] = []

    async def first() -> None:
        assert await _started(b.start_write, 0, b"a" * 4096) is None

    async def later() -> None:
        for n in range(4):  # adjacent: would wait for a turn of the closed loop
            b.start_write(n * 4096, b"b" * 4096, outcomes.append)

    asyncio.run(first())
    asyncio.run(later())
    b.close()
    assert outcomes == [None] * 4
