"""Replication of disks that grew while they had snapshots (:mod:`iscsi_vmtarget.vm.
snapshot_resize`): the unit keeps its old size, the guest sees its top layer's. A
replica records each checkpoint's image size apart from the copied unit headers, so a
first round sends the whole grown disk and promote restores it; a disk that grows
between rounds fits a replica made with room to spare, and past that room the round is
refused, naming the size of a new replica. Replicas of the first format version (no
image sizes) keep working, and one made of a grown disk is refused, not trusted."""

from __future__ import annotations

import hashlib
import json
import os
import struct

import pytest

from iscsi_vmtarget.storage import FileBackend, create_sparse_file
from iscsi_vmtarget.vm import SizeError
from iscsi_vmtarget.vm.layers.cow import GRAIN, grains_of
from iscsi_vmtarget.vm.operations import snapshot as snaps
from iscsi_vmtarget.vm.operations.replica import SB_OFFSETS, ReplicaError, read_superblock
from iscsi_vmtarget.vm.operations.replicate import (
    OfflineCheckpointer,
    replica_layout,
    replicate_round,
)
from iscsi_vmtarget.vm.operations.resize import resize_vm
from tests.vm.replica_site import MIB, URL, Site, superblock

OLD = (6 * MIB, 3 * MIB)  # what Site creates
GROWN = (9 * MIB + 1536, 4 * MIB)  # LUN 0's last grain straddles its end


def _grow(site: Site) -> None:
    resize_vm(site.src, "vm1", disk=GROWN[0], secondaries={1: GROWN[1]})


def _write_past_the_old_end(site: Site) -> None:
    site.write(OLD[0] - 1000, b"B" * (GRAIN + 5000))  # across the old end
    site.write(GROWN[0] - 512, b"Z" * 512)  # the new last block
    site.write(GROWN[1] - 4096, b"y" * 4096, lun=1)


def _needed(site: Site) -> int:
    return replica_layout(site.src.find("vm1")).size_needed


def _snapshot_names(site: Site) -> list[str]:
    return [s.name for s in snaps.list_snapshots(site.src, "vm1")]


def _promoted_sizes(site: Site) -> list[int]:
    vm = site.dst.find("vm1")
    return [vm.disk_size(u) for u in vm.units]


def test_first_round_of_a_disk_grown_with_snapshots_sends_it_whole(site: Site) -> None:
    site.write(0, b"A" * 70000)
    site.write(OLD[0] - 512, b"E" * 512)  # the old last block
    snaps.create_snapshot(site.src, "vm1", "user")
    _grow(site)
    assert site.src.find("vm1").base.header.disk_size == OLD[0]  # the unit kept its size
    _write_past_the_old_end(site)
    needed = _needed(site)
    with pytest.raises(SizeError, match=rf"needs {needed} bytes .*vm receive vm1 --size {needed}"):
        site.round()  # the file Site made fits the old sizes only
    assert _snapshot_names(site) == ["user"]  # refused before any checkpoint
    os.truncate(site.replica, needed)
    assert site.round().full
    sb = superblock(site)
    assert [v.size for v in sb.volumes] == list(GROWN)
    assert [v.header.disk_size for v in sb.volumes] == list(OLD)  # the copied headers
    expected = site.images(site.src)
    assert [len(image) for image in expected] == list(GROWN)
    site.promote()
    assert _promoted_sizes(site) == list(GROWN)
    promoted = site.images(site.dst)
    assert promoted == expected
    assert promoted[0][OLD[0] - 1000 : OLD[0] + GRAIN + 4000] == b"B" * (GRAIN + 5000)
    assert promoted[0][GROWN[0] - 512 :] == b"Z" * 512
    never_written = promoted[0][OLD[0] + GRAIN + 4000 : GROWN[0] - 512]
    assert never_written == bytes(len(never_written))


