"""Grants: who may see a VM, kept with the VM and applied to every export derived from it.

A VM's targets - its own ``<base>:vm.NAME``, each exported snapshot
``<base>:vm.NAME.snap.SNAP``, any later export built from the VM's LUNs - admit no
initiator until one is granted (LIO refuses every login to a TPG until a NodeACL
exists, generate_node_acls=0; tgt until ``bind``). A grant is an
:class:`~.acl.Acl` (initiator, sources, CHAP, view, read-only, LUN map) stored in the
managed configuration under the VM's identity, the base unit's UUID
(:class:`~.persist.VmGrants`): snapshot, revert, resize and move keep that UUID, so
the grant follows the VM. ``default_grants`` apply to every VM of the state
directory (the hypervisor hosts that may see them all).

What one VM-derived target admits is decided in one place,
:func:`effective_acls` (called by :meth:`.runtime.Runtime.set_access` for every target
whose ``vm_uuid`` is set): the default grants, then the VM's own grants (a VM grant of
the same initiator replaces the default one), and the VM's ``allow_all``. The
operations here (``grant.*``, ``acl.default.*`` and the VM side of ``acl.add``/
``acl.remove``/``target.set``) change only the document; the daemon applies it live
(sessions that lose access are logged out) or the next ``serve`` does.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from ..iscsi.directory import ChapSecret
from .masking import Acl, AclError, MappedLun, chap_from_dict
from .persist import ManagedConfig, VmGrants

Args = dict[str, Any]


# -- resolution --------------------------------------------------------------------------


def effective_acls(cfg: ManagedConfig, vm_uuid: uuid.UUID | None) -> tuple[dict[str, Acl], bool]:
    """The ACLs (by initiator) and allow-all a target derived from VM ``vm_uuid``
    gets from the grants: none at all for a target whose VM is unknown (fail closed)."""
    if vm_uuid is None:
        return {}, False
    acls = {a.key: a for a in cfg.default_grants}
    record = cfg.vm(vm_uuid)
    if record is None:
        return acls, False
    acls.update({a.key: a for a in record.grants})
    return acls, record.allow_all


def migrate_overlays(
    cfg: ManagedConfig, vm_targets: Mapping[str, tuple[uuid.UUID, str]]
) -> tuple[ManagedConfig, list[str]]:
    """Move the ACLs and allow-all of overlay entries on VM targets (``acl add
    <base>:vm.NAME ...`` before grants existed) into the VM's grants, so they stay in
    force for the VM and now also mask its other exports. ``vm_targets``: each VM's own
    target name (lowercased) -> (its UUID, its name). A grant the VM already has for an
    initiator wins over the old overlay ACL. Returns the new document and one line per
    target moved."""
    notes: list[str] = []
    for spec in cfg.targets:
        identity = vm_targets.get(spec.key)
        if identity is None or spec.luns or not (spec.acls or spec.allow_all):
            continue
        key, name = identity
        record = cfg.vm(key) or VmGrants(key, name)
        mine = {a.key for a in record.grants}
        moved = tuple(a for a in spec.acls if a.key not in mine)
        record = replace(
            record,
            name=name,
            allow_all=record.allow_all or spec.allow_all,
            grants=_sorted((*record.grants, *moved)),
        )
        cfg = cfg.with_vm(record)
        rest = replace(spec, acls=(), allow_all=False)
        if rest.chap is None and rest.mutual_chap is None and rest.alias is None:
            cfg = cfg.without_target(spec.key)  # nothing left of the overlay
        else:
            cfg = cfg.with_target(rest)
        notes.append(
            f"ACLs of target {spec.name} ({len(spec.acls)} initiators"
            + (", allow-all" if spec.allow_all else "")
            + f") are now grants of VM {name}"
        )
    return cfg, notes


# -- building a grant from a request ------------------------------------------------------


def chap_arg(args: Args, prefix: str, where: str) -> ChapSecret | None:
    """``<prefix>_user``/``<prefix>_secret`` of a request: both or neither."""
    user, secret = args.get(f"{prefix}_user"), args.get(f"{prefix}_secret")
    if user is None and secret is None:
        return None
    if not user or not secret:
        raise AclError(f"{where}: give both --{prefix.replace('_', '-')}-user and -secret")
    return chap_from_dict({"user": user, "secret": secret}, where)


def acl_from_args(args: Args, where: str, target_chap: ChapSecret | None = None) -> Acl:
    """The ACL an ``acl add`` request describes: initiator, ``luns`` (mapped LUN
    dicts, None = every LUN), ``sources``, ``read_only``, ``view`` (both also applied
    to each mapped LUN) and CHAP (``chap_*``, ``mutual_*``)."""
    luns = args.get("luns")
    chap = chap_arg(args, "chap", where)
    mutual = chap_arg(args, "mutual", where)
    if mutual is not None and chap is None and target_chap is None:
        raise AclError(f"{where}: mutual CHAP needs CHAP (--chap-user/--chap-secret)")
    acl = Acl(
        initiator=str(args["initiator"]),
        sources=tuple(args.get("sources") or ()),
        luns=None if luns is None else tuple(MappedLun.from_dict(m) for m in luns),
        chap=chap,
        mutual_chap=mutual,
        read_only=bool(args.get("read_only", False)),
        view=str(args.get("view") or "guest"),
    )
    if luns is not None and (args.get("read_only") or args.get("view")):
        acl = replace(
            acl,
            luns=tuple(
                replace(
                    m,
                    read_only=m.read_only or bool(args.get("read_only")),
                    view=str(args.get("view") or m.view),
                )
                for m in acl.luns or ()
            ),
        )
    return acl


def _sorted(acls: tuple[Acl, ...] | list[Acl]) -> tuple[Acl, ...]:
    return tuple(sorted(acls, key=lambda a: a.key))


def _with_acl(acls: tuple[Acl, ...], acl: Acl) -> tuple[Acl, ...]:
    return _sorted([a for a in acls if a.key != acl.key] + [acl])


def _record(cfg: ManagedConfig, args: Args) -> VmGrants:
    """The grants of the VM a request names (``vm_uuid``, ``vm_name``: the manager
    resolved them, :meth:`.admin.Manager.execute`); an empty record if it has none."""
    key = uuid.UUID(str(args["vm_uuid"]))
    name = str(args["vm_name"])
    record = cfg.vm(key)
    return VmGrants(key, name) if record is None else replace(record, name=name)


# -- operations -------------------------------------------------------------------------


def grant_add(cfg: ManagedConfig, args: Args) -> ManagedConfig:
    """``acl add --vm NAME INITIATOR ...`` (or ``acl add <VM-derived target> ...``):
    add the VM's grant, or replace the one of that initiator."""
    record = _record(cfg, args)
    acl = acl_from_args(args, f"grant {args['initiator']} of VM {record.name}")
    return cfg.with_vm(replace(record, grants=_with_acl(record.grants, acl)))


