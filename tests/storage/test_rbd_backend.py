"""RBD images as block backends, against a real Ceph cluster (tests/conftest.py
``ceph_cluster``): data goes through librbd to a bluestore OSD and back."""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import time
from pathlib import Path

import pytest

from iscsi_vmtarget.storage import (
    Abilities,
    AllocationMap,
    AsyncIO,
    BackendError,
    BlockBackend,
    Remeasurable,
    Zeroing,
)
from iscsi_vmtarget.storage.rbd import (
    RbdBackend,
    RbdImageSpec,
    RbdPoolSpec,
    create_image,
    image_exists,
    list_images,
    remove_image,
)
from iscsi_vmtarget.storage.rbd_lock import ImageLock
from iscsi_vmtarget.testing.ceph import CephCluster
from tests.storage.test_backends import _exercise

MiB = 1 << 20
OBJECT = 4 * MiB  # RBD's default object size (order 22)


def test_specs_parse_rbd_spelling() -> None:
    spec = RbdImageSpec.parse("vms/tenant1/disk0", conf="/c.conf", client_id="gw")
    assert spec.where == RbdPoolSpec("vms", "tenant1", "/c.conf", "gw") and spec.name == "disk0"
    assert str(spec) == "vms/tenant1/disk0" and str(RbdImageSpec.parse("rbd/d")) == "rbd/d"
    for bad in ("disk0", "rbd/", "/d", "a/b/c/d", "rbd/d@snap"):
        with pytest.raises(ValueError, match="POOL/IMAGE"):
            RbdImageSpec.parse(bad)


def test_io_unmap_flush_through_librbd(ceph_cluster: CephCluster) -> None:
    spec = ceph_cluster.image(16 * MiB)
    b = RbdBackend(spec)
    try:
        assert isinstance(b, BlockBackend) and b.size == 16 * MiB and not b.read_only
        _exercise(b)
        # unmap of a range not aligned to anything still reads back as zeros
        b.write(OBJECT - 1000, b"\x5a" * 3000)
        b.unmap(OBJECT - 512, 1024)
        assert bytes(b.read(OBJECT - 1000, 3000)) == b"\x5a" * 488 + bytes(1024) + b"\x5a" * 1488
    finally:
        b.close()
    # written data is in the cluster, not in this process: the rbd tool reads it back
    again = RbdBackend(spec, read_only=True)
    try:
        assert bytes(again.read(OBJECT - 1000, 488)) == b"\x5a" * 488
        with pytest.raises(BackendError, match="read-only"):
            again.write(0, b"x" * 512)
    finally:
        again.close()


def test_the_gateway_has_no_write_back_cache(ceph_cluster: CephCluster) -> None:
    """librbd's default cache (policy writearound) acknowledges a write while it is
    still in flight to the OSDs once it has seen a flush: a gateway killed then loses
    it, and the gateway a failover moves to never sees it. Every connection turns the
    cache off, so a completed write is on the OSDs."""
    b = RbdBackend(ceph_cluster.image(4 * MiB))
    try:
        assert b.cluster.conf_get("rbd_cache") == "false"
    finally:
        b.close()


def test_the_gateway_dispatches_in_the_caller_with_room_in_flight(
    ceph_cluster: CephCluster,
) -> None:
    """librbd dispatches a gateway's requests in the calling thread (no work-queue
    hand-off), with an Objecter budget large enough that submitting never waits."""
    b = RbdBackend(ceph_cluster.image(4 * MiB))
    try:
        conf = b.cluster.conf_get
        assert conf("rbd_non_blocking_aio") == "false"
        assert int(conf("objecter_inflight_ops")) >= 64 * 128
        assert int(conf("objecter_inflight_op_bytes")) >= 1 << 30
    finally:
        b.close()


def test_allocation_map_follows_objects(ceph_cluster: CephCluster) -> None:
    """GET LBA STATUS's source: a never-written image is one hole; a write maps (at
    least) its object's extent and nothing outside that object; unmapping the whole
    object makes it a hole again."""
    b = RbdBackend(ceph_cluster.image(4 * OBJECT))
    try:
        assert b.allocated_ranges(0, b.size) == []
        b.write(OBJECT + 8192, os.urandom(4096))
        ranges = b.allocated_ranges(0, b.size)
        assert len(ranges) == 1
        start, length = ranges[0]
        assert OBJECT <= start <= OBJECT + 8192 and OBJECT + 12288 <= start + length <= 2 * OBJECT
        # a window inside the object is clipped to the window
        assert b.allocated_ranges(OBJECT + 8192, 512) == [(OBJECT + 8192, 512)]
        assert b.allocated_ranges(2 * OBJECT, OBJECT) == []
        b.unmap(OBJECT, OBJECT)
        assert b.allocated_ranges(0, b.size) == []
        assert bytes(b.read(OBJECT + 8192, 4096)) == bytes(4096)
    finally:
        b.close()


def test_zero_range_keeps_space_and_abilities(ceph_cluster: CephCluster) -> None:
    b = RbdBackend(ceph_cluster.image(2 * OBJECT))
    try:
        b.write(0, b"\xff" * 8192)
        b.zero_range(0, OBJECT)
        assert bytes(b.read(0, 8192)) == bytes(8192)
        assert b.allocated_ranges(0, OBJECT) == [(0, OBJECT)]  # zeroed, still allocated
        got = Abilities.of(b)
        assert isinstance(b, Zeroing) and isinstance(b, AllocationMap)
        assert got.zero_range is not None and got.allocated_ranges is not None
        assert got.written_ranges is None and got.crypto_erase is None
    finally:
        b.close()


