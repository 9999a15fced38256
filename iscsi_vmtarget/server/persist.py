"""The persisted management configuration and its atomic store: the JSON reader and
writer of the configuration model (:mod:`.model`: targets, LUNs, ACLs, portals, CHAP).

``<state-dir>/conf/config.json`` (mode 0600: it holds CHAP secrets; the directory is
0700) is the source of truth for everything made with the management commands:
targets with their LUNs, ACLs with their mapped LUNs and secrets, portals, discovery
CHAP. It is JSON (one document, ``version`` 1)::

    {"version": 1,
     "portals": [{"listen": "127.0.0.1:3260", "tpgt": 1}],
     "discovery": {"chap": {"user": "u", "secret": "..."}, "mutual_chap": null},
     "targets": [{"name": "iqn...:db", "alias": null, "tpgt": 1, "allow_all": false,
                  "chap": null, "mutual_chap": null,
                  "luns": [{"number": 0, "path": "/srv/db.img", "size": 1073741824,
                            "read_only": false, "block_size": 512}],
                  "acls": [{"initiator": "iqn...:host1", "sources": ["10.0.0.0/24"],
                            "luns": [{"number": 0, "lun": 0, "read_only": false,
                                      "view": "guest"}],
                            "chap": {"user": "host1", "secret": "..."}}]}]}

A target entry named like a target the server defines elsewhere (``serve --config``
TOML, the demo target, a VM found in a pool) carries no LUNs: its ACLs are added to
the ones from that source (an ACL of the same initiator replaces the source's), its
CHAP secrets replace the source's, and its ``allow_all`` can only turn demo mode on.

Who may see a VM is kept apart from its targets, with the VM, keyed by its identity
(the base unit's UUID, which snapshot, revert, resize and move keep): ``vms`` holds
one :class:`VmGrants` per VM (its name only for display), ``default_grants`` the ACLs
that apply to every VM of the state directory (:mod:`.grants`)::

    "vms": [{"uuid": "6f1c...", "name": "web", "allow_all": false,
             "grants": [{"initiator": "iqn...:host1", "view": "guest", ...}]}],
    "default_grants": [{"initiator": "iqn...:hypervisor1"}]

A document without these keys (written before them) loads with none.

Every write goes to a temporary file in the same directory, is fsynced, renamed over
the old file and the directory is fsynced, so a crash leaves the old or the new
document, never a mix. Writers (the daemon, or the CLI when no daemon runs) hold an
exclusive ``flock`` on ``conf/.lock`` across read-modify-write.
"""

from __future__ import annotations

import contextlib
import json
import os
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from ..errors import IscsiVmtargetError
from ..iscsi.directory import ChapSecret, Portal
from ..storage import atomic_file
from .masking import Acl, AclError, chap_from_dict, chap_to_dict, check_mutual
from .model import TargetSpec, acl_list, parse_portal, portal_text

VERSION = 1
CONF_DIR = "conf"
CONF_FILE = "config.json"


class PersistError(IscsiVmtargetError):
    """A configuration document that cannot be read or is invalid; says where."""


