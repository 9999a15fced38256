"""What ``serve`` exports for VMs: one target per VM over guest views, raw views for ACLs
granting them, the demo VM of the no-config default, and the serve locks."""

from __future__ import annotations

import io
import struct
import threading
from pathlib import Path

from iscsi_vmtarget.scsi import Status
from iscsi_vmtarget.server.config import build_registry, demo_config
from iscsi_vmtarget.server.masking import Acl
from iscsi_vmtarget.server.registry import Registry
from iscsi_vmtarget.server.vm_luns import resize_live
from iscsi_vmtarget.vm import StateDir, VmManager
from iscsi_vmtarget.vm.format.header import Mode
from iscsi_vmtarget.vm.units.locks import is_served
from tests.vm.helpers import make_nexus, sense_triplet

MIB = 1 << 20
BASE = "iqn.2026-11.org.iscsi-vmtarget"
SECRET = b"EXPORT-STATE-SECRET-93"


def close(registry: Registry) -> None:
    for target in registry.targets.values():
        for lu in target.scsi.luns.values():
            lu.backend.close()
        for lu in (target.raw_luns or {}).values():
            lu.backend.close()


def test_demo_serve_provisions_vm_demo_once(tmp_path: Path) -> None:
    registry = build_registry(demo_config(str(tmp_path)))
    try:
        assert f"{BASE}:demo" in registry.targets  # the plain demo LUN stays
        demo = registry.targets[f"{BASE}:vm.demo"]
        assert demo.origin == "vm" and demo.scsi.luns[0].backend.size == 1 << 30
        naa = demo.scsi.luns[0].identity.naa
    finally:
        close(registry)
    again = build_registry(demo_config(str(tmp_path)))
    try:
        assert again.targets[f"{BASE}:vm.demo"].scsi.luns[0].identity.naa == naa
    finally:
        close(again)
    with VmManager(StateDir.at(str(tmp_path))) as manager:
        assert [vm.name for vm in manager.discover().vms] == ["demo"]


def test_vm_targets_guest_and_raw(tmp_path: Path) -> None:
    with VmManager(StateDir.at(str(tmp_path))) as manager:
        vm = manager.create(
            "web", disk=8 * MIB, memory=4 * MIB, secondaries=(4 * MIB,), mode=Mode.OFFSET
        )
        manager.write_state("web", io.BytesIO(SECRET * 100), len(SECRET) * 100)
    cfg = demo_config(str(tmp_path))
    cfg.demo_vm = False
    registry = build_registry(cfg)
    try:
        target = registry.targets[f"{BASE}:vm.web"]
        guest = target.scsi.luns
        assert {n: lu.backend.size for n, lu in guest.items()} == {0: 8 * MIB, 1: 4 * MIB}
        assert [guest[n].identity.naa for n in (0, 1)] == [u.header.naa for u in vm.units]
        assert all(is_served(str(tmp_path), u.header.unit_uuid) for u in vm.units)
        # VPD 0x83 of LUN 0 carries the unit's NAA (SPC-4 §7.8.6.6.5)
        nexus = make_nexus()
        target.scsi.nexus_added(nexus)
        target.scsi.execute(nexus, 0, bytes(6), None)
        page = target.scsi.execute(nexus, 0, struct.pack(">BBBHB", 0x12, 1, 0x83, 512, 0), None)
        assert page.status == Status.GOOD, sense_triplet(page)
        assert vm.base.header.naa in bytes(page.data_in)
        # an ACL granting the raw view: the whole unit, read-only, ciphertext only
        raw_acl = Acl("iqn.2026-11.org.example:backup", view="raw")
        backup = target.scsi_for_acl(raw_acl)
        raw = backup.luns[0]
        assert raw.backend.size == vm.base.header.unit_size and raw.write_protected
        assert raw.identity.naa != vm.base.header.naa
        assert SECRET not in bytes(raw.backend.read(0, raw.backend.size))
        backup.nexus_added(nexus)
        backup.execute(nexus, 0, bytes(6), None)
        write = struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 1, 0)
        refused = backup.execute(nexus, 0, write, memoryview(bytes(512)))
        assert sense_triplet(refused) == (0x7, 0x27, 0x00)  # DATA PROTECT, WRITE PROTECTED
    finally:
        close(registry)
    assert not any(is_served(str(tmp_path), u.header.unit_uuid) for u in vm.units)


def test_live_resize_of_an_exported_vm_under_guest_io(tmp_path: Path) -> None:
    """Resize an aligned VM while a thread keeps writing and reading guest LBA 0 (which
    lives in the GUEST_HEAD region the resize moves): no write is lost, no read sees
    the scrubbed old place, and the initiator gets CAPACITY DATA HAS CHANGED."""
    with VmManager(StateDir.at(str(tmp_path))) as manager:
        manager.create("web", disk=8 * MIB, memory=4 * MIB, mode=Mode.ALIGNED)
    cfg = demo_config(str(tmp_path))
    cfg.demo_vm = False
    registry = build_registry(cfg)
    target = registry.targets[f"{BASE}:vm.web"]
    nexus = make_nexus()
    target.scsi.nexus_added(nexus)
    target.scsi.execute(nexus, 0, bytes(6), None)
    view = target.scsi.luns[0].backend
    stop = threading.Event()
    errors: list[str] = []

    def guest_io() -> None:
        counter = 0
        while not stop.is_set():
            counter += 1
            block = counter.to_bytes(8, "big") * 64
            view.write(0, block)
            got = bytes(view.read(0, 512))
            if got != block:
                errors.append(f"wrote {counter}, read {got[:8].hex()}")
                return

    worker = threading.Thread(target=guest_io)
    worker.start()
    try:
        for size in (16 * MIB, 24 * MIB, 40 * MIB):
            resize_live(str(tmp_path), "web", target.disks or {}, target.raw_luns, disk=size)
    finally:
        stop.set()
        worker.join()
    try:
        assert not errors, errors
        assert view.size == 40 * MIB
        first = target.scsi.execute(nexus, 0, bytes(6), None)
        assert sense_triplet(first) == (0x6, 0x2A, 0x09)  # CAPACITY DATA HAS CHANGED
        assert target.raw_luns[0].backend.size == manager_unit_size(tmp_path, "web")
    finally:
        close(registry)


def manager_unit_size(state_dir: Path, name: str) -> int:
    with VmManager(StateDir.at(str(state_dir))) as manager:
        return manager.find(name).base.header.unit_size
