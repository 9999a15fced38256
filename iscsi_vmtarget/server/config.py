"""Serve configuration: a typed model loaded from TOML (``conf/target.example.toml``).

Only what the operator wrote is used; nothing is created unless a LUN names a
``size`` for a file that does not exist yet, and an existing file is never truncated.

Besides the configured targets, every VM that discovery finds in the pools of the
state directory is exported as ``<BASE_IQN>:vm.<name>`` (``export_vms = false``
turns that off); the no-config default also provisions the demo VM ``demo``.
"""

from __future__ import annotations

import os
import time
import tomllib
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..iscsi.directory import ChapSecret, Portal, TargetEntry
from ..iscsi.params import TargetPreferences
from ..scsi import LogicalUnit, ScsiTarget, UnitIdentity
from ..sizes import parse_size
from ..storage import BackendError, FileBackend, create_sparse_file
from ..vm import VmError, VmLuns, serve_vms, vm_target_name
from ..vm.export import DEMO_VM
from .acl import Acl, check_mutual, check_secret
from .registry import Registry, Target

BASE_IQN = "iqn.2026-11.org.iscsi-vmtarget"
DEFAULT_PORTAL = "127.0.0.1:3260"
DEMO_SIZE = 1 << 30
_ID_NAMESPACE = uuid.UUID("5b0e1c52-8f6e-4d0a-9d3e-2f1f3c6a7b10")


class ConfigError(Exception):
    """A configuration problem, phrased for the operator."""


@dataclass
class LunConfig:
    number: int
    path: str
    size: int | None = None
    read_only: bool = False
    block_size: int = 512
    serial: str | None = None
    provisioning: str = "thin"  # "thin": UNMAP punches holes; "thick": UNMAP zeroes in place


@dataclass
class TargetConfig:
    name: str
    alias: str | None = None
    tpgt: int = 1
    luns: list[LunConfig] = field(default_factory=list)
    chap: ChapSecret | None = None
    mutual_chap: ChapSecret | None = None
    initiators: list[str] = field(default_factory=list)
    acls: list[Acl] = field(default_factory=list)  # [[target.acl]] (server/acl.py)
    allow_all: bool = False  # demo mode: initiators without an ACL see every LUN


@dataclass
class ServeConfig:
    state_dir: str = "./var/iscsi-vmtarget"
    portals: list[Portal] = field(default_factory=list)
    targets: list[TargetConfig] = field(default_factory=list)
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