@dataclass(frozen=True)
class VmGrants:
    """Who may see one VM, in every export derived from it (:mod:`.grants`): its
    ``grants`` (ACLs: initiator, sources, CHAP, view, read-only, LUN map) and
    ``allow_all`` (any initiator, every LUN). Keyed by ``uuid``, the VM's base unit
    UUID; ``name`` is the VM's name when the grant was last changed, for display."""

    uuid: uuid.UUID
    name: str
    allow_all: bool = False
    grants: tuple[Acl, ...] = ()

    def grant(self, initiator: str) -> Acl | None:
        return next((a for a in self.grants if a.key == initiator.lower()), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "uuid": str(self.uuid),
            "name": self.name,
            "allow_all": self.allow_all,
            "grants": [a.to_dict() for a in self.grants],
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> VmGrants:
        try:
            key = uuid.UUID(str(doc["uuid"]))
        except ValueError as exc:
            raise AclError(f"vm grants: {doc['uuid']!r} is not a UUID") from exc
        name = str(doc.get("name") or key)
        return cls(
            key,
            name,
            bool(doc.get("allow_all", False)),
            acl_list(doc.get("grants"), f"grants of VM {name}"),
        )


@dataclass(frozen=True)
class ManagedConfig:
    """The whole persisted document."""

    targets: tuple[TargetSpec, ...] = ()
    portals: tuple[Portal, ...] = ()
    discovery_chap: ChapSecret | None = None
    discovery_mutual_chap: ChapSecret | None = None
    vms: tuple[VmGrants, ...] = ()
    default_grants: tuple[Acl, ...] = ()

    def target(self, name: str) -> TargetSpec | None:
        return next((t for t in self.targets if t.key == name.lower()), None)

    def vm(self, key: uuid.UUID) -> VmGrants | None:
        return next((v for v in self.vms if v.uuid == key), None)

    def with_vm(self, record: VmGrants) -> ManagedConfig:
        """This document with ``record`` added or replacing the VM's record; a record
        that grants nothing is dropped (nothing to keep)."""
        others = [v for v in self.vms if v.uuid != record.uuid]
        if record.grants or record.allow_all:
            others.append(record)
        return replace(self, vms=tuple(sorted(others, key=lambda v: (v.name, str(v.uuid)))))

    def with_target(self, spec: TargetSpec) -> ManagedConfig:
        """This document with ``spec`` added or replacing the target of its name."""
        others = [t for t in self.targets if t.key != spec.key]
        return replace(self, targets=tuple(sorted([*others, spec], key=lambda t: t.key)))

    def without_target(self, name: str) -> ManagedConfig:
        return replace(self, targets=tuple(t for t in self.targets if t.key != name.lower()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "portals": [{"listen": portal_text(p), "tpgt": p.tpgt} for p in self.portals],
            "discovery": {
                "chap": chap_to_dict(self.discovery_chap),
                "mutual_chap": chap_to_dict(self.discovery_mutual_chap),
            },
            "targets": [t.to_dict() for t in self.targets],
            "vms": [v.to_dict() for v in self.vms],
            "default_grants": [a.to_dict() for a in self.default_grants],
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any], base: str = ".") -> ManagedConfig:
        if not isinstance(doc, dict):
            raise PersistError("the configuration is not a JSON object / TOML table")
        if int(doc.get("version", VERSION)) > VERSION:
            raise PersistError(f"configuration version {doc['version']} is newer than {VERSION}")
        try:
            portals = tuple(
                parse_portal(str(p["listen"]), int(p.get("tpgt", 1)))
                for p in doc.get("portals", doc.get("portal", []))
            )
            disco = doc.get("discovery") or {}
            chap = chap_from_dict(disco.get("chap"), "discovery chap")
            mutual = chap_from_dict(disco.get("mutual_chap"), "discovery mutual_chap")
            check_mutual(chap, mutual, "discovery")
            listed = doc.get("targets", doc.get("target", []))
            targets = [TargetSpec.from_dict(t, base) for t in listed]
            vms = [VmGrants.from_dict(v) for v in doc.get("vms", ())]
            defaults = acl_list(doc.get("default_grants"), "default grants")
        except (KeyError, TypeError) as exc:
            raise PersistError(f"missing or malformed key {exc}") from exc
        except ValueError as exc:
            raise PersistError(str(exc)) from exc
        if len({t.key for t in targets}) != len(targets):
            raise PersistError("a target is defined twice")
        if len({v.uuid for v in vms}) != len(vms):
            raise PersistError("the grants of one VM are defined twice")
        return cls(
            targets=tuple(sorted(targets, key=lambda t: t.key)),
            portals=portals,
            discovery_chap=chap,
            discovery_mutual_chap=mutual,
            vms=tuple(sorted(vms, key=lambda v: (v.name, str(v.uuid)))),
            default_grants=defaults,
        )


def read_document(path: str) -> dict[str, Any]:
    """A configuration file for ``config apply``, validated, paths resolved: JSON, or
    TOML when it ends in ``.toml`` (the same keys; TOML's ``[[target]]``/
    ``[[target.lun]]``/``[[target.acl]]`` tables are accepted as in the serve
    configuration). A file without ``vms``/``default_grants`` (written before grants)
    yields a document without them, so applying it keeps the grants in force."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
        doc = tomllib.loads(raw.decode()) if path.endswith(".toml") else json.loads(raw)
    except OSError as exc:
        raise PersistError(f"cannot read {path!r}: {exc.strerror}") from exc
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        kind = "TOML" if path.endswith(".toml") else "JSON"
        raise PersistError(f"{path!r} is not valid {kind}: {exc}") from exc
    try:
        out = ManagedConfig.from_dict(doc, os.path.dirname(os.path.abspath(path))).to_dict()
    except PersistError as exc:
        raise PersistError(f"{path!r}: {exc}") from exc
    return {k: v for k, v in out.items() if k not in ("vms", "default_grants") or k in doc}


# -- differences ------------------------------------------------------------------------


def _redacted(doc: Any) -> Any:
    """A document for display: CHAP secrets replaced by their length."""
    if isinstance(doc, dict):
        return {
            k: (f"<{len(v)} bytes>" if k == "secret" and isinstance(v, str) else _redacted(v))
            for k, v in doc.items()
        }
    if isinstance(doc, list):
        return [_redacted(v) for v in doc]
    return doc


def redacted(cfg: ManagedConfig) -> dict[str, Any]:
    return _redacted(cfg.to_dict())  # type: ignore[no-any-return]


def diff(old: ManagedConfig, new: ManagedConfig) -> list[str]:
    """What applying ``new`` over ``old`` changes, one line each (``+`` added, ``-``
    removed, ``~`` changed), secrets never shown. Empty: nothing to do."""
    out: list[str] = []
    old_p = {(p.host, p.port): p for p in old.portals}
    new_p = {(p.host, p.port): p for p in new.portals}
    out += [f"- portal {portal_text(p)}" for k, p in old_p.items() if k not in new_p]
    out += [f"+ portal {portal_text(p)}" for k, p in new_p.items() if k not in old_p]
    out += [f"~ portal {portal_text(p)}" for k, p in new_p.items() if k in old_p and old_p[k] != p]
    if (old.discovery_chap, old.discovery_mutual_chap) != (
        new.discovery_chap,
        new.discovery_mutual_chap,
    ):
        out.append("~ discovery chap")
    out += _acls_diff(old.default_grants, new.default_grants, "default grant")
    old_v = {v.uuid: v for v in old.vms}
    new_v = {v.uuid: v for v in new.vms}
    for key in sorted(old_v.keys() | new_v.keys(), key=str):
        was, now = old_v.get(key), new_v.get(key)
        name = (now or was).name  # type: ignore[union-attr]
        if (was.allow_all if was else False) != (now.allow_all if now else False):
            out.append(f"~ vm {name} allow_all={bool(now and now.allow_all)!r}")
        out += _acls_diff(was.grants if was else (), now.grants if now else (), f"grant {name}")
    olds = {t.key: t for t in old.targets}
    news = {t.key: t for t in new.targets}
    for key, t in olds.items():
        if key not in news:
            out.append(f"- target {t.name}")
    for key, t in news.items():
        before = olds.get(key)
        if before is None:
            out.append(f"+ target {t.name}")
            before = TargetSpec(t.name)
        out += _target_diff(before, t)
    return out


def _target_diff(old: TargetSpec, new: TargetSpec) -> list[str]:
    out: list[str] = []
    name = new.name
    for attr in ("alias", "tpgt", "allow_all", "initiators"):
        if getattr(old, attr) != getattr(new, attr):
            out.append(f"~ target {name} {attr}={getattr(new, attr)!r}")
    if (old.chap, old.mutual_chap) != (new.chap, new.mutual_chap):
        out.append(f"~ target {name} chap")
    old_l = {lun.number: lun for lun in old.luns}
    new_l = {lun.number: lun for lun in new.luns}
    for n in sorted(old_l.keys() | new_l.keys()):
        a, b = old_l.get(n), new_l.get(n)
        if a == b:
            continue
        sign = "+" if a is None else "-" if b is None else "~"
        out.append(f"{sign} lun {name} {n} {(b or a).path}")  # type: ignore[union-attr]
    return out + _acls_diff(old.acls, new.acls, f"acl {name}")


def _acls_diff(old: tuple[Acl, ...], new: tuple[Acl, ...], what: str) -> list[str]:
    """``+``/``-``/``~ WHAT INITIATOR`` per ACL added, removed or changed."""
    out: list[str] = []
    old_a = {a.key: a for a in old}
    new_a = {a.key: a for a in new}
    for k in sorted(old_a.keys() | new_a.keys()):
        x, y = old_a.get(k), new_a.get(k)
        if x == y:
            continue
        sign = "+" if x is None else "-" if y is None else "~"
        out.append(f"{sign} {what} {k}")
    return out


# -- the store ---------------------------------------------------------------------------


class ConfigStore:
    """``<state-dir>/conf/config.json``, read and written atomically."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.dir = os.path.join(state_dir, CONF_DIR)
        self.path = os.path.join(self.dir, CONF_FILE)

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def load(self) -> ManagedConfig:
        """The persisted document; an empty one if there is none yet."""
        try:
            with open(self.path, "rb") as fh:
                doc = json.load(fh)
        except FileNotFoundError:
            return ManagedConfig()
        except (OSError, ValueError) as exc:
            raise PersistError(f"cannot read {self.path!r}: {exc}") from exc
        try:
            return ManagedConfig.from_dict(doc, self.dir)
        except PersistError as exc:
            raise PersistError(f"{self.path!r}: {exc}") from exc

    def save(self, cfg: ManagedConfig) -> None:
        """Write ``cfg`` crash-atomically (:mod:`~iscsi_vmtarget.storage.atomic_file`,
        a fresh hidden temporary, mode 0600)."""
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        data = (json.dumps(cfg.to_dict(), indent=2, sort_keys=False) + "\n").encode()
        atomic_file.write_file(self.path, data, mode=0o600)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive across processes for a read-modify-write."""
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        with atomic_file.locked(os.path.join(self.dir, ".lock")):
            yield


__all__ = [
    "ConfigStore",
    "ManagedConfig",
    "PersistError",
    "VmGrants",
    "diff",
    "read_document",
    "redacted",
]
