"""Management: operations on the persisted configuration, applied live by the daemon.

Every management command is one operation (``target.create``, ``acl.add``, ...) in
the table :data:`OPERATIONS`. An operation turns the current
:class:`~.persist.ManagedConfig` into a new one; the :class:`Manager` then

1. computes the difference (:func:`~.persist.diff`, secrets never shown),
2. when a daemon runs, applies it to the live registry (:class:`Runtime`): new LUN
   backings are opened first (so a bad path fails before anything changes), then
   targets, LUNs and ACLs are swapped in; sessions whose access is gone are logged
   out, sessions whose LUN map changed get the new map, all others are untouched,
3. writes the document atomically (:class:`~.persist.ConfigStore`).

The daemon serves the operations on ``<state-dir>/admin.sock`` (a UNIX socket, mode
0600): one JSON object per line each way, ``{"op": ..., "args": {...}}`` ->
``{"ok": true, "result": {...}}`` or ``{"ok": false, "error": "..."}``, after
``{"progress": ...}`` lines when a long action was asked with ``"progress": true``
(:data:`PROGRESS_ARG`). Requests are handled one at a time on the event loop, so
concurrent commands never interleave.
Without a daemon, :func:`call` runs the same operation on the state directory's
files under an exclusive lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import IscsiVmtargetError
from ..iscsi.directory import ChapSecret, Portal, TargetEntry
from ..scsi import LogicalUnit, ScsiTarget
from ..vm.errors import VmError
from ..vm.lease import LeaseHeldError
from ..vm.lease_device import keeper as lease_keeper
from ..vm.locks import state_dir_holder
from . import grants
from .acl import Acl, AclError, check_mutual
from .grants import effective_acls, summary
from .persist import (
    ConfigStore,
    LunSpec,
    ManagedConfig,
    PersistError,
    TargetSpec,
    diff,
    redacted,
)
from .registry import Registry, Target

if TYPE_CHECKING:
    from ..vm.lease_device import LeaseKeeper
    from .portal import ConnectionHandler, TargetServer

log = logging.getLogger("iscsi_vmtarget")
_T = TypeVar("_T")
SOCKET_NAME = "admin.sock"
MAX_REQUEST = 1 << 20
#: The args key under which an action gets a ``progress(done, total)`` callback when
#: the request asked for progress (``"progress": true``); the daemon then sends
#: ``{"progress": {"done": D, "total": T}}`` lines before the reply.
PROGRESS_ARG = "progress_callback"


class AdminError(IscsiVmtargetError):
    """An operation refused; the message is for the operator."""


class DaemonNotRunning(IscsiVmtargetError):
    """No daemon answers on the admin socket."""


# ---------------------------------------------------------------------------------------
# The live side
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Policy:
    """What a target's own source (TOML file, demo, VM pool) says about access."""

    acls: dict[str, Acl]
    allow_all: bool
    chap: ChapSecret | None
    mutual_chap: ChapSecret | None


