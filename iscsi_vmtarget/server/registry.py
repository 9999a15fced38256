"""The running target's object tree: targets, their LUNs and portals, live sessions.

This is the one place that ties the layers together: it implements the iSCSI core's
:class:`~iscsi_vmtarget.iscsi.directory.TargetDirectory` and owns the SCSI
:class:`~iscsi_vmtarget.scsi.ScsiTarget` of each target.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ..iscsi.directory import ChapSecret, Portal, TargetEntry
from ..iscsi.login import SessionTable
from ..scsi import ScsiTarget

if TYPE_CHECKING:
    from .portal import ConnectionHandler

log = logging.getLogger("iscsi_vmtarget")


@dataclass
class Target:
    """One exported target: its login-side entry and its SCSI side."""

    entry: TargetEntry
    scsi: ScsiTarget

    @property
    def name(self) -> str:
        return self.entry.name


@dataclass
class Registry:
    """Targets, portals and sessions of one daemon."""

    targets: dict[str, Target] = field(default_factory=dict)
    portals: list[Portal] = field(default_factory=list)
    discovery_auth: ChapSecret | None = None
    discovery_mutual: ChapSecret | None = None
    sessions: SessionTable = field(default_factory=SessionTable)
    connections: dict[int, ConnectionHandler] = field(default_factory=dict)  # by TSIH

    # -- TargetDirectory -------------------------------------------------------------
    def lookup(self, target_name: str) -> TargetEntry | None:
        target = self.targets.get(target_name.lower())
        return self._with_portals(target.entry) if target else None

    def visible_to(self, initiator_name: str) -> list[TargetEntry]:
        return [
            self._with_portals(t.entry)
            for t in self.targets.values()
            if t.entry.allows(initiator_name)
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
        self.targets[key] = target

    def scsi_for(self, target_name: str) -> ScsiTarget | None:
        target = self.targets.get(target_name.lower())
        return target.scsi if target else None

    def connections_of(self, target_name: str) -> list[ConnectionHandler]:
        key = target_name.lower()
        return [c for c in self.connections.values() if c.target_name == key]
