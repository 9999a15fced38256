"""Grants (server/grants.py): who may see a VM, kept with the VM under its base unit's
UUID in the managed configuration, resolved for every target derived from the VM -
deny by default, VM grants over default grants, allow-all explicit - and documents
written before grants existed keep their ACLs in force."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest

from iscsi_vmtarget.iscsi.directory import TargetEntry
from iscsi_vmtarget.scsi import ScsiTarget
from iscsi_vmtarget.server.admin import AdminError, Manager
from iscsi_vmtarget.server.config import vm_target
from iscsi_vmtarget.server.grants import effective_acls, migrate_overlays
from iscsi_vmtarget.server.masking import Acl, AclError
from iscsi_vmtarget.server.model import TargetSpec
from iscsi_vmtarget.server.persist import ConfigStore, ManagedConfig, PersistError, VmGrants, diff
from iscsi_vmtarget.server.registry import Registry, Target
from iscsi_vmtarget.server.runtime import Runtime
from iscsi_vmtarget.server.vm_luns import VmLuns, vm_of_target, vm_target_name
from iscsi_vmtarget.vm import StateDir, VmManager
from tests.server.test_masking_model import unit

GOOD = "iqn.2026-11.test:good"
OTHER = "iqn.2026-11.test:other"
HYPERVISOR = "iqn.2026-11.test:hypervisor"
STRANGER = "iqn.2026-11.test:evil"
WEB = uuid.UUID("11111111-2222-4333-8444-555555555555")
DB = uuid.UUID("66666666-7777-4888-9999-aaaaaaaaaaaa")


def config(*records: VmGrants, defaults: tuple[Acl, ...] = ()) -> ManagedConfig:
    cfg = ManagedConfig(default_grants=defaults)
    for record in records:
        cfg = cfg.with_vm(record)
    return cfg


# -- the document --------------------------------------------------------------------


def test_grants_round_trip_through_the_document() -> None:
    cfg = config(
        VmGrants(WEB, "web", False, (Acl(GOOD, view="raw", read_only=True),)),
        VmGrants(DB, "db", True),
        defaults=(Acl(HYPERVISOR, sources=("10.0.0.0/24",)),),
    )
    doc = json.loads(json.dumps(cfg.to_dict()))
    assert doc["vms"][1] == {
        "uuid": str(WEB),
        "name": "web",
        "allow_all": False,
        "grants": [{"initiator": GOOD, "read_only": True, "view": "raw"}],
    }
    assert doc["default_grants"] == [
        {"initiator": HYPERVISOR, "sources": ["10.0.0.0/24"], "read_only": False, "view": "guest"}
    ]
    assert ManagedConfig.from_dict(doc) == cfg


def test_a_document_from_before_grants_loads_with_none() -> None:
    old = {"version": 1, "portals": [], "targets": []}
    cfg = ManagedConfig.from_dict(old)
    assert cfg.vms == () and cfg.default_grants == ()


@pytest.mark.parametrize(
    ("vms", "message"),
    [
        ([{"uuid": "not-a-uuid", "grants": []}], "not a UUID"),
        (
            [{"uuid": str(WEB), "grants": [{"initiator": GOOD}, {"initiator": GOOD.upper()}]}],
            "two ACLs for one initiator",
        ),
        ([{"uuid": str(WEB)}, {"uuid": str(WEB)}], "defined twice"),
    ],
)
def test_bad_grants_are_refused_by_name(vms: list[object], message: str) -> None:
    with pytest.raises(PersistError, match=message):
        ManagedConfig.from_dict({"vms": vms})


def test_a_record_granting_nothing_is_not_kept_and_diff_names_the_vm() -> None:
    cfg = config(VmGrants(WEB, "web", False, (Acl(GOOD),)))
    empty = cfg.with_vm(VmGrants(WEB, "web"))
    assert empty.vms == ()
    assert diff(cfg, empty) == [f"- grant web {GOOD}"]
    assert diff(ManagedConfig(), config(defaults=(Acl(HYPERVISOR),))) == [
        f"+ default grant {HYPERVISOR}"
    ]


# -- resolution ----------------------------------------------------------------------


def test_vm_grants_add_to_defaults_and_replace_the_same_initiators() -> None:
    cfg = config(
        VmGrants(WEB, "web", False, (Acl(GOOD), Acl(HYPERVISOR, read_only=True))),
        defaults=(Acl(HYPERVISOR), Acl(OTHER)),
    )
    acls, allow_all = effective_acls(cfg, WEB)
    assert sorted(acls) == [GOOD, HYPERVISOR, OTHER] and not allow_all
    assert acls[HYPERVISOR].read_only  # the VM's own grant wins over the default
    db, _ = effective_acls(cfg, DB)  # a VM without grants: the defaults only
    assert sorted(db) == [HYPERVISOR, OTHER]
    assert effective_acls(cfg, None) == ({}, False)  # unknown VM: nobody


def test_a_vm_target_admits_nobody_until_granted() -> None:
    target = vm_target(VmLuns("web", {0: unit(0)}, vm_uuid=WEB))
    assert target.entry.deny_by_default and target.vm_uuid == WEB
    assert not target.entry.allows(GOOD) and not target.entry.allows(STRANGER)
    plain = TargetEntry("iqn.2026-11.test:plain")  # other targets keep their semantics
    assert plain.allows(STRANGER)


def _runtime(*luns: VmLuns) -> Runtime:
    registry = Registry()
    for vm in luns:
        registry.add_target(vm_target(vm))
    return Runtime(registry)


def test_one_grant_masks_every_export_of_the_vm_and_nothing_else() -> None:
    runtime = _runtime(
        VmLuns("web", {0: unit(0), 1: unit(1)}, vm_uuid=WEB),
        VmLuns("web.snap.s1", {0: unit(2)}, vm_uuid=WEB),
        VmLuns("db", {0: unit(3)}, vm_uuid=DB),
    )
    cfg = config(
        VmGrants(WEB, "web", False, (Acl(GOOD),)),
        VmGrants(DB, "db", False, (Acl(OTHER),)),
    )
    runtime.apply(ManagedConfig(), cfg)
    targets = {t.name.rsplit(":", 1)[1]: t for t in runtime.registry.targets.values()}
    for name in ("vm.web", "vm.web.snap.s1"):
        assert targets[name].entry.allows(GOOD)
        assert not targets[name].entry.allows(OTHER) and not targets[name].entry.allows(STRANGER)
    assert targets["vm.db"].entry.allows(OTHER) and not targets["vm.db"].entry.allows(GOOD)
    assert [e.name for e in runtime.registry.visible_to(STRANGER)] == []
    # the VM's allow-all follows it too; removing it closes every export again
    open_all = cfg.with_vm(VmGrants(WEB, "web", True, (Acl(GOOD),)))
    runtime.apply(cfg, open_all)
    assert targets["vm.web.snap.s1"].entry.allows(STRANGER)
    runtime.apply(open_all, cfg)
    assert not targets["vm.web.snap.s1"].entry.allows(STRANGER)


def test_a_derived_export_without_the_vms_identity_admits_nobody() -> None:
    runtime = _runtime(VmLuns("web.snap.s1", {0: unit(0)}))  # vm_uuid unset: fail closed
    runtime.apply(ManagedConfig(), config(defaults=(Acl(HYPERVISOR),)))
    (target,) = runtime.registry.targets.values()
    assert not target.entry.allows(HYPERVISOR)


def test_the_demo_vm_is_open_visibly_its_snapshots_are_not() -> None:
    registry = Registry()
    registry.add_target(vm_target(VmLuns("demo", {0: unit(0)}, vm_uuid=WEB), allow_all=True))
    registry.add_target(vm_target(VmLuns("demo.snap.s1", {0: unit(1)}, vm_uuid=WEB)))
    runtime = Runtime(registry)
    runtime.apply(ManagedConfig(), ManagedConfig())
    listed = {t["name"].rsplit(":", 1)[1]: t for t in runtime.targets()}
    assert listed["vm.demo"]["allow_all"] and not listed["vm.demo.snap.s1"]["allow_all"]
    assert [e.name.rsplit(":", 1)[1] for e in registry.visible_to(STRANGER)] == ["vm.demo"]


# -- migration -------------------------------------------------------------------------


def test_overlay_acls_of_a_vm_target_become_its_grants() -> None:
    own = vm_target_name("web").lower()
    snap = vm_target_name("web.snap.s1").lower()
    chap = Acl(OTHER).chap  # None: the overlay keeps only what is not an ACL
    old = ManagedConfig(
        targets=(
            TargetSpec(own, acls=(Acl(GOOD, luns=None), Acl(OTHER)), chap=chap),
            TargetSpec(snap, acls=(Acl(HYPERVISOR),)),
        ),
        vms=(VmGrants(WEB, "web", False, (Acl(OTHER, read_only=True),)),),
    )
    new, notes = migrate_overlays(old, {own: (WEB, "web")})
    assert notes == [f"ACLs of target {own} (2 initiators) are now grants of VM web"]
    record = new.vm(WEB)
    assert record is not None and [a.initiator for a in record.grants] == [GOOD, OTHER]
    assert record.grant(OTHER).read_only  # type: ignore[union-attr]  # the grant it had wins
    assert new.target(own) is None  # nothing left of that overlay
    assert new.target(snap) == old.target(snap)  # a snapshot's own overlay stays in force
    assert migrate_overlays(new, {own: (WEB, "web")}) == (new, [])  # once only


def test_serve_start_migrates_and_keeps_the_acls_in_force(tmp_path: Path) -> None:
    store = ConfigStore(str(tmp_path))
    own = vm_target_name("web")
    store.save(ManagedConfig(targets=(TargetSpec(own.lower(), acls=(Acl(GOOD),)),)))
    runtime = _runtime(
        VmLuns("web", {0: unit(0)}, vm_uuid=WEB), VmLuns("web.snap.s1", {0: unit(1)}, vm_uuid=WEB)
    )
    Manager(store, runtime).start()
    saved = store.load()
    assert saved.vm(WEB) is not None and saved.target(own) is None
    for target in runtime.registry.targets.values():  # the VM's and its snapshot's
        assert target.entry.allows(GOOD) and not target.entry.allows(STRANGER)


# -- operations on a state directory (offline) ----------------------------------------


def _execute(state: Path, op: str, args: dict[str, object]) -> dict[str, object]:
    return asyncio.run(Manager(ConfigStore(str(state))).execute(op, args))


def test_acl_add_on_any_target_of_a_vm_records_the_vms_grant(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with VmManager(StateDir.at(str(state))) as manager:
        vm = manager.create("web", disk=2 << 20, memory=1 << 20)
    key = vm.base.header.unit_uuid
    snap_target = vm_target_name("web.snap.s1")
    assert vm_of_target(snap_target) == "web"
    out = _execute(state, "acl.add", {"target": snap_target, "initiator": GOOD})
    assert out["changes"] == [f"+ grant web {GOOD}"]
    _execute(state, "acl.add", {"vm": "web", "initiator": OTHER, "view": "raw"})
    record = ConfigStore(str(state)).load().vm(key)
    assert record is not None and [a.initiator for a in record.grants] == [GOOD, OTHER]
    assert record.grant(OTHER).view == "raw"  # type: ignore[union-attr]
    listed = _execute(state, "acl.list", {})
    assert listed["vms"][0]["vm"] == "web"  # type: ignore[index]
    _execute(state, "acl.remove", {"vm": "web", "initiator": GOOD})
    with pytest.raises(AdminError, match=f"VM web has no grant for {GOOD}"):
        _execute(state, "acl.remove", {"vm": "web", "initiator": GOOD})
    with pytest.raises(AdminError, match="no VM named 'nope'"):
        _execute(state, "acl.add", {"vm": "nope", "initiator": GOOD})
    # the VM's allow-all through target set; a target of its own is untouched
    _execute(state, "target.set", {"name": vm_target_name("web"), "allow_all": True})
    assert ConfigStore(str(state)).load().vm(key).allow_all  # type: ignore[union-attr]


def test_default_grants_add_and_remove(tmp_path: Path) -> None:
    out = _execute(tmp_path, "acl.default.add", {"initiator": HYPERVISOR, "read_only": True})
    assert out["changes"] == [f"+ default grant {HYPERVISOR}"]
    assert ConfigStore(str(tmp_path)).load().default_grants[0].read_only
    _execute(tmp_path, "acl.default.remove", {"initiator": HYPERVISOR})
    with pytest.raises(AdminError, match="no default grant"):
        _execute(tmp_path, "acl.default.remove", {"initiator": HYPERVISOR})


def test_lifecycle_operations(tmp_path: Path) -> None:
    cfg_web = {"initiator": GOOD}
    _execute(tmp_path, "grant.set", {"uuid": str(WEB), "name": "web", "initiators": [GOOD]})
    _execute(tmp_path, "grant.copy", {"from": str(WEB), "to": str(DB), "name": "copy"})
    cfg = ConfigStore(str(tmp_path)).load()
    assert cfg.vm(DB) == VmGrants(DB, "copy", False, (Acl(**cfg_web),))
    _execute(tmp_path, "grant.drop", {"uuid": str(WEB)})
    assert ConfigStore(str(tmp_path)).load().vm(WEB) is None
    with pytest.raises(AdminError, match="granted twice"):
        _execute(tmp_path, "grant.set", {"uuid": str(WEB), "name": "w", "initiators": [GOOD] * 2})


def test_target_born_with_its_acl(tmp_path: Path) -> None:
    name = "iqn.2026-11.test:replica.web"
    _execute(tmp_path, "target.create", {"name": name, "acls": [{"initiator": GOOD}]})
    spec = ConfigStore(str(tmp_path)).load().target(name)
    assert spec is not None and [a.initiator for a in spec.acls] == [GOOD]
    with pytest.raises(AdminError):
        bad = {"name": "iqn.x:y", "acls": [{"initiator": "bad name"}]}
        _execute(tmp_path, "target.create", bad)


def test_unused_registry_targets_are_plain() -> None:
    """A managed or TOML target is no VM's: acl add on it stays a target ACL."""
    assert vm_of_target("iqn.2026-11.test:db") is None
    target = Target(TargetEntry("iqn.2026-11.test:db"), ScsiTarget({}))
    assert target.vm_uuid is None and not target.entry.deny_by_default
    with pytest.raises(AclError):
        Acl("not a name")
