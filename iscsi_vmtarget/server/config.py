"""Serve configuration: the TOML reader (``conf/target.example.toml``) of the
configuration model (:mod:`.model`: targets, LUNs, ACLs, portals, CHAP), with the
daemon's own settings (:class:`ServeConfig`), and the registry built from it.

Only what the operator wrote is used; nothing is created unless a LUN names a
``size`` for a file that does not exist yet, and an existing file is never truncated.

Besides the configured targets, every VM that discovery finds in the pools of the
state directory is exported as ``<BASE_IQN>:vm.<name>`` (``export_vms = false``
turns that off); the no-config default also provisions the demo VM ``demo``.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import IscsiVmtargetError
from ..iscsi.directory import ChapSecret, Portal, TargetEntry
from ..iscsi.params import TargetPreferences
from ..scsi import LogicalUnit, ScsiTarget
from ..vm import VmError
from .hypervisor_view import attach_regions
from .masking import Acl, check_mutual, check_secret
from .model import LunError, LunSpec, TargetSpec, open_lun, parse_portal
from .registry import Registry, Target
from .vm_luns import VmLuns, vm_target_name
from .vm_startup import DEMO_VM, serve_vms

BASE_IQN = "iqn.2026-11.org.iscsi-vmtarget"
DEFAULT_PORTAL = "127.0.0.1:3260"
DEMO_SIZE = 1 << 30


class ConfigError(IscsiVmtargetError):
    """A configuration problem, phrased for the operator."""


@dataclass
class ServeConfig:
    state_dir: str = "./var/iscsi-vmtarget"
    portals: list[Portal] = field(default_factory=list)
    targets: list[TargetSpec] = field(default_factory=list)
    discovery_chap: ChapSecret | None = None
    discovery_mutual_chap: ChapSecret | None = None
    nop_interval: float = 30.0
    negotiation: TargetPreferences = field(default_factory=lambda: TargetPreferences(**_WINDOW))
    export_vms: bool = True  # export every VM found in the pools of state_dir
    demo_vm: bool = False  # provision the VM "demo" first if it does not exist


# Commands an initiator may have outstanding (MaxCmdSN - ExpCmdSN + 1, RFC 7143 §4.2.2.1).
_WINDOW = {"cmdsn_window": 128}
_NEGOTIATION_KEYS = {
    "max_recv_data_segment_length": int,
    "max_burst_length": int,
    "first_burst_length": int,
    "max_outstanding_r2t": int,
    "immediate_data": bool,
    "initial_r2t": bool,
    "default_time2wait": int,
    "default_time2retain": int,
    "header_digests": tuple,
    "data_digests": tuple,
    "cmdsn_window": int,
}


def _negotiation(section: dict[str, Any]) -> TargetPreferences:
    """The ``[negotiation]`` table: what the target accepts in login (RFC 7143 §13)."""
    values: dict[str, Any] = dict(_WINDOW)
    for key, value in section.items():
        kind = _NEGOTIATION_KEYS.get(key)
        if kind is None:
            raise ValueError(
                f"[negotiation] has no key {key!r} (known: {sorted(_NEGOTIATION_KEYS)})"
            )
        if kind is tuple:
            value = (value,) if isinstance(value, str) else tuple(value)
        elif not isinstance(value, kind):
            raise ValueError(f"[negotiation] {key} must be {kind.__name__}")
        values[key] = value
    return TargetPreferences(**values)


def _chap(section: Any, where: str) -> ChapSecret | None:
    if section is None:
        return None
    try:
        chap = ChapSecret(str(section["user"]), str(section["secret"]).encode())
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"{where}: needs 'user' and 'secret'") from exc
    return check_secret(chap, where)  # RFC 7143 §12.1.3: at least 96 bits


def load_config(path: str) -> ServeConfig:
    """Read a TOML serve configuration; ConfigError names the file and the key."""
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path!r}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path!r} is not valid TOML: {exc}") from exc
    base = os.path.dirname(os.path.abspath(path))
    cfg = ServeConfig()
    try:
        cfg.state_dir = str(doc.get("state_dir", cfg.state_dir))
        cfg.nop_interval = float(doc.get("nop_interval", cfg.nop_interval))
        cfg.export_vms = bool(doc.get("export_vms", cfg.export_vms))
        cfg.negotiation = _negotiation(doc.get("negotiation", {}))
        cfg.portals = [
            parse_portal(str(p["listen"]), int(p.get("tpgt", 1))) for p in doc.get("portal", [])
        ]
        cfg.discovery_chap = _chap(doc.get("discovery", {}).get("chap"), "discovery.chap")
        cfg.discovery_mutual_chap = _chap(
            doc.get("discovery", {}).get("mutual_chap"), "discovery.mutual_chap"
        )
        check_mutual(cfg.discovery_chap, cfg.discovery_mutual_chap, "discovery")
        cfg.targets = [_target(t, base) for t in doc.get("target", [])]
    except KeyError as exc:
        raise ConfigError(f"config {path!r}: missing key {exc}") from exc
    except ValueError as exc:
        raise ConfigError(f"config {path!r}: {exc}") from exc
    return cfg


def _target(t: dict[str, Any], base: str) -> TargetSpec:
    """A ``[[target]]`` table with its ``[[target.lun]]`` and ``[[target.acl]]`` tables.
    Unlike the managed JSON (:meth:`TargetSpec.from_dict`), LUNs and ACLs stay in the
    file's order: a LUN number given twice is refused when the registry is built."""
    spec = TargetSpec(
        name=str(t["name"]),
        alias=t.get("alias"),
        tpgt=int(t.get("tpgt", 1)),
        chap=_chap(t.get("chap"), f"target {t['name']}.chap"),
        mutual_chap=_chap(t.get("mutual_chap"), f"target {t['name']}.mutual_chap"),
        initiators=tuple(str(i) for i in t.get("initiators", [])),
        acls=tuple(Acl.from_dict(a, f"target {t['name']} acl") for a in t.get("acl", [])),
        allow_all=bool(t.get("allow_all", False)),
    )
    check_mutual(spec.chap, spec.mutual_chap, f"target {spec.name}")
    luns = [LunSpec.from_dict(lun, base) for lun in t.get("lun", [])]
    return replace(spec, luns=tuple(luns))


