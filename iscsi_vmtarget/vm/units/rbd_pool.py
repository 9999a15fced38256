"""A pool of units on Ceph RBD: each unit (base, secondary, delta layer, snapshot
record) is one thin RBD image in a RADOS pool, optionally inside an RBD namespace.

The same rules as a directory pool (:class:`~.pool.DirectoryPool`), with images for
files: a unit is created as the hidden image ``.<uuid>.unit.tmp`` and renamed to
``<uuid>.unit`` when whole (RBD renames atomically), so a crash never leaves half a
unit under a unit name; whether an image is a unit is decided by its header (marker +
checksum), never by a list kept elsewhere, so any gateway that sees the pool finds
the same VMs. Growing a unit records ``{"old_size", "new_size"}`` in the image's own
metadata first (key ``iscsi_vmtarget.grow``) and removes it when the new tail holds
the header; :meth:`RbdPool.recover` rolls an interrupted growth forward or back.

A pool's definition (``<state-dir>/conf/pools/<name>.toml``) holds ``kind = "rbd"``,
``path = "POOL[/NAMESPACE]"`` and optionally ``ceph_conf`` and ``ceph_id``.
"""

from __future__ import annotations

import json
import os
import tomllib
import uuid

from ...storage import BackendError
from ...storage.backend import BlockBackend
from ...storage.rbd import (
    RbdBackend,
    RbdImageSpec,
    RbdPoolSpec,
    create_image,
    free_bytes,
    list_images,
    remove_image,
    rename_image,
)
from ..vm_errors import VmError
from .lease_rbd import lease_name
from .pool_common import UNIT_SUFFIX, slots_valid
from .pool_protocol import UnitRef

KIND = "rbd"
GROW_KEY = "iscsi_vmtarget.grow"
_TEMP_SUFFIX = ".tmp"


