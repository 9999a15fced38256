"""LUN masking: the ACL model and the per-ACL view of a target's logical units.

The object tree follows rtslib's: target -> portal group -> node ACLs -> mapped LUNs.
An :class:`Acl` names one initiator (stored in its RFC 3722 normal form, the form
login compares with, RFC 7143 §4.2.7.2), optionally the source networks it must
connect from, optionally its own CHAP secrets (they override the target's, §12.1.3)
and the LUNs it sees: each :class:`MappedLun` shows one of the target's LUNs under an
initiator-visible number, read-only or not, through the ``guest`` or ``raw`` view of
a VM unit.

Masking is enforced at every door: login and SendTargets ask the target's
:class:`~iscsi_vmtarget.iscsi.directory.AccessRule`\\ s (built here by
:meth:`Acl.rule`); the SCSI side serves each ACL a
:class:`~iscsi_vmtarget.scsi.ScsiTarget` built by :func:`build_lun_map` over the
target's shared :class:`~iscsi_vmtarget.scsi.LogicalUnit`\\ s, so REPORT LUNS lists
only the mapped LUNs under their mapped numbers, and an unmapped LUN is LOGICAL UNIT
NOT SUPPORTED (25h/00h) with peripheral qualifier 3 in INQUIRY (SPC-4 §6.4.2) - the
device server's ordinary behaviour for a LUN it does not have.

Every dict form here (:meth:`Acl.to_dict` / :meth:`Acl.from_dict`) is what the
persisted configuration (``<state-dir>/conf/config.json``) and ``[[target.acl]]``
tables of the TOML serve configuration hold.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from ..errors import IscsiVmtargetError
from ..iscsi.directory import AccessRule, ChapSecret
from ..iscsi.names import IscsiNameError, normalize_name
from ..scsi import LogicalUnit
from ..scsi.sense import Reason, ScsiError

#: RFC 7143 §12.1.3: CHAP secrets "SHOULD be at least 96 bits" (12 bytes) long.
MIN_SECRET_BYTES = 12
#: RFC 1994 secrets are at most what CHAP_C/CHAP_R may carry; we cap at 255 bytes.
MAX_SECRET_BYTES = 255
#: The LUNs flat and peripheral addressing reach (SAM-5 §4.7.7.4).
MAX_LUN = 16383
#: ``hypervisor``: the guest disks plus the VM's state and config LUNs (.hypervisor_view)
VIEWS = ("guest", "raw", "hypervisor")
_NAME_PREFIXES = ("iqn.", "eui.", "naa.")


class AclError(IscsiVmtargetError, ValueError):
    """An ACL, LUN map or secret the configuration must refuse; says what and why."""


# -- validation ------------------------------------------------------------------------


def check_initiator(name: str) -> str:
    """An initiator name in its RFC 3722 normal form, the form login compares with
    (:mod:`iscsi_vmtarget.iscsi.names`): ``IQN.X`` is stored as ``iqn.x``; a name with
    white space, excluded characters or a malformed eui./naa. form is refused."""
    try:
        return normalize_name(name)
    except IscsiNameError as exc:
        raise AclError(f"initiator {name!r} {exc}") from exc


def check_name(name: str, what: str = "target") -> str:
    """A target name (RFC 7143 §4.2.7.1: iqn., eui. or naa. form), lowercased. Looser
    than :func:`check_initiator`: VM targets carry VM names, and a stored target name
    must keep loading."""
    if not name or not name.lower().startswith(_NAME_PREFIXES) or len(name.encode()) > 223:
        raise AclError(f"{what} {name!r} is not an iSCSI name (iqn.*, eui.* or naa.*)")
    if any(c.isspace() or ord(c) < 0x20 for c in name):
        raise AclError(f"{what} {name!r} contains white space or control characters")
    return name.lower()


def check_secret(chap: ChapSecret | None, where: str) -> ChapSecret | None:
    """Refuse a CHAP secret shorter than 96 bits (RFC 7143 §12.1.3) or an empty user."""
    if chap is None:
        return None
    if not chap.user:
        raise AclError(f"{where}: CHAP user name is empty")
    if len(chap.secret) < MIN_SECRET_BYTES:
        raise AclError(
            f"{where}: CHAP secret of user {chap.user!r} is {len(chap.secret)} bytes; "
            f"RFC 7143 §12.1.3 asks for at least {MIN_SECRET_BYTES} bytes (96 bits)"
        )
    if len(chap.secret) > MAX_SECRET_BYTES:
        raise AclError(f"{where}: CHAP secret longer than {MAX_SECRET_BYTES} bytes")
    return chap


def check_mutual(chap: ChapSecret | None, mutual: ChapSecret | None, where: str) -> None:
    """Mutual CHAP needs one-way CHAP, and the two secrets must differ (§12.1.3:
    the same secret both ways would let a reflection attack succeed)."""
    if mutual is not None and chap is not None and mutual.secret == chap.secret:
        raise AclError(f"{where}: the mutual CHAP secret must differ from the CHAP secret")


def check_network(text: str) -> str:
    """A source rule: an address or CIDR network; normalized (``10.0.0.0/24``)."""
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError as exc:
        raise AclError(f"source {text!r} is not an address or network: {exc}") from exc


def chap_to_dict(chap: ChapSecret | None) -> dict[str, str] | None:
    return None if chap is None else {"user": chap.user, "secret": chap.secret.decode()}


def chap_from_dict(doc: Any, where: str) -> ChapSecret | None:
    if doc is None:
        return None
    if not isinstance(doc, dict) or "user" not in doc or "secret" not in doc:
        raise AclError(f"{where}: needs 'user' and 'secret'")
    return check_secret(ChapSecret(str(doc["user"]), str(doc["secret"]).encode()), where)


# -- the model -------------------------------------------------------------------------


@dataclass(frozen=True)
class MappedLun:
    """The target's LUN ``target_lun`` shown to one initiator as LUN ``number``."""

    number: int
    target_lun: int
    read_only: bool = False
    view: str = "guest"

    def __post_init__(self) -> None:
        for what, n in (("LUN", self.number), ("target LUN", self.target_lun)):
            if not 0 <= n <= MAX_LUN:
                raise AclError(f"{what} {n} is out of range 0..{MAX_LUN}")
        if self.view not in VIEWS:
            raise AclError(f"view {self.view!r} is not one of {', '.join(VIEWS)}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "lun": self.target_lun,
            "read_only": self.read_only,
            "view": self.view,
        }

    @classmethod
    def from_dict(cls, doc: Any) -> MappedLun:
        if isinstance(doc, int):  # shorthand: the target's LUN under its own number
            return cls(doc, doc)
        if not isinstance(doc, dict) or ("number" not in doc and "lun" not in doc):
            raise AclError(f"mapped LUN {doc!r} needs 'number' and/or 'lun'")
        number = int(doc.get("number", doc.get("lun")))
        return cls(
            number,
            int(doc.get("lun", number)),
            bool(doc.get("read_only", False)),
            str(doc.get("view", "guest")),
        )


