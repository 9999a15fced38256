"""Fixtures for the VM layer tests: a manager in a temporary state directory."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from iscsi_vmtarget.testing.ceph import CephCluster
from iscsi_vmtarget.vm import StateDir, VmManager
from iscsi_vmtarget.vm.units.unit_pools import DEFAULT_POOL
from tests.vm.replica_site import Site


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def manager(state_dir: Path) -> Iterator[VmManager]:
    with VmManager(StateDir.at(str(state_dir))) as m:
        yield m


@pytest.fixture(params=["directory", "device", "rbd"])
def pool(request: pytest.FixtureRequest, manager: VmManager, tmp_path: Path) -> str:
    """The name of a pool of each kind in ``manager``, for tests that take it
    (``manager.create(..., pool=pool)``): the default directory pool, a device pool on
    a 256 MiB sparse file, and an rbd pool in a namespace of its own on the session's
    Ceph cluster (skipped, or failed in CI, without Ceph: tests/conftest.py)."""
    if request.param == "directory":
        return DEFAULT_POOL
    if request.param == "device":
        return manager.catalog.create_device("dev", str(tmp_path / "device.img"), 256 << 20).name
    cluster: CephCluster = request.getfixturevalue("ceph_cluster")
    namespace = f"{cluster.pool}/t{uuid.uuid4().hex[:12]}"
    cluster.rbd("namespace", "create", namespace)
    return manager.catalog.create_rbd("ceph", namespace, cluster.conf).name


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    """A replication site (:class:`tests.vm.replica_site.Site`), closed afterwards."""
    s = Site(tmp_path)
    yield s
    s.close()
