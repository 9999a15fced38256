"""The ALUA owner role of an RBD LUN with active/non-optimized non-owners
(server/alua_role.py), on the test cluster: gateways that find the holder gone at the
same moment each try to record themselves, and exactly one succeeds (compare-and-swap
on the role object's version); a record an earlier version left in the image's
metadata is read until the object exists."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from iscsi_vmtarget.server.alua_role import OWNER_KEY, Holder, OwnerRole
from iscsi_vmtarget.storage.rbd import RbdBackend, RbdImageSpec
from iscsi_vmtarget.testing.ceph import CephCluster


@pytest.fixture
def image(ceph_cluster: CephCluster) -> Iterator[RbdImageSpec]:
    yield ceph_cluster.image(1 << 20, prefix="role")


def contenders(image: RbdImageSpec, count: int) -> list[tuple[RbdBackend, OwnerRole]]:
    """``count`` gateways' views of the role, each on its own handle of the image."""
    backends = [RbdBackend(image) for _ in range(count)]
    return [(backend, OwnerRole(backend)) for backend in backends]


def test_of_two_gateways_taking_the_role_on_one_reading_one_wins(image: RbdImageSpec) -> None:
    (a, role_a), (b, role_b) = contenders(image, 2)
    try:
        assert role_a.holder() == role_b.holder() == Holder(None, None, None)
        seen_a, seen_b = role_a.holder(), role_b.holder()
        assert role_a.take(1, "10.0.0.1:0/1", seen_a)
        assert not role_b.take(2, "10.0.0.2:0/2", seen_b)  # based on what A replaced
        now = role_b.holder()
        assert (now.group, now.address) == (1, "10.0.0.1:0/1")
        # A died: both read it, both try; again one record wins, the other is refused
        seen_a, seen_b = role_a.holder(), role_b.holder()
        assert role_b.take(2, "10.0.0.2:0/2", seen_b)
        assert not role_a.take(1, "10.0.0.1:0/3", seen_a)
        assert (role_a.holder().group, role_a.holder().address) == (2, "10.0.0.2:0/2")
        role_a.give_up(1, "10.0.0.1:0/3")  # not the holder: nothing changes
        assert role_a.holder().group == 2
        role_b.give_up(2, "10.0.0.2:0/2")
        assert (role_a.holder().group, role_a.holder().address) == (None, None)
    finally:
        a.close()
        b.close()


def test_three_gateways_racing_for_the_role_leave_one_holder(image: RbdImageSpec) -> None:
    gateways = contenders(image, 3)
    start = threading.Barrier(3)
    won: list[int] = []

    def race(group: int, role: OwnerRole) -> None:
        seen = role.holder()
        start.wait()  # every one read the role before any writes
        if role.take(group, f"10.0.0.{group}:0/{group}", seen):
            won.append(group)

    try:
        for _ in range(3):  # from no object, then twice from a record
            won.clear()
            threads = [
                threading.Thread(target=race, args=(group, role))
                for group, (_, role) in enumerate(gateways, 1)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert len(won) == 1, won
            holder = gateways[0][1].holder()
            assert (holder.group, holder.address) == (won[0], f"10.0.0.{won[0]}:0/{won[0]}")
    finally:
        for backend, _ in gateways:
            backend.close()


def test_a_record_an_earlier_version_kept_in_the_image_metadata_is_read(
    image: RbdImageSpec,
) -> None:
    backend = RbdBackend(image)
    try:
        backend.metadata_store(OWNER_KEY).save(b"2 10.0.0.2:0/7")
        role = OwnerRole(backend)
        seen = role.holder()
        assert seen == Holder(2, "10.0.0.2:0/7", None)
        assert role.take(1, "10.0.0.1:0/8", seen)  # the object is created
        assert (role.holder().group, role.holder().address) == (1, "10.0.0.1:0/8")
        assert not role.take(3, "10.0.0.3:0/9", seen)  # based on the metadata's record
    finally:
        backend.close()