def demo_config(state_dir: str) -> ServeConfig:
    """The no-config default: one 1 GiB sparse LUN in the default pool, and the demo
    VM (a 1 GiB disk, 256 MiB of state) exported as ``<BASE_IQN>:vm.demo``. Both are
    open to any initiator, visibly (``allow_all``, shown by ``target list`` and ``acl
    list``); every other VM is denied by default (:mod:`.grants`)."""
    pool = os.path.join(state_dir, "pools", "default")
    return ServeConfig(
        state_dir=state_dir,
        targets=[
            TargetSpec(
                name=f"{BASE_IQN}:demo",
                alias="demo",
                luns=(LunSpec(0, os.path.join(pool, "demo-lun0.img"), DEMO_SIZE),),
                allow_all=True,
            )
        ],
        demo_vm=True,
    )


def build_registry(cfg: ServeConfig) -> Registry:
    """Open every LUN and build the runtime registry; ConfigError on any problem."""
    registry = Registry(
        portals=list(cfg.portals) or [parse_portal(DEFAULT_PORTAL)],
        discovery_auth=cfg.discovery_chap,
        discovery_mutual=cfg.discovery_mutual_chap,
    )
    opened: list[LogicalUnit] = []
    try:
        for t in cfg.targets:
            luns: dict[int, LogicalUnit] = {}
            for lun in t.luns:
                if lun.number in luns:
                    raise ConfigError(f"target {t.name}: LUN {lun.number} defined twice")
                try:
                    luns[lun.number] = open_lun(t.name, lun, t.tpgt)
                except LunError as exc:
                    raise ConfigError(str(exc)) from exc
                opened.append(luns[lun.number])
            entry = TargetEntry(
                name=t.name,
                alias=t.alias,
                tpgt=t.tpgt,
                chap=t.chap,
                mutual_chap=t.mutual_chap,
                initiators=frozenset(i.lower() for i in t.initiators),
            )
            try:
                acls = {a.key: a for a in t.acls}
                registry.add_target(Target(entry, ScsiTarget(luns), acls, t.allow_all))
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc
        if cfg.export_vms or cfg.demo_vm:
            _add_vms(cfg, registry, opened)
    except ConfigError:
        for lu in opened:
            lu.backend.close()
        raise
    return registry


def _add_vms(cfg: ServeConfig, registry: Registry, opened: list[LogicalUnit]) -> None:
    """One target per VM: LUN 0 the primary disk, LUN n its n-th secondary disk, each a
    guest view of its unit (the VM layer, :mod:`iscsi_vmtarget.vm`); an ACL with
    ``view = "raw"`` gets the read-only raw views instead."""
    try:
        exports = serve_vms(cfg.state_dir, demo=cfg.demo_vm)
    except VmError as exc:
        raise ConfigError(f"VMs in {cfg.state_dir!r}: {exc}") from exc
    for vm in exports:
        opened.extend([*vm.guest.values(), *vm.raw.values()])
    attach_regions(cfg.state_dir, exports)
    for vm in exports:
        opened.extend(vm.regions.values())
    for vm in exports:
        try:
            # the no-config demo VM is open to anyone, visibly; its other exports are not
            registry.add_target(vm_target(vm, allow_all=cfg.demo_vm and vm.name == DEMO_VM))
        except ValueError as exc:
            raise ConfigError(f"VM {vm.name!r}: {exc}") from exc


def vm_target(vm: VmLuns, *, allow_all: bool = False) -> Target:
    """The target of a VM (or of an export derived from it: ``NAME.snap.SNAP``...).

    Denied to every initiator by default (``deny_by_default``): the VM's grants,
    keyed by ``vm.vm_uuid``, open it when the daemon applies its managed
    configuration (:meth:`.runtime.Runtime.set_access`, :mod:`.grants`)."""
    entry = TargetEntry(
        name=vm_target_name(vm.name, BASE_IQN), alias=f"vm.{vm.name}", deny_by_default=True
    )
    return Target(
        entry,
        ScsiTarget(vm.guest),
        allow_all=allow_all,
        origin="vm",
        raw_luns=vm.raw,
        region_luns=vm.regions,
        disks=vm.disks,
        vm_uuid=vm.vm_uuid,
    )