class RbdPool:
    """Units as RBD images in one RADOS pool (and namespace)."""

    kind = KIND

    def __init__(self, name: str, where: RbdPoolSpec) -> None:
        self.name = name
        self.where = where
        #: what names the pool for people and for the clash check of ``pool create``
        self.path = f"rbd:{where}"

    @classmethod
    def from_definition(cls, name: str, path: str, definition: str) -> RbdPool:
        """The pool a definition file describes (``path`` as read by the catalog)."""
        try:
            with open(definition, "rb") as fh:
                doc = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise VmError(f"pool definition {definition!r} is unreadable: {exc}") from exc
        return cls(name, rbd_pool_spec(path, doc.get("ceph_conf"), doc.get("ceph_id")))

    def _image(self, ref: UnitRef) -> RbdImageSpec:
        return RbdImageSpec(self.where, ref.key)

    def _names(self) -> list[str]:
        try:
            return list_images(self.where)
        except BackendError as exc:
            raise VmError(f"pool {self.name}: {exc}") from exc

    def reload(self) -> None:
        pass  # the pool's image list is the table

    def candidates(self) -> list[UnitRef]:
        """Every image but our own temporaries: foreign images are listed too (their
        header says they are not units)."""
        return [UnitRef(self.name, n) for n in self._names() if not n.startswith(".")]

    def open(self, ref: UnitRef, read_only: bool = False) -> BlockBackend:
        try:
            return RbdBackend(self._image(ref), read_only=read_only)
        except BackendError as exc:
            raise VmError(str(exc)) from exc

    def allocate(self, unit_uuid: uuid.UUID, size: int) -> tuple[UnitRef, BlockBackend]:
        ref = UnitRef(self.name, f".{unit_uuid}{UNIT_SUFFIX}{_TEMP_SUFFIX}")
        try:
            create_image(self._image(ref), size)
        except BackendError as exc:
            raise VmError(
                f"cannot create a unit of {size} bytes in pool {self.name} ({self.path}): {exc}"
            ) from exc
        return ref, self.open(ref)

    def commit(self, ref: UnitRef, backend: BlockBackend) -> UnitRef:
        """Make a fully written unit visible under its final name (RBD's atomic rename;
        the open image stays usable)."""
        backend.flush()
        final = UnitRef(self.name, ref.key[1:].removesuffix(_TEMP_SUFFIX))
        try:
            rename_image(self.where, ref.key, final.key)
        except BackendError as exc:
            raise VmError(f"pool {self.name}: {exc}") from exc
        return final

    def exists(self, key: str) -> bool:
        """Whether image ``key`` (a unit or a temporary) is in the pool."""
        return key in self._names()

    def publish(self, temp_key: str) -> str:
        """Give the temporary ``temp_key`` (from :meth:`allocate`, fully written and
        flushed, maybe closed) its unit name; that name. For ``vm move``."""
        final = temp_key[1:].removesuffix(_TEMP_SUFFIX)
        try:
            rename_image(self.where, temp_key, final)
        except BackendError as exc:
            raise VmError(f"pool {self.name}: {exc}") from exc
        return final

    def abandon(self, ref: UnitRef, backend: BlockBackend) -> None:
        backend.close()
        if ref.key in self._names():
            self.delete(ref)

    def delete(self, ref: UnitRef) -> None:
        lease = lease_name(ref.key.removesuffix(UNIT_SUFFIX))  # its lease, if it was served
        try:
            remove_image(self._image(ref))
            if lease in self._names():
                remove_image(self._image(UnitRef(self.name, lease)))
        except BackendError as exc:
            raise VmError(f"pool {self.name}: {exc}") from exc

    def _intent(self, backend: RbdBackend) -> tuple[int, int] | None:
        raw = backend.metadata_store(GROW_KEY).load()
        if raw is None:
            return None
        doc = json.loads(raw)
        return int(doc["old_size"]), int(doc["new_size"])

    def begin_growth(self, ref: UnitRef, backend: BlockBackend, new_size: int) -> None:
        """Record the old size in the image's metadata, then grow it. Until
        :meth:`end_growth` the new tail may hold no header yet; :meth:`recover` then
        shrinks the image back."""
        image = _rbd(backend)
        intent = {"old_size": backend.size, "new_size": new_size}
        try:
            image.metadata_store(GROW_KEY).save(json.dumps(intent).encode())
        except BackendError as exc:
            raise VmError(f"pool {self.name}: {exc}") from exc
        backend.resize(new_size)

    def end_growth(self, ref: UnitRef, backend: BlockBackend) -> None:
        backend.flush()
        _rbd(backend).metadata_store(GROW_KEY).clear()

    def recover(self, ref: UnitRef) -> str | None:
        """Finish or roll back a growth interrupted between its two steps."""
        backend = self.open(ref)
        try:
            assert isinstance(backend, RbdBackend)
            intent = self._intent(backend)
            if intent is None:
                return None
            if slots_valid(backend):
                done = "extension kept (the new tail holds the header)"
            else:
                backend.resize(intent[0])
                backend.flush()
                done = "interrupted extension rolled back"
            backend.metadata_store(GROW_KEY).clear()
            return done
        finally:
            backend.close()

    def leftovers(self) -> list[str]:
        """Temporary images of interrupted unit creations."""
        return [n for n in self._names() if n.startswith(".") and n.endswith(_TEMP_SUFFIX)]

    def remove_leftovers(self) -> list[str]:
        names = self.leftovers()
        for name in names:
            self.delete(UnitRef(self.name, name))
        return names

    def describe(self) -> dict[str, object]:
        try:
            free: int | None = free_bytes(self.where)
        except BackendError:
            free = None
        out: dict[str, object] = {
            "name": self.name,
            "kind": self.kind,
            "path": self.path,
            "free_bytes": free,
        }
        if self.where.conf is not None:
            out["ceph_conf"] = self.where.conf
        if self.where.client_id is not None:
            out["ceph_id"] = self.where.client_id
        return out

    def close(self) -> None:
        pass


def _rbd(backend: BlockBackend) -> RbdBackend:
    if not isinstance(backend, RbdBackend):
        raise VmError(f"an rbd pool's unit is open on {type(backend).__name__}")
    return backend


def rbd_pool_spec(path: str, conf: object, client_id: object) -> RbdPoolSpec:
    """The RBD pool (and namespace) a definition names, as a VmError when malformed."""
    try:
        return RbdPoolSpec.parse(
            path,
            conf=None if conf is None else os.path.abspath(str(conf)),
            client_id=None if client_id is None else str(client_id),
        )
    except ValueError as exc:
        raise VmError(f"rbd pool: {exc}") from exc
