"""A VM whose units live in an rbd pool (``pool create --rbd``), served by the real
daemon to real clients against the session's Ceph cluster: the guest sees exactly
its disk, never the sealed state, and a live resize through the daemon reaches the
images; the VM is found again by scanning the pool from another state directory."""

from __future__ import annotations

import io
import re
import uuid
from pathlib import Path

import pytest

from iscsi_vmtarget.server.vm_luns import DEFAULT_BASE_IQN
from iscsi_vmtarget.storage.rbd import RbdPoolSpec, list_images
from iscsi_vmtarget.testing.ceph import CephCluster
from iscsi_vmtarget.vm import Mode, StateDir, VmManager
from tests.conftest import INITIATOR, grant_vms, host_naa_matches, run_tool, start_target
from tests.integration.test_conformance import run_family
from tests.integration.test_vm_serve import ivt

pytestmark = pytest.mark.interop

MIB = 1 << 20
DISK = 24 * MIB
STATE = b"RBD-VM-STATE-PATTERN-93d1" * 2048


def capacity(url: str) -> int:
    out = run_tool("iscsi-readcapacity16", "-i", INITIATOR, url).stdout
    m = re.search(r"^Total size:(\d+)$", out, re.MULTILINE)
    assert m, out
    return int(m.group(1))


def test_vm_on_rbd_pool_served_resized_and_found_again(
    ceph_cluster: CephCluster, tmp_path: Path
) -> None:
    namespace = f"{ceph_cluster.pool}/vm{uuid.uuid4().hex[:10]}"
    ceph_cluster.rbd("namespace", "create", namespace)
    state = tmp_path / "state"
    conf = ceph_cluster.conf
    proc = ivt(state, "pool", "create", "ceph", "--rbd", namespace, "--ceph-conf", conf)
    assert f"created rbd pool ceph at rbd:{namespace}" in proc.stdout
    with VmManager(StateDir.at(str(state))) as manager:
        vm = manager.create("web", disk=DISK, memory=8 * MIB, mode=Mode.OFFSET, pool="ceph")
        manager.write_state("web", io.BytesIO(STATE), len(STATE))
        naa = vm.base.header.naa
    images = list_images(RbdPoolSpec.parse(namespace, conf=ceph_cluster.conf))
    assert images == [f"{vm.base.header.unit_uuid}.unit"]  # one image per unit, no leftovers
    grant_vms(state)
    target = start_target(tmp_path / "run", "--state-dir", str(state))
    url = target.url(f"{DEFAULT_BASE_IQN}:vm.web")
    try:
        assert capacity(url) == DISK
        inq = run_tool("iscsi-inq", "-i", INITIATOR, "-e", "1", "-c", "131", url).stdout
        assert host_naa_matches(inq.encode("latin-1"), naa), (naa.hex(), inq)
        raw = tmp_path / "web.raw"
        run_tool("qemu-img", "convert", "-O", "raw", url, str(raw), timeout=240)
        assert raw.stat().st_size == DISK and STATE[:25] not in raw.read_bytes()
        run_family(url, "Read16.BeyondEol")
        run_family(url, "Write16.BeyondEol")
        proc = ivt(state, "vm", "resize", "web", "--disk", str(2 * DISK))
        assert capacity(url) == 2 * DISK
    finally:
        target.stop()
    # another gateway's state directory finds the VM by scanning the pool alone
    other = tmp_path / "other"
    with VmManager(StateDir.at(str(other))) as manager:
        manager.catalog.create_rbd("shared", namespace, ceph_cluster.conf)
        found = manager.discover()
        assert [v.name for v in found.vms] == ["web"]
        assert found.vms[0].base.header.disk_size == 2 * DISK
