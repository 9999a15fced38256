"""A VM disk on an rbd pool is served like an RBD LUN: every layer over the pool's
image (guest view, snapshot chain, raw view, sealed region) says its I/O is a network
round trip, so the SCSI layer sends its commands to worker threads instead of waiting
for RADOS on the event loop; on a directory or device pool it stays inline."""

from __future__ import annotations

from iscsi_vmtarget.scsi import LogicalUnit, ScsiTarget, UnitIdentity
from iscsi_vmtarget.storage.backend import Abilities
from iscsi_vmtarget.vm import VmManager
from iscsi_vmtarget.vm.format.header import RegionKind
from iscsi_vmtarget.vm.layers.region_backend import RegionBlockBackend
from iscsi_vmtarget.vm.operations import snapshot as snaps

MIB = 1 << 20
READ_10 = bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0])


def test_layers_over_an_rbd_image_are_remote(manager: VmManager, pool: str) -> None:
    remote = pool not in ("default", "dev")
    manager.create("far", disk=4 * MIB, memory=MIB, pool=pool)
    vm = manager.find("far")
    unit = manager.open_unit(vm.base)
    backends = [unit.guest_view(), unit.raw_view()]
    unit.close()
    backends.append(
        RegionBlockBackend(
            manager.catalog.get(vm.base.pool), vm.base.ref, RegionKind.STATE, manager.keyring()
        )
    )
    snaps.create_snapshot(manager, "far", "s1")
    backends.append(snaps.open_live(manager, manager.find("far")))  # through the chain
    try:
        assert type(backends[-1]).__name__ == "ChainBackend"
        assert [Abilities.of(b).remote for b in backends] == [remote] * 4
        lu = LogicalUnit(backends[0], UnitIdentity.from_uuid(vm.base.header.unit_uuid, "far"))
        assert ScsiTarget({0: lu}).may_block(READ_10, 0) is remote
    finally:
        for backend in backends:
            backend.close()
