"""The configuration model: targets with their LUNs, ACLs, portals and CHAP secrets.

One model, two readers: the serve configuration in TOML (:func:`.config.load_config`)
and the managed configuration in JSON (:class:`.persist.ManagedConfig`, what the
management commands write) both yield :class:`TargetSpec` with :class:`LunSpec`; in
the spirit of rtslib-fb's ``setup()``/``dump()``, :meth:`TargetSpec.from_dict` loads
a target from its document and :meth:`TargetSpec.to_dict` dumps it back, and
:func:`open_lun` opens the logical unit a LUN spec describes (SBC-3 direct-access
block device on a file or block device).
"""

from __future__ import annotations

import os
import stat
import time
import uuid
from dataclasses import dataclass
from typing import Any

from ..errors import IscsiVmtargetError
from ..iscsi.directory import ChapSecret, Portal
from ..scsi import LogicalUnit, UnitIdentity
from ..sizes import parse_size
from ..storage import BackendError, BlockBackend, FileBackend, RbdImageSpec, create_sparse_file
from ..storage.rbd import RbdBackend, open_image
from ..storage.rbd_pr import RadosPrStore
from .masking import Acl, AclError, chap_from_dict, chap_to_dict, check_mutual, check_name
from .rbd_gateway import check_non_owner, serve_rbd_lun

_ID_NAMESPACE = uuid.UUID("5b0e1c52-8f6e-4d0a-9d3e-2f1f3c6a7b10")
BLOCK_SIZES = (512, 1024, 2048, 4096)
PROVISIONING = ("thin", "thick")


class LunError(IscsiVmtargetError):
    """A LUN that cannot be opened as configured; says which and why."""


def check_provisioning(value: Any) -> str:
    """``thin`` (UNMAP punches holes) or ``thick`` (every block allocated up front,
    UNMAP zeroes in place); ValueError otherwise."""
    if value not in PROVISIONING:
        raise ValueError(f"provisioning must be 'thin' or 'thick', not {value!r}")
    return str(value)