def parse_portal(text: str, tpgt: int = 1) -> Portal:
    """``HOST:PORT`` or ``[V6]:PORT`` -> :class:`Portal`; ValueError naming the problem."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"portal {text!r} is not HOST:PORT")
    host = host.strip("[]")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"portal {text!r} has a bad port")
    return Portal(host, int(port), tpgt)


def _chap(section: Any, where: str) -> ChapSecret | None:
    if section is None:
        return None
    try:
        chap = ChapSecret(str(section["user"]), str(section["secret"]).encode())
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"{where}: needs 'user' and 'secret'") from exc
    return check_secret(chap, where)  # RFC 7143 §12.1.3: at least 96 bits


def _provisioning(value: Any) -> str:
    if value not in ("thin", "thick"):
        raise ValueError(f"provisioning must be 'thin' or 'thick', not {value!r}")
    return str(value)


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
        for t in doc.get("target", []):
            tc = TargetConfig(
                name=str(t["name"]),
                alias=t.get("alias"),
                tpgt=int(t.get("tpgt", 1)),
                chap=_chap(t.get("chap"), f"target {t['name']}.chap"),
                mutual_chap=_chap(t.get("mutual_chap"), f"target {t['name']}.mutual_chap"),
                initiators=[str(i) for i in t.get("initiators", [])],
                acls=[Acl.from_dict(a, f"target {t['name']} acl") for a in t.get("acl", [])],
                allow_all=bool(t.get("allow_all", False)),
            )
            check_mutual(tc.chap, tc.mutual_chap, f"target {tc.name}")
            for lun in t.get("lun", []):
                lpath = str(lun["path"])
                tc.luns.append(
                    LunConfig(
                        number=int(lun["number"]),
                        path=lpath if os.path.isabs(lpath) else os.path.join(base, lpath),
                        size=parse_size(lun["size"]) if "size" in lun else None,
                        read_only=bool(lun.get("read_only", False)),
                        block_size=int(lun.get("block_size", 512)),
                        serial=lun.get("serial"),
                        provisioning=_provisioning(lun.get("provisioning", "thin")),
                    )
                )
            cfg.targets.append(tc)
    except KeyError as exc:
        raise ConfigError(f"config {path!r}: missing key {exc}") from exc
    except ValueError as exc:
        raise ConfigError(f"config {path!r}: {exc}") from exc
    return cfg


def demo_config(state_dir: str) -> ServeConfig:
    """The no-config default: one 1 GiB sparse LUN in the default pool, and the demo
    VM (a 1 GiB disk, 256 MiB of state) exported as ``<BASE_IQN>:vm.demo``. Both are
    open to any initiator, visibly (``allow_all``, shown by ``target list`` and ``acl
    list``); every other VM is denied by default (:mod:`.grants`)."""
    pool = os.path.join(state_dir, "pools", "default")
    return ServeConfig(
        state_dir=state_dir,
        targets=[
            TargetConfig(
                name=f"{BASE_IQN}:demo",
                alias="demo",
                luns=[LunConfig(0, os.path.join(pool, "demo-lun0.img"), DEMO_SIZE)],
                allow_all=True,
            )
        ],
        demo_vm=True,
    )


def open_lun(target: TargetConfig, lun: LunConfig) -> LogicalUnit:
    if lun.block_size not in (512, 1024, 2048, 4096):
        raise ConfigError(f"LUN {lun.number} of {target.name}: bad block_size {lun.block_size}")
    if not os.path.exists(lun.path):
        if lun.size is None:
            raise ConfigError(
                f"LUN {lun.number} of {target.name}: backing file {lun.path!r} does not exist "
                "(give a size to create it)"
            )
        if lun.size == 0 or lun.size % lun.block_size:
            raise ConfigError(
                f"LUN {lun.number} of {target.name}: size {lun.size} is not a positive "
                f"multiple of the block size {lun.block_size}"
            )
        os.makedirs(os.path.dirname(lun.path) or ".", exist_ok=True)
        create_sparse_file(lun.path, lun.size)
    try:
        backend = FileBackend(lun.path, read_only=lun.read_only)
    except BackendError as exc:
        raise ConfigError(f"LUN {lun.number} of {target.name}: {exc}") from exc
    if lun.size is not None and backend.size != lun.size:
        backend.close()
        raise ConfigError(
            f"LUN {lun.number} of {target.name}: {lun.path!r} holds {backend.size} bytes, "
            f"config says {lun.size}; refusing to resize it"
        )
    if backend.size < lun.block_size:
        backend.close()
        raise ConfigError(f"LUN {lun.number} of {target.name}: {lun.path!r} is empty")
    if lun.provisioning == "thick" and not backend.is_block_device and not lun.read_only:
        # thick means every block allocated up front, also for a file that exists (its
        # holes get space, its data stays): what GET LBA STATUS calls anchored has space
        try:
            with open(lun.path, "r+b") as fh:
                os.posix_fallocate(fh.fileno(), 0, backend.size)
        except OSError as exc:
            backend.close()
            raise ConfigError(
                f"LUN {lun.number} of {target.name}: cannot preallocate {lun.path!r} "
                f"for thick provisioning: {exc.strerror}"
            ) from exc
    unit_id = uuid.uuid5(_ID_NAMESPACE, f"{target.name.lower()}/{os.path.abspath(lun.path)}")
    identity = UnitIdentity.from_uuid(unit_id, lun.serial or unit_id.hex[:16])
    return LogicalUnit(
        backend,
        identity,
        block_size=lun.block_size,
        read_only=lun.read_only,
        thin_provisioning=lun.provisioning == "thin" and not backend.is_block_device,
        # a preallocated file keeps its space: UNMAP zeroes in place (anchors)
        resource_provisioning=lun.provisioning == "thick" and not backend.is_block_device,
        # APTPL persistent reservations live in a file beside the unit
        pr_state_path=None if backend.is_block_device else f"{lun.path}.pr",
        clock=time.monotonic,
        sleep=time.sleep,
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
                luns[lun.number] = open_lun(t, lun)
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
        vm_uuid=vm.vm_uuid,
    )
