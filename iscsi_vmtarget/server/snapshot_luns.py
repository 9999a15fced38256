"""Exported snapshots: a read-only target per snapshot, for backup or an offline scan.

US 9,354,927: snapshots allow "activation of a virtual machine at different points in time
... for agent-less backup, offline virus scanning and other integrity checks".
``vm snapshot export NAME SNAP`` marks the snapshot in ``conf/snapshot-exports.json``
(replaced atomically), so every ``serve`` exports it, and a running daemon exports it
at once (its ``vm.snapshot.export`` admin action). The target is
``<base IQN>:vm.NAME.snap.SNAP``, LUN n the snapshot's image of the VM's LUN n, each
read-only and reporting the snapshot's own designator and serial (VPD 0x83/0x80,
SPC-4 §7.8.6, §7.8.16): a backup host may see it beside the live VM, and no initiator
is ever shown two LUNs with one identity. An ACL granting ``view = "raw"`` gets the
unit flattened at the snapshot instead (:func:`~.flat.snapshot_flat`), under a
designator derived from the snapshot's (never the live raw view's nor a guest's).
"""

from __future__ import annotations

import logging

from ..scsi import LogicalUnit, UnitIdentity
from ..storage.backend import BlockBackend
from ..vm.format.header import Role, UnitHeader
from ..vm.layers.flat import snapshot_flat
from ..vm.manager import VmManager
from ..vm.operations.export_marks import exported
from ..vm.operations.snapshot_tree import (
    find_snapshot,
    open_chain,
    snapshot_uuid,
)
from ..vm.units.scan import Discovery, FoundUnit, FoundVm
from ..vm.vm_errors import VmError
from .vm_luns import VmLuns, raw_identity_of, vm_target_name

log = logging.getLogger("iscsi_vmtarget")


def snapshot_identity(record: UnitHeader, volume_naa: bytes) -> UnitIdentity:
    """The snapshot's own designator and serial for one of its volumes (what a
    management or backup view of the snapshot reports, never a guest view)."""
    ident = snapshot_uuid(record, volume_naa)
    return UnitIdentity.from_uuid(ident, f"{ident.hex}")


def snapshot_target_suffix(name: str, snap: str) -> str:
    """``NAME.snap.SNAP`` with SNAP folded into IQN characters (RFC 3722)."""
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "-.") else "-" for c in snap.lower())
    return f"{name}.snap.{safe}"


def snapshot_target_name(name: str, snap: str) -> str:
    return vm_target_name(snapshot_target_suffix(name, snap))


def snapshot_luns(manager: VmManager, vm: FoundVm, snap: str) -> VmLuns:
    """The read-only LUNs of snapshot ``snap`` of ``vm`` (each a chain starting at the
    snapshot's layer of that volume), under the target name suffix."""
    luns = VmLuns(snapshot_target_suffix(vm.name, snap), vm_uuid=vm.base.header.unit_uuid)
    try:
        record = find_snapshot(manager, vm, manager.keyring(), snap)
        layers = dict(record.header.tops)
        for number, volume in vm.lun_map().items():
            layer = layers.get(volume.header.naa)
            if layer is None:  # a secondary disk added after the snapshot
                raise VmError(f"snapshot {snap!r} has no image of LUN {number}")
            chain = open_chain(manager, vm, volume, layer, read_only=True)
            luns.guest[number] = LogicalUnit(
                chain,
                snapshot_identity(record.header, volume.header.naa),
                block_size=volume.header.block_size,
                read_only=True,
            )
            luns.raw[number] = _raw_lun(manager, record, volume.header, chain)
    except BaseException:
        luns.close()
        raise
    return luns


def _raw_lun(
    manager: VmManager, record: FoundUnit, volume: UnitHeader, chain: BlockBackend
) -> LogicalUnit:
    """The raw view of one volume of the snapshot: the unit flattened at the snapshot
    (:func:`~.flat.snapshot_flat`; the base volume's sealed regions as the record holds
    them), with a designator of its own derived from the snapshot's, as
    :func:`~.vm_luns.raw_identity` derives the live raw view's from the unit's."""
    handle = None
    if volume.role is Role.BASE:
        handle = manager.catalog.get(record.pool).open(record.ref)
    return LogicalUnit(
        snapshot_flat(volume, handle, record.header, chain),
        raw_identity_of(snapshot_uuid(record.header, volume.naa)),
        block_size=volume.block_size,
        read_only=True,
    )


def open_exported(manager: VmManager, name: str, snap: str) -> VmLuns:
    """:func:`snapshot_luns` of VM ``name`` (a daemon exporting a snapshot live)."""
    with manager.session(repair=False) as session:
        vm = session.find(name)
        return snapshot_luns(manager, vm, snap)


def serve_exported(manager: VmManager, found: Discovery) -> list[VmLuns]:
    """What ``serve`` exports of the marked snapshots (those it cannot: a warning)."""
    out: list[VmLuns] = []
    for name, snap in exported(manager.state.root):
        vm = found.find(name)
        if vm is None:
            log.warning("snapshot %s of VM %s not exported: no such VM", snap, name)
            continue
        try:
            out.append(snapshot_luns(manager, vm, snap))
        except VmError as exc:
            log.warning("snapshot %s of VM %s not exported: %s", snap, name, exc)
    return out
