"""The management operations: each turns the managed configuration into a new one.

Every command that changes configuration is one operation (``target.create``,
``acl.add``, ...) in the table :data:`OPERATIONS`: a function ``(current document,
request args, runtime or None) -> new document``
(:class:`~.persist.ManagedConfig`). It checks and refuses (:class:`~.runtime.AdminError`)
but changes nothing itself: the :class:`~.admin.Manager` computes the difference,
applies it to the daemon's :class:`~.runtime.Runtime` when one runs, and saves the
document. Grants of VMs (``vm_uuid`` in the args) are kept by :mod:`.grants`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from . import grants
from .masking import check_mutual
from .model import LunSpec, TargetSpec, parse_portal
from .persist import ManagedConfig, PersistError
from .runtime import AdminError, Args, Runtime

Transform = Callable[[ManagedConfig, Args, "Runtime | None"], ManagedConfig]


def _need_target(cfg: ManagedConfig, name: str, runtime: Runtime | None) -> TargetSpec:
    """The spec of ``name``; for a target defined elsewhere, an empty overlay."""
    spec = cfg.target(name)
    if spec is not None:
        return spec
    if runtime is not None and name.lower() in runtime.static:
        return TargetSpec(runtime.registry.targets[name.lower()].name)
    raise AdminError(f"no target {name}")


def op_target_create(cfg: ManagedConfig, args: Args, runtime: Runtime | None) -> ManagedConfig:
    name = str(args["name"])
    if cfg.target(name) is not None or (runtime is not None and name.lower() in runtime.static):
        raise AdminError(f"target {name} exists")
    spec = TargetSpec.from_dict(
        {
            "name": name,
            "alias": args.get("alias"),
            "tpgt": args.get("tpgt", 1),
            "allow_all": args.get("allow_all", False),
            # born with its ACLs: never open, not even between two requests
            "acls": list(args.get("acls") or ()),
        }
    )
    return cfg.with_target(spec)


def op_target_delete(cfg: ManagedConfig, args: Args, runtime: Runtime | None) -> ManagedConfig:
    name = str(args["name"])
    if cfg.target(name) is None:
        if runtime is not None and name.lower() in runtime.static:
            raise AdminError(f"target {name} is defined by the serve configuration or a VM pool")
        raise AdminError(f"no target {name}")
    return cfg.without_target(name)


def op_target_set(cfg: ManagedConfig, args: Args, runtime: Runtime | None) -> ManagedConfig:
    if "vm_uuid" in args and args.get("allow_all") is not None:  # the VM's, every export
        cfg = grants.vm_allow_all(cfg, args, bool(args["allow_all"]))
        args = {**args, "allow_all": None}
        if not any(args.get(k) for k in ("alias", "no_chap", *CHAP_KEYS)):
            return cfg
    spec = _need_target(cfg, str(args["name"]), runtime)
    where = f"target {spec.name}"
    changes: dict[str, Any] = {}
    if args.get("allow_all") is not None:
        changes["allow_all"] = bool(args["allow_all"])
    if args.get("alias") is not None:
        changes["alias"] = str(args["alias"])
    if args.get("no_chap"):
        changes["chap"] = changes["mutual_chap"] = None
    chap = grants.chap_arg(args, "chap", where)
    mutual = grants.chap_arg(args, "mutual", where)
    if chap is not None:
        changes["chap"] = chap
    if mutual is not None:
        changes["mutual_chap"] = mutual
    spec = replace(spec, **changes)
    if spec.mutual_chap is not None and spec.chap is None:
        raise AdminError(f"{where}: mutual CHAP needs CHAP")
    check_mutual(spec.chap, spec.mutual_chap, where)
    return cfg.with_target(spec)


def op_lun_map(cfg: ManagedConfig, args: Args, runtime: Runtime | None) -> ManagedConfig:
    spec = _need_target(cfg, str(args["target"]), runtime)
    keys = (
        "number",
        "path",
        "rbd",
        "ceph_conf",
        "ceph_id",
        "alua_non_owner",
        "size",
        "read_only",
        "block_size",
    )
    doc = {k: args[k] for k in keys if k in args}
    lun = LunSpec.from_dict(doc, os.getcwd())
    if spec.lun(lun.number) is not None:
        raise AdminError(f"target {spec.name} already has LUN {lun.number}")
    luns = tuple(sorted([*spec.luns, lun], key=lambda x: x.number))
    return cfg.with_target(replace(spec, luns=luns))


def op_lun_unmap(cfg: ManagedConfig, args: Args, runtime: Runtime | None) -> ManagedConfig:
    spec = _need_target(cfg, str(args["target"]), runtime)
    number = int(args["number"])
    if spec.lun(number) is None:
        raise AdminError(f"target {spec.name} has no managed LUN {number}")
    return cfg.with_target(replace(spec, luns=tuple(x for x in spec.luns if x.number != number)))


def op_acl_add(cfg: ManagedConfig, args: Args, runtime: Runtime | None) -> ManagedConfig:
    """Add the ACL, or replace the one of that initiator (``acl add`` is idempotent).
    On a target derived from a VM (or with ``vm``), the VM's grant (:mod:`.grants`)."""
    if "vm_uuid" in args:
        return grants.grant_add(cfg, args)
    spec = _need_target(cfg, str(args["target"]), runtime)
    acl = grants.acl_from_args(args, f"ACL {args['initiator']} of {spec.name}", spec.chap)
    acls = [a for a in spec.acls if a.key != acl.key] + [acl]
    return cfg.with_target(replace(spec, acls=tuple(sorted(acls, key=lambda a: a.key))))


