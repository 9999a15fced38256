"""A replication site for the tests: a source VM manager with VM vm1, a destination
manager and a replica file, with the round and promote the tests run on them."""

from __future__ import annotations

from pathlib import Path

from iscsi_vmtarget.storage import FileBackend, create_sparse_file
from iscsi_vmtarget.vm import StateDir, VmManager
from iscsi_vmtarget.vm.format.crypto import load_key_file
from iscsi_vmtarget.vm.format.header import Mode
from iscsi_vmtarget.vm.operations import snapshot as snaps
from iscsi_vmtarget.vm.operations.promote import promote
from iscsi_vmtarget.vm.operations.replica import Superblock, read_superblock
from iscsi_vmtarget.vm.operations.replicate import (
    OfflineCheckpointer,
    replica_layout,
    replicate_round,
)

MIB = 1 << 20
URL = "iscsi://127.0.0.1:3260/iqn.2026-11.org.example:replica.vm1/0"


class Site:
    """A source state directory with VM vm1 (two disks, state) and a replica file."""

    def __init__(self, root: Path, mode: Mode = Mode.TRUNCATE) -> None:
        self.root = root
        self.src = VmManager(StateDir.at(str(root / "src")))
        self.dst = VmManager(StateDir.at(str(root / "dst")))
        self.src.create("vm1", disk=6 * MIB, memory=4 * MIB, secondaries=(3 * MIB,), mode=mode)
        self.replica = root / "vm1.replica"
        create_sparse_file(str(self.replica), replica_layout(self.src.find("vm1")).size_needed)

    def write(self, offset: int, data: bytes, lun: int = 0) -> None:
        backend = snaps.open_live(self.src, self.src.find("vm1"), lun)
        try:
            backend.write(offset, data)
            backend.flush()
        finally:
            backend.close()

    def image(self, manager: VmManager, lun: int) -> bytes:
        backend = snaps.open_live(manager, manager.find("vm1"), lun)
        try:
            return bytes(backend.read(0, backend.size))
        finally:
            backend.close()

    def images(self, manager: VmManager) -> list[bytes]:
        return [self.image(manager, lun) for lun in (0, 1)]

    def round(self) -> object:
        disk = FileBackend(str(self.replica))
        try:
            return replicate_round(
                self.src, "vm1", disk, OfflineCheckpointer(self.src, "vm1"), url=URL
            )
        finally:
            disk.close()

    def promote(self, *, source_key: bool = True) -> object:
        disk = FileBackend(str(self.replica))
        try:
            keys = [load_key_file(str(self.root / "src" / "master.key"))] if source_key else []
            return promote(self.dst, "vm1", disk, source_keys=keys)
        finally:
            disk.close()

    def close(self) -> None:
        self.src.close()
        self.dst.close()


def superblock(site: Site) -> Superblock:
    disk = FileBackend(str(site.replica))
    try:
        sb = read_superblock(disk)
    finally:
        disk.close()
    assert sb is not None
    return sb