def test_resize_is_seen_by_the_cluster(ceph_cluster: CephCluster) -> None:
    spec = ceph_cluster.image(4 * MiB)
    b = RbdBackend(spec)
    other = RbdBackend(spec, read_only=True)  # a served view's handle, say
    try:
        b.write(0, b"keep" * 128)
        b.resize(12 * MiB)
        assert b.size == 12 * MiB
        b.write(11 * MiB, b"new!" * 128)
        b.flush()
        assert other.size == 4 * MiB  # measured once, until asked
        assert isinstance(other, Remeasurable) and other.remeasure() == 12 * MiB
        assert bytes(other.read(11 * MiB, 4)) == b"new!"
    finally:
        b.close()
        other.close()
    assert "12 MiB" in ceph_cluster.rbd("info", str(spec))
    again = RbdBackend(spec)
    try:
        assert again.size == 12 * MiB and bytes(again.read(0, 4)) == b"keep"
    finally:
        again.close()


def test_create_remove_and_clear_errors(ceph_cluster: CephCluster) -> None:
    spec = RbdImageSpec(ceph_cluster.pool, "lifecycle")
    create_image(spec, MiB)
    assert image_exists(spec) and "lifecycle" in list_images(ceph_cluster.pool)
    with pytest.raises(BackendError, match="exists already"):
        create_image(spec, 2 * MiB)
    assert "1 MiB" in ceph_cluster.rbd("info", str(spec))  # the first one, untouched
    remove_image(spec)
    assert not image_exists(spec)
    with pytest.raises(BackendError, match="rbd/lifecycle does not exist"):
        RbdBackend(spec)
    with pytest.raises(BackendError, match="cannot open RADOS pool 'nopool'"):
        RbdBackend(RbdImageSpec(RbdPoolSpec("nopool", conf=ceph_cluster.conf), "x"))


def _wait(result: queue.SimpleQueue[object]) -> object:
    return result.get(timeout=60)


def test_async_io_at_queue_depth_reads_back(ceph_cluster: CephCluster) -> None:
    """librbd's aio_write / aio_read (backend.AsyncIO) with 32 requests in flight:
    each completes once, in whatever order, and every byte reads back."""
    spec = ceph_cluster.image(8 * MiB)
    b = RbdBackend(spec)
    try:
        assert Abilities.of(b).aio is b and isinstance(b, AsyncIO)
        chunk = 64 << 10
        data = {n: os.urandom(chunk) for n in range(32)}
        done: queue.SimpleQueue[object] = queue.SimpleQueue()
        at = {n: OBJECT // 2 + n * (chunk + 4096) for n in data}  # one straddles 2 objects
        for n, payload in data.items():
            b.start_write(at[n], memoryview(bytearray(payload)), done.put)
        assert [_wait(done) for _ in data] == [None] * len(data) and done.empty()
        for n in data:
            b.start_read(at[n], chunk, lambda got, n=n: done.put((n, got)))
        answers = dict(_wait(done) for _ in data)  # type: ignore[misc]
        assert answers == data
        b.start_read(7 * MiB, 4096, done.put)  # never written: zeros, full length
        assert _wait(done) == bytes(4096)
    finally:
        b.close()
    ro = RbdBackend(spec, read_only=True)
    try:
        with pytest.raises(BackendError, match="read-only"):
            ro.start_write(0, b"x" * 512, done.put)
        assert done.empty()  # refused outright: no callback
    finally:
        ro.close()


def test_async_write_of_a_fenced_client_fails_and_changes_nothing(
    ceph_cluster: CephCluster, tmp_path: Path
) -> None:
    """A gateway that was fenced (its client put on the OSD blocklist, as a takeover
    does: storage/rbd_lock.py) gets an error from its asynchronous writes, and what
    the image holds stays as it was."""
    spec = ceph_cluster.image(4 * MiB)
    conf = tmp_path / "ceph.conf"  # another path to the same cluster: its own client
    shutil.copy(ceph_cluster.conf, conf)
    fenced = RbdBackend(RbdImageSpec.parse(str(spec), conf=str(conf)))
    owner = RbdBackend(spec, read_only=True)
    done: queue.SimpleQueue[object] = queue.SimpleQueue()
    try:
        assert ImageLock(fenced).try_take()
        fenced.start_write(0, b"old!" * 1024, done.put)
        assert _wait(done) is None
        ImageLock(owner).fence(str(fenced.cluster.get_addrs()))
        deadline = time.monotonic() + 60
        while True:  # the OSD refuses once it has the new map: wait for that
            fenced.start_write(0, b"new!" * 1024, done.put)
            outcome = _wait(done)
            if outcome is not None or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert isinstance(outcome, BackendError) and "write failed" in str(outcome)
        assert bytes(owner.read(0, 4096)) in (b"old!" * 1024, b"new!" * 1024)
        settled = bytes(owner.read(0, 4096))
        fenced.start_write(0, b"bad!" * 1024, done.put)
        assert isinstance(_wait(done), BackendError)
        assert bytes(owner.read(0, 4096)) == settled
    finally:
        owner.close()
        with contextlib.suppress(BackendError):
            fenced.close()