def test_growth_between_rounds_fits_a_replica_made_with_room(site: Site) -> None:
    room = 2 * _needed(site)
    os.truncate(site.replica, room)
    site.write(0, b"A" * GRAIN)
    site.round()
    sb = superblock(site)
    assert sb.size_needed <= room
    assert [v.size for v in sb.volumes] == list(OLD)
    assert all(v.capacity >= g for v, g in zip(sb.volumes, GROWN, strict=True))
    _grow(site)
    _write_past_the_old_end(site)
    report = site.round()
    new = sum(grains_of(g) - o // GRAIN for g, o in zip(GROWN, OLD, strict=True))
    assert not report.full and report.grains == new + 1  # and the grain below the old end
    assert [v.size for v in superblock(site).volumes] == list(GROWN)
    expected = site.images(site.src)
    site.promote()
    assert _promoted_sizes(site) == list(GROWN)
    assert site.images(site.dst) == expected


def test_growth_past_the_replicas_room_is_refused_saying_what_to_do(site: Site) -> None:
    site.write(0, b"A" * GRAIN)
    site.round()
    _grow(site)
    before = _snapshot_names(site)
    needed = _needed(site)
    with pytest.raises(
        ReplicaError,
        match=rf"no longer fits .*LUN 0 is {GROWN[0]} bytes now, the replica has room for "
        rf"{OLD[0]} .*'iscsi-vmtarget vm receive vm1 --size {needed}'",
    ):
        site.round()
    assert _snapshot_names(site) == before  # refused before any checkpoint
    assert superblock(site).seq == 1  # the replica still holds checkpoint 1
    os.unlink(site.replica)  # what the message says: a new replica of that size
    create_sparse_file(str(site.replica), needed)
    assert site.round().full
    expected = site.images(site.src)
    site.promote()
    assert site.images(site.dst) == expected and _promoted_sizes(site) == list(GROWN)


def _rewrite_superblock(site: Site, version: int) -> None:
    """Write the replica's superblock again as format ``version``; version 1 as the
    code before image sizes wrote it (no size, no capacity)."""
    sb = superblock(site)
    doc = sb.to_json()
    if version == 1:
        for volume in doc["volumes"]:  # type: ignore[attr-defined]
            del volume["size"], volume["capacity"]
    body = json.dumps(doc).encode()
    generation = sb.generation + 1
    image = struct.pack("<8sHHIQ", b"IVMTREPL", version, 0, len(body), generation) + body
    image += hashlib.sha256(image).digest()
    with open(site.replica, "r+b") as fh:
        fh.seek(SB_OFFSETS[generation % 2])
        fh.write(image.ljust(-(-len(image) // 512) * 512, b"\0"))


def test_a_version_1_replica_keeps_working(site: Site) -> None:
    site.write(0, b"A" * GRAIN)
    site.round()
    _rewrite_superblock(site, 1)
    sb = superblock(site)
    assert [(v.size, v.capacity) for v in sb.volumes] == [(s, s) for s in OLD]
    site.write(GRAIN, b"B" * GRAIN)
    assert site.round().grains == 1
    with open(site.replica, "rb") as fh:
        fh.seek(SB_OFFSETS[superblock(site).generation % 2] + 8)
        assert struct.unpack("<H", fh.read(2)) == (2,)  # written as version 2 now
    expected = site.images(site.src)
    site.promote()
    assert site.images(site.dst) == expected


def test_a_version_1_replica_of_a_grown_disk_is_refused(site: Site) -> None:
    """The code before image sizes made such a replica without the grown part: its
    next round must not trust it."""
    snaps.create_snapshot(site.src, "vm1", "user")
    _grow(site)
    os.truncate(site.replica, _needed(site))
    site.round()
    _rewrite_superblock(site, 1)  # sizes from the unit headers, as that code had them
    with pytest.raises(ReplicaError, match=rf"LUN 0 is {GROWN[0]} bytes now, .*room for {OLD[0]}"):
        site.round()


def test_a_newer_replica_format_is_refused(site: Site) -> None:
    site.round()
    _rewrite_superblock(site, 3)
    disk = FileBackend(str(site.replica))
    try:
        with pytest.raises(ReplicaError, match=r"format version 3; .* reads version 2: upgrade"):
            read_superblock(disk)
    finally:
        disk.close()


def test_a_disk_only_mirror_follows_growth_within_its_lun(site: Site) -> None:
    mirror = site.root / "mirror.img"
    create_sparse_file(str(mirror), 8 * MIB)

    def mirror_round() -> object:
        disk = FileBackend(str(mirror))
        try:
            checkpointer = OfflineCheckpointer(site.src, "vm1")
            return replicate_round(site.src, "vm1", disk, checkpointer, url=URL, disk_only=True)
        finally:
            disk.close()

    site.write(0, b"A" * GRAIN)
    mirror_round()
    resize_vm(site.src, "vm1", disk=8 * MIB - 512)  # grows by a new top: a checkpoint exists
    site.write(8 * MIB - 1024, b"Z" * 512)
    report = mirror_round()
    assert not report.full  # type: ignore[attr-defined]
    image = site.image(site.src, 0)
    assert mirror.read_bytes()[: len(image)] == image and len(image) == 8 * MIB - 512
    resize_vm(site.src, "vm1", disk=9 * MIB)
    with pytest.raises(SizeError, match=rf"holds {8 * MIB} bytes; LUN 0 of VM 'vm1' is {9 * MIB}"):
        mirror_round()


def test_deleting_the_vm_forgets_its_replicas(site: Site) -> None:
    site.round()
    acks = site.root / "src" / "conf" / "replication" / "vm1.json"
    assert acks.exists()
    site.src.delete("vm1")
    assert not acks.exists()