def parse_portal(text: str, tpgt: int = 1) -> Portal:
    """``HOST:PORT`` or ``[V6]:PORT`` -> :class:`Portal`; ValueError naming the problem."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"portal {text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]  # an IPv6 address, bracketed as in RFC 3986 §3.2.2
    elif ":" in host or "[" in host or "]" in host:
        raise ValueError(f"portal {text!r} is not HOST:PORT (an IPv6 host goes in brackets)")
    if not host:
        raise ValueError(f"portal {text!r} has no host")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"portal {text!r} has a bad port")
    return Portal(host, int(port), tpgt)


def portal_text(p: Portal) -> str:
    """The ``HOST:PORT`` (``[V6]:PORT``) of a portal, as :func:`parse_portal` reads it."""
    host = f"[{p.host}]" if ":" in p.host else p.host
    return f"{host}:{p.port}"


@dataclass(frozen=True)
class LunSpec:
    """A LUN of a target: a backing file or block device (SBC-3 direct-access block
    device), or an RBD image (``rbd``, then ``path`` is empty). ``size`` creates a
    missing file sparse or a missing image thin (never resizes one); ``thick``
    provisioning preallocates a file. ``alua_non_owner``: what the gateways of an RBD
    LUN that do not own it are, ``standby`` or ``active-non-optimized``
    (:mod:`.rbd_gateway`)."""

    number: int
    path: str
    size: int | None = None
    read_only: bool = False
    block_size: int = 512
    serial: str | None = None
    provisioning: str = "thin"
    rbd: RbdImageSpec | None = None
    alua_non_owner: str = "standby"

    @property
    def backing(self) -> str:
        """What backs the LUN, for messages: the path, or ``rbd:POOL/IMAGE``."""
        return f"rbd:{self.rbd}" if self.rbd is not None else self.path

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"number": self.number}
        if self.rbd is not None:
            out.update(rbd_to_dict(self.rbd))
        else:
            out["path"] = self.path
        if self.size is not None:
            out["size"] = self.size
        out["read_only"] = self.read_only
        out["block_size"] = self.block_size
        if self.serial is not None:
            out["serial"] = self.serial
        if self.provisioning != "thin":
            out["provisioning"] = self.provisioning
        if self.alua_non_owner != "standby":
            out["alua_non_owner"] = self.alua_non_owner
        return out

    @classmethod
    def from_dict(cls, doc: dict[str, Any], base: str = ".") -> LunSpec:
        """A LUN's document: ``path`` (relative to ``base``) or ``rbd`` (with
        ``ceph_conf`` relative to ``base`` and ``ceph_id``). ValueError names a problem."""
        rbd = rbd_from_dict(doc, base)
        path = "" if rbd is not None else _absolute(str(doc["path"]), base)
        size = doc.get("size")
        non_owner = check_non_owner(str(doc.get("alua_non_owner", "standby")))
        if rbd is None and "alua_non_owner" in doc:
            raise ValueError(f"LUN {doc.get('number')}: alua_non_owner is for rbd LUNs only")
        return cls(
            number=int(doc["number"]),
            path=path,
            rbd=rbd,
            size=None if size is None else parse_size(size),
            read_only=bool(doc.get("read_only", False)),
            block_size=int(doc.get("block_size", 512)),
            serial=doc.get("serial"),
            provisioning=check_provisioning(doc.get("provisioning", "thin")),
            alua_non_owner=non_owner,
        )


def _absolute(path: str, base: str) -> str:
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))


def rbd_from_dict(doc: dict[str, Any], base: str) -> RbdImageSpec | None:
    """The ``rbd`` image (``POOL[/NAMESPACE]/IMAGE``) a LUN document names, with its
    ``ceph_conf`` and ``ceph_id``; None when it names a ``path``."""
    if "rbd" not in doc:
        return None
    if "path" in doc:
        raise ValueError(f"LUN {doc.get('number')}: give path or rbd, not both")
    conf = doc.get("ceph_conf")
    return RbdImageSpec.parse(
        str(doc["rbd"]),
        conf=None if conf is None else _absolute(str(conf), base),
        client_id=None if doc.get("ceph_id") is None else str(doc["ceph_id"]),
    )


def rbd_to_dict(spec: RbdImageSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"rbd": str(spec)}
    if spec.where.conf is not None:
        out["ceph_conf"] = spec.where.conf
    if spec.where.client_id is not None:
        out["ceph_id"] = spec.where.client_id
    return out


@dataclass(frozen=True)
class TargetSpec:
    """One target: its LUNs, ACLs (:class:`~.acl.Acl`), CHAP secrets, ``allow_all``
    (initiators without an ACL see every LUN) and, from older configurations, a plain
    list of ``initiators`` allowed to log in."""

    name: str
    alias: str | None = None
    tpgt: int = 1
    luns: tuple[LunSpec, ...] = ()
    acls: tuple[Acl, ...] = ()
    chap: ChapSecret | None = None
    mutual_chap: ChapSecret | None = None
    allow_all: bool = False
    initiators: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return self.name.lower()

    def lun(self, number: int) -> LunSpec | None:
        return next((lun for lun in self.luns if lun.number == number), None)

    def acl(self, initiator: str) -> Acl | None:
        return next((a for a in self.acls if a.key == initiator.lower()), None)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "alias": self.alias,
            "tpgt": self.tpgt,
            "allow_all": self.allow_all,
            "chap": chap_to_dict(self.chap),
            "mutual_chap": chap_to_dict(self.mutual_chap),
            "luns": [lun.to_dict() for lun in self.luns],
            "acls": [a.to_dict() for a in self.acls],
        }
        if self.initiators:
            out["initiators"] = list(self.initiators)
        return out

    @classmethod
    def from_dict(cls, doc: dict[str, Any], base: str = ".") -> TargetSpec:
        """A target's document (``luns``/``acls``, or TOML's ``lun``/``acl`` tables);
        LUN paths relative to ``base``. AclError names what is wrong."""
        name = check_name(str(doc["name"]), "target")
        where = f"target {name}"
        luns = tuple(
            sorted(
                (LunSpec.from_dict(x, base) for x in doc.get("luns", doc.get("lun", []))),
                key=lambda lun: lun.number,
            )
        )
        if len({lun.number for lun in luns}) != len(luns):
            raise AclError(f"{where}: a LUN number is defined twice")
        acls = acl_list(doc.get("acls", doc.get("acl", [])), f"{where} acl")
        chap = chap_from_dict(doc.get("chap"), f"{where} chap")
        mutual = chap_from_dict(doc.get("mutual_chap"), f"{where} mutual_chap")
        check_mutual(chap, mutual, where)
        return cls(
            name=name,
            alias=doc.get("alias"),
            tpgt=int(doc.get("tpgt", 1)),
            luns=luns,
            acls=acls,
            chap=chap,
            mutual_chap=mutual,
            allow_all=bool(doc.get("allow_all", False)),
            initiators=tuple(str(i) for i in doc.get("initiators", ())),
        )


def acl_list(docs: Any, where: str) -> tuple[Acl, ...]:
    """ACL dicts -> ACLs sorted by initiator; two for one initiator are refused."""
    acls = tuple(Acl.from_dict(a, where) for a in docs or ())
    if len({a.key for a in acls}) != len(acls):
        raise AclError(f"{where}: two ACLs for one initiator")
    return tuple(sorted(acls, key=lambda a: a.key))


def _interrupted_creation(path: str) -> bool:
    """An empty regular file where the config gives a size: the target's own creation
    of it was cut by a crash (the size is set right after the name, and both reach the
    disk at the fsync that ends the creation), so it is created again."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == 0