def op_acl_remove(cfg: ManagedConfig, args: Args, runtime: Runtime | None) -> ManagedConfig:
    spec = cfg.target(str(args["target"]))
    if "vm_uuid" in args and (spec is None or spec.acl(str(args["initiator"])) is None):
        return grants.grant_remove(cfg, args)  # else: an overlay ACL from before grants
    spec = _need_target(cfg, str(args["target"]), runtime)
    initiator = str(args["initiator"]).lower()
    if spec.acl(initiator) is None:
        static = runtime.static.get(spec.key) if runtime is not None else None
        if static is not None and initiator in static.acls:
            raise AdminError(
                f"the ACL of {args['initiator']} on {spec.name} is defined by the serve "
                "configuration; change it there"
            )
        raise AdminError(f"target {spec.name} has no ACL for {args['initiator']}")
    return cfg.with_target(replace(spec, acls=tuple(a for a in spec.acls if a.key != initiator)))


def op_portal_add(cfg: ManagedConfig, args: Args, runtime: Runtime | None) -> ManagedConfig:
    portal = parse_portal(str(args["listen"]), int(args.get("tpgt", 1)))
    if any((p.host, p.port) == (portal.host, portal.port) for p in cfg.portals):
        raise AdminError(f"portal {args['listen']} exists")
    return replace(cfg, portals=(*cfg.portals, portal))


def op_portal_remove(cfg: ManagedConfig, args: Args, runtime: Runtime | None) -> ManagedConfig:
    portal = parse_portal(str(args["listen"]))
    kept = tuple(p for p in cfg.portals if (p.host, p.port) != (portal.host, portal.port))
    if len(kept) == len(cfg.portals):
        raise AdminError(f"no portal {args['listen']}")
    return replace(cfg, portals=kept)


def op_config_apply(cfg: ManagedConfig, args: Args, runtime: Runtime | None) -> ManagedConfig:
    """The document replaces the configuration; one written before grants existed (no
    ``vms``/``default_grants`` keys) keeps the grants in force: none silently lost."""
    doc = args["document"]
    try:
        new = ManagedConfig.from_dict(doc, str(args.get("base", ".")))
    except (PersistError, ValueError) as exc:
        raise AdminError(f"configuration: {exc}") from exc
    if isinstance(doc, dict) and "vms" not in doc:
        new = replace(new, vms=cfg.vms)
    if isinstance(doc, dict) and "default_grants" not in doc:
        new = replace(new, default_grants=cfg.default_grants)
    return new


#: Operations that change the configuration.
OPERATIONS: dict[str, Transform] = {
    "target.create": op_target_create,
    "target.delete": op_target_delete,
    "target.set": op_target_set,
    "lun.map": op_lun_map,
    "lun.unmap": op_lun_unmap,
    "acl.add": op_acl_add,
    "acl.remove": op_acl_remove,
    "portal.add": op_portal_add,
    "portal.remove": op_portal_remove,
    "config.apply": op_config_apply,
    "acl.default.add": lambda cfg, args, _rt: grants.default_add(cfg, args),
    "acl.default.remove": lambda cfg, args, _rt: grants.default_remove(cfg, args),
    "grant.copy": lambda cfg, args, _rt: grants.grant_copy(cfg, args),
    "grant.set": lambda cfg, args, _rt: grants.grant_set(cfg, args),
    "grant.drop": lambda cfg, args, _rt: grants.grant_drop(cfg, args),
}
#: The request keys of CHAP secrets (``target set``, ``acl add``).
CHAP_KEYS = ("chap_user", "chap_secret", "mutual_user", "mutual_secret")
#: Operations that may name a VM (``vm``, or a ``target``/``name`` derived from one):
#: the manager adds its identity (``vm_uuid``, ``vm_name``) before the transform runs.
VM_OPERATIONS = {"acl.add": "target", "acl.remove": "target", "target.set": "name"}
#: Operations that only report.
QUERIES = ("target.list", "acl.list", "config.export", "status", "ping")