def grant_remove(cfg: ManagedConfig, args: Args) -> ManagedConfig:
    """``acl remove --vm NAME INITIATOR``: the VM's sessions of that initiator are
    logged out (unless a default grant still admits it)."""
    record = _record(cfg, args)
    initiator = str(args["initiator"]).lower()
    if record.grant(initiator) is None:
        default = any(a.key == initiator for a in cfg.default_grants)
        hint = "; it is a default grant: 'acl default remove'" if default else ""
        raise AclError(f"VM {record.name} has no grant for {args['initiator']}{hint}")
    kept = tuple(a for a in record.grants if a.key != initiator)
    return cfg.with_vm(replace(record, grants=kept))


def vm_allow_all(cfg: ManagedConfig, args: Args, allow_all: bool) -> ManagedConfig:
    """``target set <VM target> --allow-all|--deny-unknown``: any initiator may see
    the VM (every export of it), or only those granted."""
    return cfg.with_vm(replace(_record(cfg, args), allow_all=allow_all))


def default_add(cfg: ManagedConfig, args: Args) -> ManagedConfig:
    """``acl default add INITIATOR ...``: a grant on every VM of the state directory."""
    acl = acl_from_args(args, f"default grant {args['initiator']}")
    return replace(cfg, default_grants=_with_acl(cfg.default_grants, acl))


def default_remove(cfg: ManagedConfig, args: Args) -> ManagedConfig:
    initiator = str(args["initiator"]).lower()
    kept = tuple(a for a in cfg.default_grants if a.key != initiator)
    if len(kept) == len(cfg.default_grants):
        raise AclError(f"no default grant for {args['initiator']}")
    return replace(cfg, default_grants=kept)


def grant_copy(cfg: ManagedConfig, args: Args) -> ManagedConfig:
    """A clone starts with its source's grants: VM ``from`` -> VM ``to``/``name``."""
    source = cfg.vm(uuid.UUID(str(args["from"])))
    key = uuid.UUID(str(args["to"]))
    if source is None:
        return cfg.with_vm(VmGrants(key, str(args["name"])))
    return cfg.with_vm(replace(source, uuid=key, name=str(args["name"])))


def grant_set(cfg: ManagedConfig, args: Args) -> ManagedConfig:
    """The VM's grants become exactly ``initiators`` (plain grants: guest view, every
    LUN), allow-all off: a promoted replica starts with these only."""
    key = uuid.UUID(str(args["uuid"]))
    acls = [Acl(str(i)) for i in args.get("initiators") or ()]
    if len({a.key for a in acls}) != len(acls):
        raise AclError("an initiator is granted twice")
    return cfg.with_vm(VmGrants(key, str(args["name"]), False, _sorted(acls)))


def grant_drop(cfg: ManagedConfig, args: Args) -> ManagedConfig:
    """A deleted VM's grants go with it."""
    key = uuid.UUID(str(args["uuid"]))
    return replace(cfg, vms=tuple(v for v in cfg.vms if v.uuid != key))


# -- reports ------------------------------------------------------------------------------


def summary(acl: Acl) -> dict[str, Any]:
    """An ACL for display: its dict with CHAP user names instead of secrets."""
    out = acl.to_dict()
    out["chap"] = acl.chap.user if acl.chap else None
    out["mutual_chap"] = acl.mutual_chap.user if acl.mutual_chap else None
    return out


def report(cfg: ManagedConfig, vm_uuid: uuid.UUID | None = None) -> dict[str, Any]:
    """``acl list``'s VM part: each VM's grants (with its name) and the defaults."""
    return {
        "vms": [
            {
                "vm": v.name,
                "uuid": str(v.uuid),
                "allow_all": v.allow_all,
                "grants": [summary(a) for a in v.grants],
            }
            for v in cfg.vms
            if vm_uuid is None or v.uuid == vm_uuid
        ],
        "default_grants": [summary(a) for a in cfg.default_grants],
    }