def open_lun(target: str, lun: LunSpec, tpgt: int = 1) -> LogicalUnit:
    """The logical unit LUN ``lun`` of target ``target`` describes: its backing file
    created sparse (or its RBD image thin) when missing and ``size`` is given, a file
    preallocated for ``thick`` provisioning, never resized; its identity (VPD
    0x83/0x80) derived from the target and the path (or the RBD image's id), so it
    stays the same from one start to the next, and on every gateway serving that
    image. A writable RBD LUN is served as target port group ``tpgt`` under the image's
    exclusive lock (:mod:`.rbd_gateway`). LunError says what is wrong, and nothing is
    left open."""
    where = f"LUN {lun.number} of {target}"
    if lun.block_size not in BLOCK_SIZES:
        raise LunError(f"{where}: bad block_size {lun.block_size}")
    backend: BlockBackend
    if lun.rbd is not None:
        backend = _open_rbd(where, lun, lun.rbd)
    else:
        backend = _open_file(where, lun)
    if lun.size is not None and backend.size != lun.size:
        backend.close()
        raise LunError(
            f"{where}: {lun.backing!r} holds {backend.size} bytes, "
            f"config says {lun.size}; refusing to resize it"
        )
    if backend.size < lun.block_size:
        backend.close()
        raise LunError(f"{where}: {lun.backing!r} is empty")
    if isinstance(backend, RbdBackend):
        key = f"{target.lower()}/rbd:{backend.spec.where}/{backend.image_id}"
        sparse = True
        # every gateway of the image shares one state, kept in RADOS beside it
        pr_shared = _shared_reservations(where, backend)
        pr_path = None
    else:
        assert isinstance(backend, FileBackend)
        _preallocate(where, lun, backend)
        key = f"{target.lower()}/{os.path.abspath(lun.path)}"
        sparse, pr_shared = not backend.is_block_device, None
        pr_path = None if backend.is_block_device else f"{lun.path}.pr"
    unit_id = uuid.uuid5(_ID_NAMESPACE, key)
    identity = UnitIdentity.from_uuid(unit_id, lun.serial or unit_id.hex[:16])
    try:
        lu = LogicalUnit(
            backend,
            identity,
            block_size=lun.block_size,
            read_only=lun.read_only,
            thin_provisioning=lun.provisioning == "thin" and sparse,
            # a preallocated file keeps its space: UNMAP zeroes in place (anchors)
            resource_provisioning=lun.provisioning == "thick" and sparse,
            # APTPL persistent reservations live in a file beside the unit; an RBD
            # image's are in RADOS, shared by every gateway (storage/rbd_pr.py)
            pr_state_path=pr_path,
            pr_shared=pr_shared,
            clock=time.monotonic,
            sleep=time.sleep,
        )
    except BackendError as exc:  # the shared reservations could not be read
        backend.close()
        raise LunError(f"{where}: {exc}") from exc
    if isinstance(backend, RbdBackend) and not lun.read_only:
        try:
            serve_rbd_lun(lu, backend, tpgt, lun.alua_non_owner)
        except BackendError as exc:  # the owner role's object could not be reached
            backend.close()
            raise LunError(f"{where}: {exc}") from exc
    return lu


