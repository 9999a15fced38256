"""What the login and discovery code may ask about configured targets.

The iSCSI core never reads configuration files: the server hands it a
:class:`TargetDirectory` (targets, their portals and CHAP secrets, who may see what).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class ChapSecret:
    """A CHAP name and secret (RFC 1994; RFC 7143 §12.1.3)."""

    user: str
    secret: bytes

    def __repr__(self) -> str:  # never print secrets
        return f"ChapSecret(user={self.user!r}, secret=<{len(self.secret)} bytes>)"


@dataclass(frozen=True)
class Portal:
    """A network portal: address, port and its portal group tag (RFC 7143 §4.2.1)."""

    host: str
    port: int
    tpgt: int = 1

    def target_address(self) -> str:
        """The TargetAddress value (RFC 7143 §13.9): ``host:port,tpgt`` (IPv6 bracketed)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port},{self.tpgt}"


@dataclass(frozen=True)
class TargetEntry:
    """One configured target as login and discovery see it.

    ``chap`` is what an initiator must prove (one-way CHAP); ``mutual_chap`` is the
    target's own name/secret for mutual CHAP. ``initiators`` restricts who may log in
    (empty = anyone); masking per LUN is the SCSI side's business.
    """

    name: str
    alias: str | None = None
    tpgt: int = 1
    portals: tuple[Portal, ...] = ()
    chap: ChapSecret | None = None
    mutual_chap: ChapSecret | None = None
    initiators: frozenset[str] = field(default_factory=frozenset)

    def allows(self, initiator_name: str) -> bool:
        return not self.initiators or initiator_name.lower() in self.initiators


class TargetDirectory(Protocol):
    """Lookup interface the server implements over its configuration."""

    def lookup(self, target_name: str) -> TargetEntry | None:
        """The target of that name (case-insensitive iSCSI name), or None."""
        ...

    def visible_to(self, initiator_name: str) -> list[TargetEntry]:
        """Targets this initiator may see in SendTargets."""
        ...

    def discovery_chap(self) -> tuple[ChapSecret | None, ChapSecret | None]:
        """(initiator-proves, target-proves) CHAP secrets for discovery sessions."""
        ...


@dataclass
class StaticDirectory:
    """A simple in-memory :class:`TargetDirectory` (tests, default server)."""

    targets: list[TargetEntry] = field(default_factory=list)
    discovery_auth: ChapSecret | None = None
    discovery_mutual: ChapSecret | None = None

    def lookup(self, target_name: str) -> TargetEntry | None:
        key = target_name.lower()
        for t in self.targets:
            if t.name.lower() == key:
                return t
        return None

    def visible_to(self, initiator_name: str) -> list[TargetEntry]:
        return [t for t in self.targets if t.allows(initiator_name)]

    def discovery_chap(self) -> tuple[ChapSecret | None, ChapSecret | None]:
        return self.discovery_auth, self.discovery_mutual
