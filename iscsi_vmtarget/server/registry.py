"""The running target's object tree: targets, their LUNs and portals, live sessions.

This is the one place that ties the layers together: it implements the iSCSI core's
:class:`~iscsi_vmtarget.iscsi.directory.TargetDirectory` and owns the SCSI
:class:`~iscsi_vmtarget.scsi.ScsiTarget` of each target, and one more per ACL that
shows the initiator only its mapped LUNs (:mod:`.masking`).
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Protocol

from ..iscsi.connection import TargetConnection
from ..iscsi.directory import ChapSecret, Portal, TargetEntry
from ..iscsi.login import LoginThrottle, SessionTable
from ..scsi import LogicalUnit, Nexus, ScsiTarget
from .live_disk import LiveDisk
from .masking import Acl, build_lun_map, check_unique_designators

log = logging.getLogger("iscsi_vmtarget")


@dataclass
class Target:
    """One exported target: its login-side entry and its SCSI side.

    ``scsi`` holds every LUN of the target; an initiator that logs in through an ACL
    gets the :class:`ScsiTarget` of :meth:`scsi_for_acl` instead, built over the same
    (shared) logical units with the ACL's LUN numbers. ``origin`` says where the
    target is defined: ``config`` (TOML file or demo), ``vm`` (a VM in a pool) or
    ``managed`` (the state directory's persisted configuration). ``vm_uuid`` is the
    identity of the VM a target is derived from (its own target, a snapshot export...):
    whose grants mask it (:mod:`.grants`).
    """

    entry: TargetEntry
    scsi: ScsiTarget
    acls: dict[str, Acl] = field(default_factory=dict)  # by lowercased initiator name
    allow_all: bool = False
    origin: str = "config"
    raw_luns: dict[int, LogicalUnit] | None = None  # raw views of VM units, by LUN
    region_luns: dict[int, LogicalUnit] | None = None  # hypervisor view: state, config
    disks: dict[int, LiveDisk] | None = None  # a VM's live disks behind its LUNs, by LUN
    vm_uuid: uuid.UUID | None = None
    _views: dict[str, ScsiTarget] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.acls or self.allow_all:
            self.set_acls(self.acls, self.allow_all)

    @property
    def name(self) -> str:
        return self.entry.name

    def set_acls(self, acls: dict[str, Acl], allow_all: bool) -> None:
        """Replace the ACLs; login and discovery see the new rules at once. Every ACL's
        LUN map is built first, so a map showing one designator twice is refused
        (:func:`~.acl.check_unique_designators`) before anything changes."""
        for acl in acls.values():
            build_lun_map(self.scsi.luns, acl, self.raw_luns, self.region_luns)
        self.acls = {a.key: a for a in acls.values()}
        self.allow_all = allow_all
        self.entry = replace(
            self.entry, acls=tuple(a.rule() for a in self.acls.values()), allow_all=allow_all
        )
        self._views.clear()

    def set_luns(self, luns: dict[int, LogicalUnit]) -> None:
        """Replace the LUN set (the per-ACL views are rebuilt on next use); a set or
        an ACL map showing one designator twice is refused before anything changes."""
        check_unique_designators(luns, f"target {self.name}")
        for acl in self.acls.values():
            build_lun_map(luns, acl, self.raw_luns, self.region_luns)
        self.scsi = ScsiTarget(luns)
        self._views.clear()

    def scsi_for_acl(self, acl: Acl | None) -> ScsiTarget:
        if acl is None:
            return self.scsi
        view = self._views.get(acl.key)
        if view is None:
            view = ScsiTarget(build_lun_map(self.scsi.luns, acl, self.raw_luns, self.region_luns))
            self._views[acl.key] = view
        return view

    def scsi_for(self, initiator_name: str, source: str | None) -> ScsiTarget | None:
        """What this initiator may see (None: it may not log in)."""
        grant = self.entry.grant(initiator_name, source)
        if grant is None:
            return None
        acl = self.acls.get(grant.rule.initiator.lower()) if grant.rule else None
        return self.scsi_for_acl(acl)


class Connection(Protocol):
    """A logged-in connection as the registry keeps it (by TSIH) and management sees
    it: the portal's :class:`~.portal.ConnectionHandler`, which imports this module."""

    conn: TargetConnection
    tsih: int
    peer: str
    source: str | None
    target_name: str  # lower case, "" for a discovery session
    nexus: Nexus | None
    scsi: ScsiTarget | None  # the LUN map its ACL gives it
    lun_names: dict[int, int]  # LUN number shown -> the target's own LUN number

    def abort_session(self, reason: str) -> None: ...


@dataclass
class Registry:
    """Targets, portals and sessions of one daemon."""

    targets: dict[str, Target] = field(default_factory=dict)
    portals: list[Portal] = field(default_factory=list)
    discovery_auth: ChapSecret | None = None
    discovery_mutual: ChapSecret | None = None
    sessions: SessionTable = field(default_factory=SessionTable)
    connections: dict[int, Connection] = field(default_factory=dict)  # by TSIH
    throttle: LoginThrottle = field(default_factory=lambda: LoginThrottle(time.monotonic))

    # -- TargetDirectory -------------------------------------------------------------
    def lookup(self, target_name: str) -> TargetEntry | None:
        target = self.targets.get(target_name.lower())
        return self._with_portals(target.entry) if target else None

    def visible_to(self, initiator_name: str, source: str | None = None) -> list[TargetEntry]:
        return [
            self._with_portals(t.entry)
            for t in self.targets.values()
            if t.entry.allows(initiator_name, source)
        ]

    def _with_portals(self, entry: TargetEntry) -> TargetEntry:
        """A target with no portals of its own is reachable on every bound portal."""
        if entry.portals:
            return entry
        return replace(entry, portals=tuple(p for p in self.portals if p.tpgt == entry.tpgt))

    def discovery_chap(self) -> tuple[ChapSecret | None, ChapSecret | None]:
        return self.discovery_auth, self.discovery_mutual

    # -- management --------------------------------------------------------------------
    def add_target(self, target: Target) -> None:
        key = target.name.lower()
        if key in self.targets:
            raise ValueError(f"target {target.name} is defined twice")
        check_unique_designators(target.scsi.luns, f"target {target.name}")
        self.targets[key] = target

    def scsi_for(
        self, target_name: str, initiator_name: str | None = None, source: str | None = None
    ) -> ScsiTarget | None:
        """The SCSI target an initiator sees (its ACL's LUN map); without an
        initiator name, every LUN of the target."""
        target = self.targets.get(target_name.lower())
        if target is None:
            return None
        if initiator_name is None:
            return target.scsi
        return target.scsi_for(initiator_name, source)

    def lun_names(self, target_name: str, scsi: ScsiTarget) -> dict[int, int]:
        """For an ACL's view: LUN number shown -> the target's own LUN number."""
        target = self.targets.get(target_name.lower())
        if target is None:
            return {}
        by_unit = {id(lu): n for n, lu in target.scsi.luns.items()}
        for extra in (target.raw_luns, target.region_luns):
            by_unit.update({id(lu): n for n, lu in (extra or {}).items()})
        out: dict[int, int] = {}
        for shown, lu in scsi.luns.items():
            shared = getattr(lu, "shared", lu)  # a read-only mapping's unit
            if id(shared) in by_unit:
                out[shown] = by_unit[id(shared)]
        return out

    def connections_of(self, target_name: str) -> list[Connection]:
        key = target_name.lower()
        return [c for c in self.connections.values() if c.target_name == key]