#: The RBD image metadata key where earlier versions kept a LUN's APTPL reservation
#: state (taken into the shared RADOS object the first time).
PR_METADATA_KEY = "iscsi_vmtarget.pr"


def _shared_reservations(where: str, backend: RbdBackend) -> RadosPrStore:
    try:
        return RadosPrStore(backend, legacy=backend.metadata_store(PR_METADATA_KEY))
    except BackendError as exc:
        backend.close()
        raise LunError(f"{where}: {exc}") from exc


def _open_file(where: str, lun: LunSpec) -> FileBackend:
    if lun.size is not None and _interrupted_creation(lun.path):
        os.unlink(lun.path)  # a power cut inside create_sparse_file: nothing was stored
    if not os.path.exists(lun.path):
        if lun.size is None:
            raise LunError(
                f"{where}: backing file {lun.path!r} does not exist (give a size to create it)"
            )
        _check_new_size(where, lun)
        os.makedirs(os.path.dirname(lun.path) or ".", exist_ok=True)
        create_sparse_file(lun.path, lun.size)
    try:
        return FileBackend(lun.path, read_only=lun.read_only)
    except BackendError as exc:
        raise LunError(f"{where}: {exc}") from exc


def _open_rbd(where: str, lun: LunSpec, spec: RbdImageSpec) -> RbdBackend:
    if lun.provisioning == "thick":
        raise LunError(f"{where}: RBD images are thin; thick provisioning is for files")
    if lun.size is not None:
        _check_new_size(where, lun)
    try:
        return open_image(spec, lun.size, read_only=lun.read_only)
    except BackendError as exc:
        raise LunError(f"{where}: {exc}") from exc


def _check_new_size(where: str, lun: LunSpec) -> None:
    if lun.size is not None and (lun.size == 0 or lun.size % lun.block_size):
        raise LunError(
            f"{where}: size {lun.size} is not a positive "
            f"multiple of the block size {lun.block_size}"
        )


def _preallocate(where: str, lun: LunSpec, backend: FileBackend) -> None:
    """Thick: every block allocated up front, also for a file that exists (its holes
    get space, its data stays): what GET LBA STATUS calls anchored has space."""
    if lun.provisioning != "thick" or backend.is_block_device or lun.read_only:
        return
    try:
        with open(lun.path, "r+b") as fh:
            os.posix_fallocate(fh.fileno(), 0, backend.size)
    except OSError as exc:
        backend.close()
        raise LunError(
            f"{where}: cannot preallocate {lun.path!r} for thick provisioning: {exc.strerror}"
        ) from exc