@dataclass(frozen=True)
class Acl:
    """One node ACL: an initiator, where it may come from, its secrets, its LUNs.

    ``luns`` None maps every LUN of the target under its own number (and follows the
    target as LUNs come and go); ``read_only`` and ``view`` then apply to all of them.
    """

    initiator: str
    sources: tuple[str, ...] = ()
    luns: tuple[MappedLun, ...] | None = None
    chap: ChapSecret | None = None
    mutual_chap: ChapSecret | None = None
    read_only: bool = False
    view: str = "guest"

    def __post_init__(self) -> None:
        where = f"ACL {self.initiator}"
        object.__setattr__(self, "initiator", check_initiator(self.initiator))
        object.__setattr__(self, "sources", tuple(check_network(s) for s in self.sources))
        check_secret(self.chap, where)
        check_secret(self.mutual_chap, where)
        check_mutual(self.chap, self.mutual_chap, where)
        if self.view not in VIEWS:
            raise AclError(f"{where}: view {self.view!r} is not one of {', '.join(VIEWS)}")
        if self.luns is not None:
            numbers = [m.number for m in self.luns]
            if len(set(numbers)) != len(numbers):
                raise AclError(f"{where}: a LUN number is mapped twice")
            object.__setattr__(self, "luns", tuple(sorted(self.luns, key=lambda m: m.number)))

    @property
    def key(self) -> str:
        return self.initiator

    def rule(self) -> AccessRule:
        """What login and SendTargets see of this ACL."""
        return AccessRule(self.initiator, self.sources, self.chap, self.mutual_chap)

    def mapped(self, target_luns: Mapping[int, object]) -> list[MappedLun]:
        """The mapped LUNs in force, given the LUN numbers the target has."""
        if self.luns is None:
            return [MappedLun(n, n, self.read_only, self.view) for n in sorted(target_luns)]
        return [m for m in self.luns if m.target_lun in target_luns]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"initiator": self.initiator}
        if self.sources:
            out["sources"] = list(self.sources)
        if self.luns is not None:
            out["luns"] = [m.to_dict() for m in self.luns]
        else:
            out["read_only"] = self.read_only
            out["view"] = self.view
        if self.chap is not None:
            out["chap"] = chap_to_dict(self.chap)
        if self.mutual_chap is not None:
            out["mutual_chap"] = chap_to_dict(self.mutual_chap)
        return out

    @classmethod
    def from_dict(cls, doc: Any, where: str = "ACL") -> Acl:
        if not isinstance(doc, dict) or "initiator" not in doc:
            raise AclError(f"{where}: needs 'initiator'")
        where = f"{where} {doc['initiator']}"
        luns = doc.get("luns")
        sources = doc.get("sources", doc.get("source", ()))
        if isinstance(sources, str):
            sources = (sources,)
        return cls(
            initiator=str(doc["initiator"]),
            sources=tuple(str(s) for s in sources),
            luns=None if luns is None else tuple(MappedLun.from_dict(m) for m in luns),
            chap=chap_from_dict(doc.get("chap"), f"{where} chap"),
            mutual_chap=chap_from_dict(doc.get("mutual_chap"), f"{where} mutual_chap"),
            read_only=bool(doc.get("read_only", False)),
            view=str(doc.get("view", "guest")),
        )


