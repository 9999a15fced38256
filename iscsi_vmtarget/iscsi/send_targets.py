"""SendTargets (RFC 7143 §13.3 and Appendix C): which targets an initiator may reach, and where.

Pure: the answer is built from a :class:`TargetDirectory`. Each target is one
``TargetName`` pair followed by one ``TargetAddress`` pair per portal, written
``host:port,tpgt`` with IPv6 hosts bracketed (§13.8). Splitting the (possibly long)
answer into C=1 Text Responses is the connection's business (§11.11.2).
"""

from __future__ import annotations

from .directory import Portal, TargetDirectory, TargetEntry

Pairs = list[tuple[str, str]]


def _describe(entry: TargetEntry, fallback_portal: Portal | None) -> Pairs:
    out: Pairs = [("TargetName", entry.name)]
    portals = entry.portals
    if not portals and fallback_portal is not None:
        # No configured portal: the one this session came in on, in the target's group.
        portals = (Portal(fallback_portal.host, fallback_portal.port, entry.tpgt),)
    out += [("TargetAddress", portal.target_address()) for portal in portals]
    return out


def send_targets(
    directory: TargetDirectory,
    initiator_name: str,
    value: str,
    session_target: str | None,
    *,
    fallback_portal: Portal | None = None,
    source: str | None = None,
) -> Pairs:
    """Answer ``SendTargets=<value>`` (RFC 7143 Appendix C).

    * ``All``: every target this initiator may see; only in a discovery session
      (``session_target`` None), a normal session gets ``SendTargets=Reject``.
    * ``<iSCSI target name>``: that target, if it exists and the initiator may see it
      (an empty answer otherwise).
    * empty: the session's own target in a normal session; Reject in discovery.

    ``fallback_portal`` (the portal the request came in on) stands in for a target that
    has no portals configured, since a target listed without any TargetAddress would be
    reachable only "at the same address as the discovery session" (Appendix C).
    ``source`` is the initiator's address: ACLs with source rules see it.
    """
    if value == "All":
        if session_target is not None:
            return [("SendTargets", "Reject")]
        return [
            pair
            for entry in directory.visible_to(initiator_name, source)
            for pair in _describe(entry, fallback_portal)
        ]
    name = value or session_target
    if not name:
        return [("SendTargets", "Reject")]
    entry = directory.lookup(name)
    if entry is None or not entry.allows(initiator_name, source):
        return []
    return _describe(entry, fallback_portal)
