"""The running daemon's side of management: its registry reconciled to the managed
configuration.

:class:`Runtime` holds the live registry (targets, LUNs, ACLs, sessions) and the
listeners. An operation (:mod:`.config_changes`) turns one
:class:`~.persist.ManagedConfig` into another; :meth:`Runtime.apply` then makes the
registry match it: new LUN backings are opened first (so a bad path fails before
anything changes), then targets, LUNs and ACLs are swapped in; sessions whose access
is gone are logged out, sessions whose LUN map changed get the new map, all others
are untouched. The daemon's VM actions (:mod:`.actions`) add and remove the targets a
VM pool defines through it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import IscsiVmtargetError
from ..iscsi.directory import ChapSecret, Portal, TargetEntry
from ..scsi import LogicalUnit, ScsiTarget
from ..scsi.task import it_key
from .grants import effective_acls, summary
from .masking import Acl
from .model import LunError, TargetSpec, open_lun
from .persist import ManagedConfig
from .registry import Connection, Registry, Target

if TYPE_CHECKING:
    from ..vm.units.device_lease import LeaseKeeper
    from .listener import TargetServer

log = logging.getLogger("iscsi_vmtarget")
_T = TypeVar("_T")
#: A request's arguments (``{"op": ..., "args": {...}}``), as operations and actions get them.
Args = dict[str, Any]


class AdminError(IscsiVmtargetError):
    """An operation refused; the message is for the operator."""


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
        False if it is not served. Call from an action's or a keeper's thread: the
        registry changes and the sessions end on the loop (:meth:`on_loop`), then the
        LUs' backends close in this thread, so a close that waits (an RBD image of a
        fenced client finishing its I/O in flight, a unit's lease released on a slow
        cluster) never stalls the loop that serves every other target."""
        key = name.lower()

        def detach() -> Target | None:
            if key not in self.registry.targets or key not in self.static:
                return None
            del self.static[key]
            return self._detach_target(key)

        target = self.on_loop(detach)
        if target is None:
            return False
        _close_luns(target)
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
                    lu = open_lun(spec.name, lun, spec.tpgt)
                    opened.append(lu)
                    units[lun.number] = lu
                out[spec.key] = units
        except LunError as exc:
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
                spec.name,
                spec.alias,
                spec.tpgt,
                chap=spec.chap,
                mutual_chap=spec.mutual_chap,
                initiators=frozenset(i.lower() for i in spec.initiators),
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
        _close_luns(self._detach_target(key))

    def _detach_target(self, key: str) -> Target:
        """Take a target out of the registry and end its sessions (on the loop); its
        LUs stay open for the caller to close (:func:`_close_luns`)."""
        registry = self.registry
        target = registry.targets.pop(key)
        for handler in registry.connections_of(key):
            handler.abort_session("target deleted")
        if self.server is not None:
            self.server.metrics.forget_target(key)
        log.info("target %s deleted", target.name)
        return target

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
            merged = metrics.merged()
            for (target, n), counters in sorted(metrics.luns.items()):
                lun: dict[str, Any] = {"target": target, "lun": n, **counters.summary()}
                if (target, n) in merged:
                    lun["merged_reads"], lun["merged_writes"] = merged[(target, n)]
                luns.append(lun)
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


def _swap(handler: Connection, scsi: ScsiTarget) -> None:
    """A live session's LUN map changes: units it no longer sees forget its I_T nexus,
    new ones report a power-on unit attention to it (SAM-5 §5.14)."""
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


def _close_luns(target: Target) -> None:
    for extra in (target.scsi.luns, target.raw_luns or {}, target.region_luns or {}):
        for lu in extra.values():
            lu.backend.close()
