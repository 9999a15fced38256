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
from ..vm import StateDir, VmError, VmLuns, VmManager
from ..vm.errors import KeyFileError
from ..vm.format import RegionKind
from ..vm.region_backend import RegionBlockBackend

STATE_LUN: Final = 254
CONFIG_LUN: Final = 255
REGION_LUNS: Final = {STATE_LUN: RegionKind.STATE, CONFIG_LUN: RegionKind.CONFIG}
log = logging.getLogger("iscsi_vmtarget")


def region_identity(unit_uuid: uuid.UUID, kind: RegionKind) -> UnitIdentity:
    """The designator and serial of a region's LUN: its own, stable across restarts."""
    label = kind.name.lower()
    return UnitIdentity.from_uuid(uuid.uuid5(unit_uuid, label), f"{unit_uuid.hex}-{label}")


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
            pool = manager.catalog.get(vm.base.pool)
            try:
                for number, kind in REGION_LUNS.items():
                    backend = RegionBlockBackend(pool, vm.base.ref, kind, keyring)
                    luns.regions[number] = LogicalUnit(
                        backend, region_identity(vm.base.header.unit_uuid, kind)
                    )
            except (VmError, KeyFileError) as exc:
                log.warning("VM %s: no hypervisor view: %s", vm.name, exc)
                for lu in luns.regions.values():
                    lu.backend.close()
                luns.regions.clear()