class Runtime:
    """The running daemon's registry and listeners, reconciled to a ManagedConfig."""

    def __init__(self, registry: Registry, server: TargetServer | None = None) -> None:
        self.registry = registry
        self.server = server
        # targets that exist without the managed configuration, and their own policy
        self.static: dict[str, _Policy] = {
            key: _Policy(dict(t.acls), t.allow_all, t.entry.chap, t.entry.mutual_chap)
            for key, t in registry.targets.items()
        }
        self.static_discovery = (registry.discovery_auth, registry.discovery_mutual)
        #: the daemon's event loop (set by :meth:`Manager.execute`): see :meth:`on_loop`
        self.loop: asyncio.AbstractEventLoop | None = None
        #: the unit leases of device-pool VMs (:mod:`.ownership`), for ``status``
        self.leases: LeaseKeeper | None = None

    def on_loop(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` on the event loop and wait for it: an action runs in an executor
        thread, but the registry and the sessions' transports belong to the loop."""
        loop = self.loop
        with contextlib.suppress(RuntimeError):
            if asyncio.get_running_loop() is loop:
                loop = None
        if loop is None:
            return fn()

        async def call() -> _T:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), loop).result()

    def add_pool_target(self, target: Target, cfg: ManagedConfig) -> None:
        """A target a VM pool defines, added while the daemon runs (an exported
        snapshot, a VM made meanwhile): static like those ``serve`` found; the VM's
        grants and the overlay ``cfg`` holds for it (ACLs, CHAP) apply
        (:meth:`set_access`). Call on the loop (:meth:`on_loop`)."""
        key = target.name.lower()
        self.registry.add_target(target)
        own = target.entry
        self.static[key] = _Policy(dict(target.acls), target.allow_all, own.chap, own.mutual_chap)
        spec = cfg.target(key)
        try:
            if spec is not None:
                self._apply_target(spec, None)
            self.set_access(key, cfg)
        except BaseException:  # e.g. an overlay ACL mapping one designator twice
            del self.static[key], self.registry.targets[key]
            raise
        log.info("target %s created", target.name)

    def set_access(self, key: str, cfg: ManagedConfig) -> None:
        """Who may log into the static target ``key`` and which LUNs each one sees: the
        one place that masks every target a VM pool or the serve configuration defines.

        Its source's ACLs and allow-all (TOML, the demo); for a target derived from a
        VM (``vm_uuid``: its own target, a snapshot export, any later export) the VM's
        grants and the default grants (:func:`.grants.effective_acls`; such a target
        is ``deny_by_default``); then the overlay entry ``cfg`` holds for its name (an
        ACL of the same initiator replaces the others). Sessions that lost access are
        logged out."""
        target = self.registry.targets[key]
        own = self.static[key]
        acls, allow_all = dict(own.acls), own.allow_all
        if target.vm_uuid is not None or target.entry.deny_by_default:
            granted, vm_all = effective_acls(cfg, target.vm_uuid)
            acls.update(granted)
            allow_all = allow_all or vm_all
        spec = cfg.target(key)
        if spec is not None:
            acls.update({a.key: a for a in spec.acls})
            allow_all = allow_all or spec.allow_all
        if acls == target.acls and allow_all == target.allow_all:
            return
        target.set_acls(acls, allow_all)
        self._refresh_sessions(target)

    def remove_pool_target(self, name: str) -> bool:
        """Remove such a target, logging its sessions out (as ``target delete`` does);
        False if it is not served. Call on the loop (:meth:`on_loop`)."""
        key = name.lower()
        if key not in self.registry.targets or key not in self.static:
            return False
        del self.static[key]
        self._remove_target(key)
        return True

    def check(self, cfg: ManagedConfig) -> None:
        """Refuse what cannot apply to this daemon (LUNs on a target defined elsewhere)."""
        for spec in cfg.targets:
            if spec.key in self.static and spec.luns:
                raise AdminError(
                    f"target {spec.name} is defined by the serve configuration or a VM "
                    "pool: its LUNs come from there"
                )

    def apply(self, old: ManagedConfig, new: ManagedConfig) -> None:
        """Make the live registry match ``new`` (it matched ``old``)."""
        self.check(new)
        registry = self.registry
        prepared = self._open_luns(old, new)
        wanted = {t.key: t for t in new.targets}
        for key in list(registry.targets):
            if key not in wanted and key not in self.static:
                self._remove_target(key)
        for key, policy in self.static.items():
            if key not in wanted and old.target(key) is not None and key in registry.targets:
                target = registry.targets[key]
                target.entry = replace(
                    target.entry, chap=policy.chap, mutual_chap=policy.mutual_chap
                )
                self._refresh_sessions(target)
        for spec in new.targets:
            self._apply_target(spec, prepared.get(spec.key))
        for key in self.static:
            if key in registry.targets:
                self.set_access(key, new)
        chap, mutual = self.static_discovery
        registry.discovery_auth = new.discovery_chap or chap
        registry.discovery_mutual = new.discovery_mutual_chap or mutual

    async def apply_portals(self, old: ManagedConfig, new: ManagedConfig) -> None:
        if self.server is None:
            return
        before = {(p.host, p.port) for p in old.portals}
        after = {(p.host, p.port) for p in new.portals}
        for p in new.portals:
            if (p.host, p.port) not in before and not self._listening(p):
                await self.server.add_portal(p)
        for host, port in before - after:
            await self.server.remove_portal(host, port)

    def _listening(self, p: Portal) -> bool:
        return any((q.host, q.port) == (p.host, p.port) for q in self.registry.portals)

    # -- pieces ----------------------------------------------------------------------------

    def _open_luns(
        self, old: ManagedConfig, new: ManagedConfig
    ) -> dict[str, dict[int, LogicalUnit]]:
        """The LUN set of every managed target in ``new``: units kept from the live
        target when their spec did not change, new ones opened now."""
        from .config import ConfigError, LunConfig, TargetConfig, _open_lun

        out: dict[str, dict[int, LogicalUnit]] = {}
        opened: list[LogicalUnit] = []
        try:
            for spec in new.targets:
                if spec.key in self.static:
                    continue
                live = self.registry.targets.get(spec.key)
                before = old.target(spec.key)
                units: dict[int, LogicalUnit] = {}
                for lun in spec.luns:
                    same = before is not None and before.lun(lun.number) == lun
                    if live is not None and same and lun.number in live.scsi.luns:
                        units[lun.number] = live.scsi.luns[lun.number]
                        continue
                    cfg = LunConfig(
                        lun.number,
                        lun.path,
                        lun.size,
                        lun.read_only,
                        lun.block_size,
                        lun.serial,
                    )
                    lu = _open_lun(TargetConfig(spec.name), cfg)
                    opened.append(lu)
                    units[lun.number] = lu
                out[spec.key] = units
        except ConfigError as exc:
            for lu in opened:
                lu.backend.close()
            raise AdminError(str(exc)) from exc
        return out

    def _apply_target(self, spec: TargetSpec, units: dict[int, LogicalUnit] | None) -> None:
        registry = self.registry
        target = registry.targets.get(spec.key)
        if spec.key in self.static:
            assert target is not None
            own = self.static[spec.key]
            target.entry = replace(
                target.entry,
                chap=spec.chap or own.chap,
                mutual_chap=spec.mutual_chap or own.mutual_chap,
            )
        elif target is None:
            entry = TargetEntry(
                spec.name, spec.alias, spec.tpgt, chap=spec.chap, mutual_chap=spec.mutual_chap
            )
            target = Target(entry, ScsiTarget(units or {}), origin="managed")
            registry.add_target(target)
            log.info("target %s created", spec.name)
        else:
            target.entry = replace(
                target.entry,
                alias=spec.alias,
                tpgt=spec.tpgt,
                chap=spec.chap,
                mutual_chap=spec.mutual_chap,
            )
            units = units or {}
            if dict(target.scsi.luns) != units:
                for n, lu in target.scsi.luns.items():
                    if units.get(n) is not lu:
                        lu.backend.close()
                target.set_luns(units)
        if spec.key in self.static:  # its ACLs: set_access, with the VM's grants
            self._refresh_sessions(target)
            return
        target.set_acls({a.key: a for a in spec.acls}, spec.allow_all)
        self._refresh_sessions(target)

    def _remove_target(self, key: str) -> None:
        registry = self.registry
        target = registry.targets.pop(key)
        for handler in registry.connections_of(key):
            handler.abort_session("target deleted")
        for lu in (*target.scsi.luns.values(), *(target.raw_luns or {}).values()):
            lu.backend.close()
        if self.server is not None:
            self.server.metrics.forget_target(key)
        log.info("target %s deleted", target.name)

    def _refresh_sessions(self, target: Target) -> None:
        """Log out sessions that lost access; give others their new LUN map."""
        for handler in self.registry.connections_of(target.name):
            if handler.nexus is None or handler.scsi is None:
                continue
            scsi = target.scsi_for(handler.nexus.initiator_name, handler.source)
            if scsi is None:
                log.info(
                    "access revoked: logging out %s from %s",
                    handler.nexus.initiator_name,
                    target.name,
                )
                handler.abort_session("access revoked")
                continue
            if _signature(scsi) == _signature(handler.scsi):
                continue
            _swap(handler, scsi)
            handler.lun_names = self.registry.lun_names(target.name, scsi)

    # -- reports ---------------------------------------------------------------------------

    def targets(self) -> list[dict[str, Any]]:
        out = []
        for key, t in sorted(self.registry.targets.items()):
            out.append(
                {
                    "name": t.name,
                    "alias": t.entry.alias,
                    # a VM's target says so: its ACLs are the VM's grants
                    "origin": "vm" if t.vm_uuid else "static" if key in self.static else t.origin,
                    "allow_all": t.allow_all,
                    "chap": t.entry.chap is not None,
                    "luns": {str(n): lu.backend.size for n, lu in sorted(t.scsi.luns.items())},
                    "acls": [summary(a) for a in t.acls.values()],
                    "sessions": len(self.registry.connections_of(key)),
                    "vm_uuid": None if t.vm_uuid is None else str(t.vm_uuid),
                }
            )
        return out

    def status(self) -> dict[str, Any]:
        registry = self.registry
        metrics = self.server.metrics if self.server is not None else None
        sessions = []
        for tsih, handler in sorted(registry.connections.items()):
            record = registry.sessions.get(tsih)
            info = metrics.sessions.get(tsih) if metrics else None
            sessions.append(
                {
                    "tsih": tsih,
                    "initiator": handler.nexus.initiator_name if handler.nexus else "",
                    "target": handler.target_name or None,
                    "peer": handler.peer,
                    "connections": len(record.cids) if record else 1,
                    "luns": sorted(handler.scsi.luns) if handler.scsi else [],
                    "io": info.io.summary() if info else {},
                }
            )
        luns = []
        if metrics is not None:
            for (target, n), counters in sorted(metrics.luns.items()):
                luns.append({"target": target, "lun": n, **counters.summary()})
        return {
            "portals": [f"{p.host}:{p.port},{p.tpgt}" for p in registry.portals],
            "targets": len(registry.targets),
            "sessions": sessions,
            "initiators": sorted({s["initiator"] for s in sessions if s["initiator"]}),
            "luns": luns,
            "leases": self.leases.status() if self.leases is not None else [],
        }


def _signature(scsi: ScsiTarget) -> dict[int, tuple[int, bool]]:
    return {n: (id(getattr(lu, "shared", lu)), bool(lu.read_only)) for n, lu in scsi.luns.items()}


def _swap(handler: ConnectionHandler, scsi: ScsiTarget) -> None:
    """A live session's LUN map changes: units it no longer sees forget its I_T nexus,
    new ones report a power-on unit attention to it (SAM-5 §5.14)."""
    from ..scsi.command import it_key

    assert handler.nexus is not None and handler.scsi is not None
    key = it_key(handler.nexus)
    before = {id(getattr(lu, "shared", lu)): lu for lu in handler.scsi.luns.values()}
    after = {id(getattr(lu, "shared", lu)): lu for lu in scsi.luns.values()}
    for ident, lu in before.items():
        if ident not in after:
            lu.remove_nexus(key)
    for ident, lu in after.items():
        if ident not in before:
            lu.add_nexus(key)
    handler.scsi = scsi


# ---------------------------------------------------------------------------------------
# Operations
# ---------------------------------------------------------------------------------------

Args = dict[str, Any]
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
    doc = {k: args[k] for k in ("number", "path", "size", "read_only", "block_size") if k in args}
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
    from .config import parse_portal

    portal = parse_portal(str(args["listen"]), int(args.get("tpgt", 1)))
    if any((p.host, p.port) == (portal.host, portal.port) for p in cfg.portals):
        raise AdminError(f"portal {args['listen']} exists")
    return replace(cfg, portals=(*cfg.portals, portal))


def op_portal_remove(cfg: ManagedConfig, args: Args, runtime: Runtime | None) -> ManagedConfig:
    from .config import parse_portal

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


def action_vm_resize(state_dir: str, runtime: Runtime, args: Args) -> dict[str, Any]:
    """Grow a VM the daemon exports, live: guest I/O pauses while a region moves, the
    guest views take the new layout and initiators get CAPACITY DATA HAS CHANGED
    (SBC-3 §4.10); see :func:`iscsi_vmtarget.vm.resize_live`."""
    from ..vm import resize_live

    name = str(args["name"])
    target = served_vm_target(runtime, name)
    secondaries = {int(k): int(v) for k, v in dict(args.get("secondaries") or {}).items()}
    vm = resize_live(
        state_dir,
        name,
        target.scsi.luns,
        target.raw_luns,
        disk=args.get("disk"),
        memory=args.get("memory"),
        secondaries=secondaries or None,
    )
    log.info("vm %s resized live", name)
    return {"vm": vm.to_json()}


#: How an action on a VM the daemon does not export is refused; :func:`call_for_vm`
#: recognises it (the client then works on the pools offline).
NOT_EXPORTED = "this daemon does not export a VM named"


def served_vm_target(runtime: Runtime, name: str) -> Target:
    """The target through which this daemon exports the VM ``name``; AdminError if none."""
    from ..vm import vm_target_name

    target = runtime.registry.targets.get(vm_target_name(name).lower())
    if target is None:
        raise AdminError(f"{NOT_EXPORTED} {name!r}")
    return target


def _vm_chains(runtime: Runtime, name: str) -> dict[int, Any]:
    """The copy-on-write chains (:class:`iscsi_vmtarget.vm.cow.ChainBackend`) behind
    the guest LUNs of the VM ``name`` this daemon exports, by LUN number."""
    from ..vm.cow import ChainBackend

    luns = served_vm_target(runtime, name).scsi.luns
    return {n: lu.backend for n, lu in luns.items() if isinstance(lu.backend, ChainBackend)}


def other_chains(runtime: Runtime, own: Target, *, raw: bool = False) -> list[Any]:
    """Every served chain but those of target ``own``: what may read a VM's units
    besides the VM itself (linked clones, exported snapshots), for a live change of
    those units to rebind too; ``raw`` adds the raw views (:class:`~..vm.flat.FlatView`)
    of every other target, which read units of their own besides their chain."""
    from ..vm.cow import ChainBackend
    from ..vm.flat import FlatView

    kinds: tuple[type, ...] = (ChainBackend, FlatView) if raw else (ChainBackend,)
    return [
        lu.backend
        for target in runtime.registry.targets.values()
        if target is not own
        for lu in (*target.scsi.luns.values(), *((target.raw_luns or {}).values() if raw else ()))
        if isinstance(lu.backend, kinds)
    ]


def action_vm_snapshot(state_dir: str, runtime: Runtime, args: Args) -> dict[str, Any]:
    """Snapshot a VM the daemon exports: its LUNs are quiesced (in-flight commands
    drain, new ones wait), flushed, frozen and given new tops, then resume; with
    ``full``, the frozen layers are then filled while the LUNs serve; see
    :func:`iscsi_vmtarget.vm.snapshot.create_snapshot`."""
    from ..vm import StateDir, VmManager
    from ..vm import snapshot as snaps

    name, snap = str(args["name"]), str(args["snapshot"])
    chains = _vm_chains(runtime, name)
    with VmManager(StateDir.at(state_dir, args.get("key_file"))) as manager:
        info = snaps.create_snapshot(
            manager,
            name,
            snap,
            description=str(args.get("description") or ""),
            live=chains,
            full=bool(args.get("full")),
            progress=args.get(PROGRESS_ARG),
        )
    log.info("vm %s: snapshot %s taken live", name, snap)
    return {"snapshot": info.to_json()}


def action_vm_snapshot_fill(state_dir: str, runtime: Runtime, args: Args) -> dict[str, Any]:
    """Make a snapshot of a VM the daemon exports full while its LUNs serve (the
    snapshot's image does not change); see :mod:`iscsi_vmtarget.vm.snapshot_fill`."""
    from ..vm import StateDir, VmManager
    from ..vm import snapshot as snaps
    from ..vm.snapshot_fill import fill_snapshot

    name, snap = str(args["name"]), str(args["snapshot"])
    _vm_chains(runtime, name)  # refuses a VM this daemon does not export
    with VmManager(StateDir.at(state_dir, args.get("key_file"))) as manager:
        filled = fill_snapshot(manager, name, snap, progress=args.get(PROGRESS_ARG))
        info = snaps.snapshot_info(manager, name, snap)
    return {"snapshot": info.to_json(), "filled": filled}


def action_vm_snapshot_export(state_dir: str, runtime: Runtime, args: Args) -> dict[str, Any]:
    """Export a snapshot read-only (or stop), at once and from every later start;
    see :mod:`.snapshot_export`."""
    from .snapshot_export import export_snapshot_live

    return export_snapshot_live(state_dir, runtime, args)


def action_vm_clone(state_dir: str, runtime: Runtime, args: Args) -> dict[str, Any]:
    """Clone a VM the daemon exports (a snapshot taken with its LUNs quiesced, then a
    linked clone of it) and serve the clone at once; see :mod:`.vm_clone`."""
    from .vm_clone import clone_vm_live

    return clone_vm_live(state_dir, runtime, args)


def action_vm_unlink(state_dir: str, runtime: Runtime, args: Args) -> dict[str, Any]:
    """Make a linked clone the daemon exports independent while it serves."""
    from .vm_clone import unlink_vm_live

    return unlink_vm_live(state_dir, runtime, args)


def action_vm_serve(state_dir: str, runtime: Runtime, args: Args) -> dict[str, Any]:
    """Export a VM made while the daemon runs, at once; see :mod:`.vm_serve`."""
    from .vm_serve import serve_vm_live

    return serve_vm_live(state_dir, runtime, args)


def action_vm_revert(state_dir: str, runtime: Runtime, args: Args) -> dict[str, Any]:
    """Revert a VM the daemon exports to a snapshot, its LUNs quiesced meanwhile."""
    from ..vm import StateDir, VmManager
    from ..vm import snapshot as snaps

    name, snap = str(args["name"]), str(args["snapshot"])
    chains = _vm_chains(runtime, name)
    with VmManager(StateDir.at(state_dir, args.get("key_file"))) as manager:
        info = snaps.revert(manager, name, snap, live=chains)
    log.info("vm %s: reverted live to %s", name, snap)
    return {"snapshot": info.to_json()}


def action_vm_snapshot_delete(state_dir: str, runtime: Runtime, args: Args) -> dict[str, Any]:
    """Delete a snapshot of a VM the daemon exports (the merge waits for an offline
    repair: the daemon's chains keep reading the same bytes meanwhile)."""
    from ..vm import StateDir, VmManager
    from ..vm import snapshot as snaps

    name, snap = str(args["name"]), str(args["snapshot"])
    chains = _vm_chains(runtime, name)
    with VmManager(StateDir.at(state_dir, args.get("key_file"))) as manager:
        snaps.delete_snapshot(manager, name, snap, live=chains)
    return {"deleted": snap}


def action_vm_move(state_dir: str, runtime: Runtime, args: Args) -> dict[str, Any]:
    """Move a VM the daemon exports to another pool while its LUNs serve: copy, catch
    up on the writes made meanwhile, then switch with the LUNs quiesced; see
    :func:`iscsi_vmtarget.vm.move.move_live`. Other served chains reading the VM's
    units (linked clones, exported snapshots) follow."""
    from ..vm import StateDir, VmManager
    from ..vm.move import move_live

    name, pool = str(args["name"]), str(args["pool"])
    chains = _vm_chains(runtime, name)
    own = served_vm_target(runtime, name)
    followers = other_chains(runtime, own, raw=True)
    with VmManager(StateDir.at(state_dir, args.get("key_file"))) as manager:
        report = move_live(
            manager,
            name,
            pool,
            chains,
            raw=own.raw_luns or {},
            followers=followers,
            progress=args.get(PROGRESS_ARG),
        )
        _lease_moved(state_dir, runtime, manager, name)
    log.info("vm %s moved live to pool %s: %s", name, pool, report)
    return {"moved": report.to_json()}


def _lease_moved(state_dir: str, runtime: Runtime, manager: Any, name: str) -> None:
    """A unit's lease lives in its own META region (:mod:`..vm.lease_device`), so it
    moves with the unit: given up at the old places, taken at the new ones (a unit
    moved into a device pool is leased from then on). Should another host hold it
    there, this daemon stops serving the VM, as when a lease is lost."""
    vm = manager.find(name)
    leases = lease_keeper(state_dir)
    leases.release(u.header.unit_uuid for u in vm.lun_map().values())
    try:
        leases.acquire_vm(vm, manager.catalog)
    except LeaseHeldError as exc:
        log.error("vm %s: no longer serving it, its moved units are leased: %s", name, exc)
        runtime.on_loop(lambda: runtime.remove_pool_target(served_vm_target(runtime, name).name))


#: Operations on what the daemon serves (not configuration), run only in the daemon.
ACTIONS: dict[str, Callable[[str, Runtime, Args], dict[str, Any]]] = {
    "vm.resize": action_vm_resize,
    "vm.snapshot": action_vm_snapshot,
    "vm.revert": action_vm_revert,
    "vm.snapshot.delete": action_vm_snapshot_delete,
    "vm.snapshot.fill": action_vm_snapshot_fill,
    "vm.snapshot.export": action_vm_snapshot_export,
    "vm.move": action_vm_move,
    "vm.serve": action_vm_serve,
    "vm.clone": action_vm_clone,
    "vm.unlink": action_vm_unlink,
}


class Manager:
    """Runs operations against the store, and the live runtime when there is one."""

    def __init__(self, store: ConfigStore, runtime: Runtime | None = None) -> None:
        self.store = store
        self.runtime = runtime
        self.current = store.load() if runtime is not None else None

    def start(self) -> None:
        """Daemon start: bring the registry to the persisted document (the portals
        were chosen by ``serve`` before binding). ACLs that an older version kept on
        a VM target's overlay become the VM's grants first (and are saved so)."""
        from ..vm.export import vm_of_target, vm_target_name

        assert self.runtime is not None and self.current is not None
        own_targets = {}
        for key, target in self.runtime.registry.targets.items():
            name = vm_of_target(key)
            if target.vm_uuid is not None and name and key == vm_target_name(name).lower():
                own_targets[key] = (target.vm_uuid, name)
        migrated, notes = grants.migrate_overlays(self.current, own_targets)
        if notes:
            with self.store.locked():
                self.store.save(migrated)
            self.current = migrated
            for note in notes:
                log.warning("config: %s", note)
        self.runtime.apply(ManagedConfig(), self.current)

    def _vm_identity(self, op: str, args: Args, cfg: ManagedConfig) -> Args:
        """``args`` with ``vm_uuid`` and ``vm_name`` of the VM an operation of
        :data:`VM_OPERATIONS` names: ``vm``, or a target derived from a VM (its own,
        a snapshot export...). Unchanged for other targets."""
        from ..vm import StateDir, VmManager
        from ..vm.export import vm_of_target, vm_target_name

        field = VM_OPERATIONS.get(op)
        if field is None:
            return args
        args = {k: v for k, v in args.items() if k not in ("vm_uuid", "vm_name")}
        name = args.get("vm")
        if name is None:
            target = str(args.get(field) or "")
            name = vm_of_target(target)
            spec = cfg.target(target)
            live = self.runtime.registry.targets.get(target.lower()) if self.runtime else None
            if name is None or (spec is not None and spec.luns) or (live and not live.vm_uuid):
                return args  # a target of its own (managed, TOML), not a VM's
        name = str(name).lower()
        key = None
        if self.runtime is not None:  # the daemon knows the VMs it serves
            live = self.runtime.registry.targets.get(vm_target_name(name).lower())
            key = live.vm_uuid if live is not None else None
        if key is None:  # discovery reads unit headers without the pool locks
            try:
                with VmManager(StateDir.at(self.store.state_dir)) as manager:
                    key = manager.find(name).base.header.unit_uuid
            except VmError:
                if args.get("vm") is None and cfg.target(str(args.get(field))) is not None:
                    return args  # a deleted VM's old overlay entry: still editable
                raise
        return {
            **args,
            field: args.get(field) or vm_target_name(name),
            "vm_name": name,
            "vm_uuid": str(key),
        }

    async def execute(self, op: str, args: Args) -> dict[str, Any]:
        try:
            if op in QUERIES:
                return self._query(op, args)
            if op in ACTIONS:
                if self.runtime is None:
                    raise AdminError(f"{op} needs a running daemon")
                # Unit I/O (copying regions, fsync): keep the event loop serving.
                loop = self.runtime.loop = asyncio.get_running_loop()
                return await loop.run_in_executor(
                    None, ACTIONS[op], self.store.state_dir, self.runtime, args
                )
            transform = OPERATIONS.get(op)
            if transform is None:
                raise AdminError(f"unknown operation {op!r}")
            if self.runtime is None:
                with self.store.locked():
                    cfg = self.store.load()
                    return self._change(cfg, transform, self._vm_identity(op, args, cfg))
            assert self.current is not None
            args = self._vm_identity(op, args, self.current)
            return await self._change_live(self.current, transform, args)
        except (AclError, PersistError, VmError, KeyError, TypeError, ValueError) as exc:
            message = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
            raise AdminError(message) from exc

    def _change(self, old: ManagedConfig, transform: Transform, args: Args) -> dict[str, Any]:
        new = transform(old, args, None)
        changes = diff(old, new)
        if changes and not args.get("dry_run"):
            self.store.save(new)
        return {"changes": changes, "applied": bool(changes) and not args.get("dry_run")}

    async def _change_live(
        self, old: ManagedConfig, transform: Transform, args: Args
    ) -> dict[str, Any]:
        assert self.runtime is not None
        new = transform(old, args, self.runtime)
        changes = diff(old, new)
        if not changes or args.get("dry_run"):
            self.runtime.check(new)
            return {"changes": changes, "applied": False}
        self.runtime.apply(old, new)
        try:
            await self.runtime.apply_portals(old, new)
        except OSError as exc:
            self.runtime.apply(new, old)
            raise AdminError(f"cannot listen: {exc.strerror or exc}") from exc
        with self.store.locked():
            self.store.save(new)
        self.current = new
        for line in changes:
            log.info("config: %s", line)
        return {"changes": changes, "applied": True}

    def _query(self, op: str, args: Args) -> dict[str, Any]:
        cfg = self.current if self.current is not None else self.store.load()
        if op == "ping":
            return {"live": self.runtime is not None}
        if op == "config.export":
            doc = cfg.to_dict()
            return {"document": doc if args.get("secrets", True) else redacted(cfg)}
        if op == "status":
            if self.runtime is None:
                raise AdminError("status needs a running daemon")
            return self.runtime.status()
        if op == "target.list":
            if self.runtime is not None:
                return {"targets": self.runtime.targets()}
            return {
                "targets": [
                    {
                        "name": t.name,
                        "alias": t.alias,
                        "origin": "managed" if t.luns else "overlay",
                        "allow_all": t.allow_all,
                        "chap": t.chap is not None,
                        "luns": {str(lun.number): lun.size for lun in t.luns},
                        "acls": [summary(a) for a in t.acls],
                        "sessions": 0,
                        "vm_uuid": None,
                    }
                    for t in cfg.targets
                ]
            }
        # acl.list: every target's ACLs in force (a VM target's: its grants), the
        # targets open to all, and the grants by VM with the defaults
        wanted = args.get("target")
        targets = [
            t
            for t in self._query("target.list", {})["targets"]
            if wanted is None or t["name"].lower() == str(wanted).lower()
        ]
        if wanted is not None and not targets:
            raise AdminError(f"no target named {wanted}")
        return {
            "acls": [
                {"target": t["name"], "vm_uuid": t["vm_uuid"], **acl}
                for t in targets
                for acl in t["acls"]
            ],
            "allow_all": [t["name"] for t in targets if t["allow_all"]],
            **grants.report(cfg),
        }


# ---------------------------------------------------------------------------------------
# The socket
# ---------------------------------------------------------------------------------------


def socket_path(state_dir: str) -> str:
    return os.path.join(state_dir, SOCKET_NAME)


class AdminServer:
    """JSON lines over a UNIX socket (mode 0600) in the state directory."""

    def __init__(self, manager: Manager, state_dir: str) -> None:
        self.manager = manager
        self.path = socket_path(state_dir)
        self._server: asyncio.base_events.Server | None = None
        self._lock = asyncio.Lock()
        self._bound: tuple[int, int] | None = None  # (st_dev, st_ino) of our socket

    async def start(self) -> None:
        """Bind the socket; ``serve`` holds the state-directory lock
        (:func:`~iscsi_vmtarget.vm.locks.hold_state_dir`), so a socket already there
        is a dead daemon's."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a stale socket of a dead daemon
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, self.path, limit=MAX_REQUEST
            )
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        info = os.stat(self.path)
        self._bound = (info.st_dev, info.st_ino)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self._unlink_own()

    def _unlink_own(self) -> None:
        """Remove the socket only if it is still the one we bound: never another
        daemon's, whatever happened to the state directory meanwhile."""
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            return
        if self._bound == (info.st_dev, info.st_ino):
            os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()

        def send(message: dict[str, Any]) -> None:
            if not writer.is_closing():
                writer.write(json.dumps(message).encode() + b"\n")

        def progress(done: int, total: int) -> None:  # called from an executor thread
            loop.call_soon_threadsafe(send, {"progress": {"done": done, "total": total}})

        try:
            while line := await reader.readline():
                send(await self._answer(line, progress))
                await writer.drain()
        except (ConnectionError, ValueError) as exc:
            log.debug("admin connection: %r", exc)
        finally:
            writer.close()

    async def _answer(
        self, line: bytes, progress: Callable[[int, int], None] | None = None
    ) -> dict[str, Any]:
        try:
            request = json.loads(line)
            op, args = str(request["op"]), dict(request.get("args") or {})
        except (ValueError, KeyError, TypeError):
            return {"ok": False, "error": 'bad request: want {"op": ..., "args": {...}}'}
        args.pop(PROGRESS_ARG, None)  # only ever the daemon's own callback
        if request.get("progress") and progress is not None:
            args[PROGRESS_ARG] = progress
        async with self._lock:  # one change at a time, in order
            try:
                return {"ok": True, "result": await self.manager.execute(op, args)}
            except AdminError as exc:
                return {"ok": False, "error": str(exc)}
            except Exception as exc:  # never let a bug take the daemon down
                log.exception("admin operation %s failed", op)
                return {"ok": False, "error": f"internal error: {exc!r}"}


def call_daemon(
    state_dir: str,
    op: str,
    args: Args,
    timeout: float = 60,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """One request to the running daemon; DaemonNotRunning if none answers.
    ``progress``: asks for progress lines and calls it with each (done, total)."""
    path = socket_path(state_dir)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    request: dict[str, Any] = {"op": op, "args": args}
    if progress is not None:
        request["progress"] = True
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DaemonNotRunning(path) from exc
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while True:
            line, sep, rest = data.partition(b"\n")
            if not sep:
                chunk = sock.recv(65536)
                if not chunk:
                    raise AdminError("the daemon closed the admin connection")
                data += chunk
                continue
            data = rest
            reply = json.loads(line)
            if "progress" not in reply:
                break
            if progress is not None:
                progress(int(reply["progress"]["done"]), int(reply["progress"]["total"]))
    finally:
        sock.close()
    if not reply.get("ok"):
        raise AdminError(str(reply.get("error")))
    return dict(reply["result"])


def call_for_vm(
    state_dir: str,
    op: str,
    args: Args,
    timeout: float = 3600,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any] | None:
    """A VM action (``vm.*``) by the running daemon; None when no daemon runs or it
    does not export that VM, so the caller does the work on the pools offline."""
    try:
        return call_daemon(state_dir, op, args, timeout=timeout, progress=progress)
    except DaemonNotRunning:
        return None
    except AdminError as exc:
        if str(exc).startswith(NOT_EXPORTED):
            return None
        raise


def call(state_dir: str, op: str, args: Args) -> tuple[dict[str, Any], bool]:
    """Run an operation: through the daemon when one runs, else on the state
    directory's files. Returns (result, live)."""
    try:
        return call_daemon(state_dir, op, args), True
    except DaemonNotRunning:
        holder = state_dir_holder(state_dir)
        if holder is not None:  # starting (or its socket was removed): not offline
            raise AdminError(
                f"state directory {state_dir} is served by {holder}, but its admin socket "
                f"{socket_path(state_dir)} does not answer (yet); try again"
            ) from None
    manager = Manager(ConfigStore(state_dir))
    return asyncio.run(manager.execute(op, args)), False