def parse_lun_list(text: str) -> tuple[MappedLun, ...]:
    """The CLI's ``--luns`` value: ``0,1`` maps target LUNs 0 and 1 under their own
    numbers, ``5=2`` shows target LUN 2 as LUN 5; a ``:ro`` suffix makes one read-only
    (``0,1=3:ro``)."""
    out: list[MappedLun] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        item, _, flag = item.partition(":")
        if flag not in ("", "ro", "rw"):
            raise AclError(f"--luns item {item}:{flag}: the suffix is :ro or :rw")
        number, _, target = item.partition("=")
        try:
            shown = int(number)
            out.append(MappedLun(shown, int(target) if target else shown, flag == "ro"))
        except ValueError as exc:
            raise AclError(f"--luns item {item!r}: {exc}") from exc
    return tuple(out)


# -- the SCSI side ---------------------------------------------------------------------


class ReadOnlyUnit:
    """A logical unit shown read-only through one mapping.

    Everything but write protection is the shared unit's own (identity, mode pages,
    unit attentions, persistent reservations, range locks): the object delegates
    attribute access to it. Writes get DATA PROTECT, WRITE PROTECTED (27h/00h,
    SBC-3 §4.11) and MODE SENSE reports WP (SBC-3 §6.4.1).
    """

    read_only = True
    write_protected = True

    def __init__(self, unit: LogicalUnit) -> None:
        self._unit = unit

    @property
    def shared(self) -> LogicalUnit:
        return self._unit

    def check_writable(self) -> None:
        raise ScsiError(Reason.WRITE_PROTECTED)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._unit, name)


def check_unique_designators(luns: Mapping[int, LogicalUnit], who: str) -> None:
    """Refuse a LUN map in which two LUNs report one designator (VPD 0x83).

    Linux dm-multipath merges two LUNs with the same identity into one device and
    EXTENDED COPY finds LUNs by designator, so one initiator must never be shown two
    LUNs with one designator - e.g. a guest view of a reverted snapshot (which keeps
    the original volume's designator, US 9,354,927) beside the original. AclError says which.
    """
    seen: dict[bytes, int] = {}
    for number in sorted(luns):
        identity = getattr(luns[number], "identity", None)
        naa = getattr(identity, "naa", None)
        if not isinstance(naa, bytes):
            continue
        if naa in seen:
            raise AclError(
                f"{who} would see LUN {seen[naa]} and LUN {number} with the same designator "
                f"naa.{naa.hex()} (VPD 0x83): refused, an initiator must never see two LUNs "
                "with one identity (multipath would merge them)"
            )
        seen[naa] = number


def build_lun_map(
    target_luns: Mapping[int, LogicalUnit],
    acl: Acl | None,
    raw_luns: Mapping[int, LogicalUnit] | None = None,
    region_luns: Mapping[int, LogicalUnit] | None = None,
) -> dict[int, LogicalUnit]:
    """The LUNs one initiator sees: mapped number -> the target's shared unit (or its
    raw view from ``raw_luns``, or a read-only stand-in). ``acl`` None: all of them,
    never the ``region_luns`` (a VM's state and config LUNs), which only an ACL with
    a ``hypervisor`` view gets, under their own numbers."""
    if acl is None:
        return dict(target_luns)
    out: dict[int, LogicalUnit] = {}
    mapped = acl.mapped(target_luns)
    if region_luns and (acl.view == "hypervisor" or any(m.view == "hypervisor" for m in mapped)):
        for number, region in region_luns.items():
            if any(m.number == number for m in mapped):
                raise AclError(
                    f"initiator {acl.initiator}: LUN {number} is the VM's "
                    f"{'state' if number == min(region_luns) else 'config'} LUN in the "
                    "hypervisor view; map the disk under another number"
                )
            read_only = acl.read_only or any(m.read_only for m in mapped)
            out[number] = cast(LogicalUnit, ReadOnlyUnit(region)) if read_only else region
    for m in mapped:
        unit = target_luns[m.target_lun]
        if m.view == "raw" and raw_luns is not None:
            # a LUN that is no VM unit has no hidden region: its raw view is itself
            unit = raw_luns.get(m.target_lun, unit)
        if m.read_only and not unit.read_only:
            unit = cast(LogicalUnit, ReadOnlyUnit(unit))
        out[m.number] = unit
    check_unique_designators(out, f"initiator {acl.initiator}")
    return out
