"""What the login and discovery code may ask about configured targets.

The iSCSI core never reads configuration files: the server hands it a
:class:`TargetDirectory` (targets, their portals and CHAP secrets, who may see what).

Who may see what is decided by each target's access rules (:class:`AccessRule`, one
per ACL: an initiator name and optionally the source networks it must come from, with
CHAP secrets that override the target's). A target with rules denies every initiator
no rule matches, unless ``allow_all`` (demo mode) is set; a target without rules is
open, unless it is ``deny_by_default`` (every target derived from a VM: nobody gets in
until granted, as LIO's generate_node_acls=0). The same decision answers SendTargets
(RFC 7143 Appendix C: only targets the initiator may log into are listed) and login
(§11.13.5: 02/02, authorization failure).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Protocol

from .names import same_node


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


def source_matches(source: str | None, networks: tuple[str, ...]) -> bool:
    """True if ``source`` (an IP address, IPv4-mapped IPv6 unwrapped) lies in one of
    ``networks`` (CIDR strings); no networks means any source, an unknown source none."""
    if not networks:
        return True
    if source is None:
        return False
    try:
        address = ipaddress.ip_address(source.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for net in networks:
        network = ipaddress.ip_network(net, strict=False)
        if address.version == network.version and address in network:
            return True
    return False


@dataclass(frozen=True)
class AccessRule:
    """One ACL as login sees it: which initiator (compared by the names' RFC 3722
    normal forms, §4.2.7.2: :mod:`.names`), from which source networks (empty = any), and the
    CHAP secrets it must prove (``chap``) and may ask the target to prove
    (``mutual_chap``, §12.1.3); None falls back to the target's own secrets."""

    initiator: str
    sources: tuple[str, ...] = ()
    chap: ChapSecret | None = None
    mutual_chap: ChapSecret | None = None

    def matches(self, initiator_name: str, source: str | None) -> bool:
        """Same node (normal forms equal, RFC 3722; a non-name matches nothing) and an
        allowed source."""
        return same_node(initiator_name, self.initiator) and source_matches(source, self.sources)


@dataclass(frozen=True)
class Grant:
    """Permission to log into a target: the CHAP secrets in force for this initiator
    and the rule that granted it (None when the target is open or in demo mode)."""

    chap: ChapSecret | None
    mutual_chap: ChapSecret | None
    rule: AccessRule | None = None


@dataclass(frozen=True)
class TargetEntry:
    """One configured target as login and discovery see it.

    ``chap`` is what an initiator must prove (one-way CHAP); ``mutual_chap`` is the
    target's own name/secret for mutual CHAP. ``acls`` restrict who may log in (deny
    by default once there is one, or always when ``deny_by_default``, unless
    ``allow_all``); ``initiators`` is the older, plain list of allowed names (empty =
    anyone). Masking per LUN is the SCSI side's business.
    """

    name: str
    alias: str | None = None
    tpgt: int = 1
    portals: tuple[Portal, ...] = ()
    chap: ChapSecret | None = None
    mutual_chap: ChapSecret | None = None
    initiators: frozenset[str] = field(default_factory=frozenset)
    acls: tuple[AccessRule, ...] = ()
    allow_all: bool = False
    deny_by_default: bool = False

    def grant(self, initiator_name: str, source: str | None = None) -> Grant | None:
        """May ``initiator_name`` coming from ``source`` log in, and with which CHAP
        secrets (an ACL's own secrets override the target's)? None: denied."""
        for rule in self.acls:
            if rule.matches(initiator_name, source):
                return Grant(rule.chap or self.chap, rule.mutual_chap or self.mutual_chap, rule)
        if (self.acls or self.deny_by_default) and not self.allow_all:
            return None
        if self.initiators and not any(same_node(initiator_name, i) for i in self.initiators):
            return None
        return Grant(self.chap, self.mutual_chap)

    def allows(self, initiator_name: str, source: str | None = None) -> bool:
        return self.grant(initiator_name, source) is not None


class TargetDirectory(Protocol):
    """Lookup interface the server implements over its configuration."""

    def lookup(self, target_name: str) -> TargetEntry | None:
        """The target of that name (case-insensitive iSCSI name), or None."""
        ...

    def visible_to(self, initiator_name: str, source: str | None = None) -> list[TargetEntry]:
        """Targets this initiator, connecting from ``source``, may see in SendTargets."""
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

    def visible_to(self, initiator_name: str, source: str | None = None) -> list[TargetEntry]:
        return [t for t in self.targets if t.allows(initiator_name, source)]

    def discovery_chap(self) -> tuple[ChapSecret | None, ChapSecret | None]:
        return self.discovery_auth, self.discovery_mutual
