"""The hypervisor view: a VM's state and config regions as LUNs of its target (issue 14).

The hidden regions exist for the virtualization layer (US 9,354,927): the hypervisor
host keeps the VM's execution state and virtual hardware configuration beside its
disk, where the guest cannot reach them. An ACL (or grant) with ``view = "hypervisor"``
shows that host the VM's guest disks as usual plus two more LUNs:

* LUN :data:`STATE_LUN` (254): the state region, LUN :data:`CONFIG_LUN` (255): the
  config region - fixed numbers, far above the disks (LUN 0 and the secondaries), so a
  client finds them whatever disks the VM has;
* reads return plaintext, writes are sealed (AES-256-GCM per 64 KiB chunk, the unit's
  data key) and atomic per chunk (:mod:`iscsi_vmtarget.vm.sealed_blocks`); the last
  4 KiB is the stream descriptor recording the image length
  (:mod:`iscsi_vmtarget.vm.region_backend`);
* each has its own NAA designator (VPD 0x83) and serial (VPD 0x80), derived from the
  unit UUID, never the disk's (SPC-4 §7.8.6: another logical unit);
* READ CAPACITY reports the region's block capacity + 4 KiB; past it the SCSI layer
  answers LOGICAL BLOCK ADDRESS OUT OF RANGE (SBC-3 §4.5).

A guest view, a raw view, an initiator without an ACL (allow-all) and every snapshot
export never get them (:func:`.masking.build_lun_map`).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from typing import Final

from ..scsi import LogicalUnit, UnitIdentity
from ..storage.backend import BackendError
from ..vm import FoundVm, StateDir, VmError, VmManager
from ..vm.format.crypto import Keyring
from ..vm.format.header import RegionKind
from ..vm.layers.region_backend import RegionBlockBackend
from ..vm.vm_errors import KeyFileError
from .vm_luns import VmLuns

STATE_LUN: Final = 254
CONFIG_LUN: Final = 255
REGION_LUNS: Final = {STATE_LUN: RegionKind.STATE, CONFIG_LUN: RegionKind.CONFIG}
log = logging.getLogger("iscsi_vmtarget")


def region_identity(unit_uuid: uuid.UUID, kind: RegionKind) -> UnitIdentity:
    """The designator and serial of a region's LUN: its own, stable across restarts."""
    label = kind.name.lower()
    return UnitIdentity.from_uuid(uuid.uuid5(unit_uuid, label), f"{unit_uuid.hex}-{label}")


def _open_regions(
    manager: VmManager, vm: FoundVm, keyring: Keyring
) -> dict[int, RegionBlockBackend]:
    """The state and config block devices of ``vm``'s base unit, by LUN number."""
    pool = manager.catalog.get(vm.base.pool)
    out: dict[int, RegionBlockBackend] = {}
    try:
        for number, kind in REGION_LUNS.items():
            out[number] = RegionBlockBackend(pool, vm.base.ref, kind, keyring)
    except BaseException:
        for backend in out.values():
            backend.close()
        raise
    return out


def rebind_regions(
    state_dir: str, regions: dict[int, LogicalUnit], name: str, key_file: str | None = None
) -> None:
    """Point a VM's region LUNs at its base unit where it is now (after a live move to
    another pool; capacity changes are announced). Writes pushed during the move itself
    may land in the old copy: suspend a VM into its unit before or after a move."""
    if not regions:
        return
    with VmManager(StateDir.at(state_dir, key_file)) as manager:
        fresh = _open_regions(manager, manager.find(name), manager.keyring())
    for number, lu in regions.items():
        old = lu.backend
        lu.replace_backend(fresh[number])
        lu.check_capacity()
        old.close()


def attach_regions(state_dir: str, exports: Iterable[VmLuns], key_file: str | None = None) -> None:
    """Open the state and config LUNs of every VM's own export in ``exports`` (not of
    snapshot exports: their name holds a dot) into its ``regions``. A VM whose data key
    cannot be unwrapped (no key file here) gets none; it is logged."""
    wanted = [luns for luns in exports if luns.vm_uuid is not None and "." not in luns.name]
    if not wanted:
        return
    with VmManager(StateDir.at(state_dir, key_file)) as manager:
        found = manager.discover(repair=False)
        bases = {vm.base.header.unit_uuid: vm for vm in found.vms}
        try:
            keyring = manager.keyring()
        except KeyFileError as exc:
            log.warning("no hypervisor views: %s", exc)
            return
        for luns in wanted:
            vm = bases.get(luns.vm_uuid)  # type: ignore[arg-type]
            if vm is None:
                continue
            try:
                backends = _open_regions(manager, vm, keyring)
            except (VmError, KeyFileError, BackendError) as exc:
                log.warning("VM %s: no hypervisor view: %s", vm.name, exc)
                continue
            unit_uuid = vm.base.header.unit_uuid
            for number, backend in backends.items():
                identity = region_identity(unit_uuid, REGION_LUNS[number])
                luns.regions[number] = LogicalUnit(backend, identity)
