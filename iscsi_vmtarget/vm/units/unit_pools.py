"""Pools: where units are allocated (US 9,354,927: "storage pools are then subdivided into
storage units"), behind one small interface.

* :class:`DirectoryPool` (the default): one sparse file per unit, ``<uuid>.unit``.
  A unit is created under a hidden temporary name and renamed into place when whole,
  so a crash never leaves half a unit under a unit name.
* :class:`DevicePool` (:mod:`.device_pool`): a block device or one large file carved into
  units, with an on-device unit table.

Pool definitions live in ``<state-dir>/conf/pools/<name>.toml``; the pool ``default``
is implicit (``<state-dir>/pools/default``). A pool lists candidate units; whether a
candidate is a unit at all is decided by its header (marker + checksum), never by a
database, so discovery works on a pool found with no other record.
"""

from __future__ import annotations

import json
import os
import tomllib
import uuid

from ...storage import BackendError, FileBackend, atomic_file, create_sparse_file
from ...storage.backend import BlockBackend
from .. import faults
from ..vm_errors import NotFoundError, SizeError, VmError
from .device_pool import DevicePool, format_device
from .pool_common import UNIT_SUFFIX, check_pool_name, slots_valid, write_definition
from .pool_protocol import Pool, UnitRef
from .rbd_pool import KIND as RBD_KIND
from .rbd_pool import RbdPool, rbd_pool_spec

DEFAULT_POOL = "default"
GROW_SUFFIX = ".grow"


class DirectoryPool:
    """A directory of sparse files, one per unit."""

    kind = "directory"

    def __init__(self, name: str, path: str) -> None:
        self.name = name
        self.path = os.path.abspath(path)

    def _file(self, ref: UnitRef) -> str:
        return os.path.join(self.path, ref.key)

    def reload(self) -> None:
        pass  # the directory itself is the table

    def candidates(self) -> list[UnitRef]:
        """Every regular file but our own temporaries: foreign files are listed too."""
        if not os.path.isdir(self.path):
            return []
        out = []
        for entry in sorted(os.scandir(self.path), key=lambda e: e.name):
            if entry.name.startswith(".") or entry.name.endswith(GROW_SUFFIX):
                continue
            if entry.is_file(follow_symlinks=False):
                out.append(UnitRef(self.name, entry.name))
        return out

    def open(self, ref: UnitRef, read_only: bool = False) -> BlockBackend:
        try:
            return FileBackend(self._file(ref), read_only=read_only)
        except BackendError as exc:
            raise VmError(str(exc)) from exc

    def allocate(self, unit_uuid: uuid.UUID, size: int) -> tuple[UnitRef, BlockBackend]:
        os.makedirs(self.path, exist_ok=True)
        ref = UnitRef(self.name, f".{unit_uuid}{UNIT_SUFFIX}.tmp")
        try:
            create_sparse_file(self._file(ref), size)
        except OSError as exc:
            raise VmError(
                f"cannot create a unit of {size} bytes in pool {self.name} ({self.path}): "
                f"{exc.strerror}"
            ) from exc
        return ref, self.open(ref)

    def commit(self, ref: UnitRef, backend: BlockBackend) -> UnitRef:
        """Make a fully written unit visible under its final name (atomic rename)."""
        backend.flush()
        final = UnitRef(self.name, ref.key[1:].removesuffix(".tmp"))
        atomic_file.replace(self._file(ref), self._file(final))
        return final

    def abandon(self, ref: UnitRef, backend: BlockBackend) -> None:
        backend.close()
        try:
            os.unlink(self._file(ref))
        except FileNotFoundError:
            pass

    def delete(self, ref: UnitRef) -> None:
        atomic_file.remove(self._file(ref))

    def _intent(self, ref: UnitRef) -> str:
        return self._file(ref) + GROW_SUFFIX

    def begin_growth(self, ref: UnitRef, backend: BlockBackend, new_size: int) -> None:
        """Record the old size, then extend the file. Until :meth:`end_growth`, the tail
        of the file may hold no header yet; :meth:`recover` then shrinks it back."""
        intent = self._intent(ref)
        # the intent appears whole or not at all (a kill -9 between creating it and
        # writing it used to leave an empty one that no later open could read); an
        # unrenamed temporary is a creation leftover, removed by the next repair
        atomic_file.write_file(
            intent,
            json.dumps({"old_size": backend.size, "new_size": new_size}).encode(),
            tmp=os.path.join(self.path, f".{os.path.basename(intent)}.tmp"),
            before_rename=lambda: faults.crashpoint("resize.intent"),
        )
        backend.resize(new_size)

    def end_growth(self, ref: UnitRef, backend: BlockBackend) -> None:
        backend.flush()
        atomic_file.remove(self._intent(ref))

    def recover(self, ref: UnitRef) -> str | None:
        """Finish or roll back an extension interrupted between its two steps."""
        intent = self._intent(ref)
        if not os.path.exists(intent):
            return None
        try:
            with open(intent) as fh:
                old_size: int | None = int(json.load(fh)["old_size"])
        except (ValueError, KeyError, TypeError):
            # written by an older version and cut short: the file was extended only
            # after the intent was complete and synced, so it never was
            old_size = None
        backend = self.open(ref)
        try:
            if old_size is None:
                done = "unfinished extension intent removed (the file was never extended)"
            elif slots_valid(backend):
                done = "extension kept (the new tail holds the header)"
            else:
                backend.resize(old_size)
                backend.flush()
                done = "interrupted extension rolled back"
        finally:
            backend.close()
        atomic_file.remove(intent)
        return done

    def leftovers(self) -> list[str]:
        """Temporary files of interrupted unit creations."""
        if not os.path.isdir(self.path):
            return []
        return sorted(n for n in os.listdir(self.path) if n.startswith(".") and n.endswith(".tmp"))

    def remove_leftovers(self) -> list[str]:
        names = self.leftovers()
        for name in names:
            os.unlink(os.path.join(self.path, name))
        return names

    def describe(self) -> dict[str, object]:
        stats = os.statvfs(self.path) if os.path.isdir(self.path) else None
        return {
            "name": self.name,
            "kind": self.kind,
            "path": self.path,
            "free_bytes": stats.f_bavail * stats.f_frsize if stats else None,
        }

    def close(self) -> None:
        pass


def read_definition(path: str) -> tuple[str, str, str]:
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
        return str(doc["name"]), str(doc["kind"]), str(doc["path"])
    except (OSError, KeyError, tomllib.TOMLDecodeError) as exc:
        raise VmError(f"pool definition {path!r} is unreadable: {exc}") from exc


class PoolCatalog:
    """The pools of one state directory."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = os.path.abspath(state_dir)
        self.conf_dir = os.path.join(self.state_dir, "conf")
        self._open: dict[str, Pool] = {}

    def _definitions(self) -> dict[str, tuple[str, str]]:
        defs = {DEFAULT_POOL: ("directory", os.path.join(self.state_dir, "pools", DEFAULT_POOL))}
        directory = os.path.join(self.conf_dir, "pools")
        if os.path.isdir(directory):
            for entry in sorted(os.listdir(directory)):
                if entry.endswith(".toml"):
                    name, kind, path = read_definition(os.path.join(directory, entry))
                    defs[name] = (kind, path)
        return defs

    def names(self) -> list[str]:
        return sorted(self._definitions())

    def get(self, name: str) -> Pool:
        if name in self._open:
            return self._open[name]
        defs = self._definitions()
        if name not in defs:
            raise NotFoundError(f"unknown pool {name!r} (pools: {', '.join(sorted(defs))})")
        kind, path = defs[name]
        pool: Pool
        if kind == "directory":
            pool = DirectoryPool(name, path)
        elif kind == "device":
            pool = DevicePool(name, path)
        elif kind == RBD_KIND:  # a pool of RBD images (Ceph): needs Ceph only when used
            pool = RbdPool.from_definition(
                name, path, os.path.join(self.conf_dir, "pools", f"{name}.toml")
            )
        else:
            raise VmError(f"pool {name!r} has unknown kind {kind!r}")
        self._open[name] = pool
        return pool

    def all(self) -> list[Pool]:
        return [self.get(name) for name in self.names()]

    def create_directory(self, name: str, path: str | None) -> Pool:
        check_pool_name(name)
        if name in self._definitions():
            raise VmError(f"pool {name!r} already exists")
        target = os.path.abspath(path or os.path.join(self.state_dir, "pools", name))
        for other in self.all():
            if other.path == target:
                raise VmError(f"{target!r} is already pool {other.name!r}")
        if os.path.exists(target) and not os.path.isdir(target):
            raise VmError(f"{target!r} exists and is not a directory")
        os.makedirs(target, exist_ok=True)
        write_definition(self.conf_dir, name, "directory", target)
        return self.get(name)

    def create_rbd(
        self,
        name: str,
        where: str,
        ceph_conf: str | None = None,
        ceph_id: str | None = None,
    ) -> Pool:
        """Define pool ``name`` on RBD ``POOL[/NAMESPACE]``. The RADOS pool must exist and
        be reachable: the definition is written only after listing it worked, so a typo
        leaves nothing behind."""
        check_pool_name(name)
        if name in self.names():
            raise VmError(f"pool {name!r} already exists")
        pool = RbdPool(name, rbd_pool_spec(where, ceph_conf, ceph_id))
        for other in self.all():
            if other.path == pool.path:
                raise VmError(f"{pool.path!r} is already pool {other.name!r}")
        pool.candidates()  # VmError naming the problem: no such pool, no cluster, no key
        extra = {}
        if pool.where.conf is not None:
            extra["ceph_conf"] = pool.where.conf
        if pool.where.client_id is not None:
            extra["ceph_id"] = pool.where.client_id
        write_definition(self.conf_dir, name, RBD_KIND, str(pool.where), extra)
        return self.get(name)

    def create_device(
        self, name: str, device: str, size: int | None = None, force: bool = False
    ) -> Pool:
        check_pool_name(name)
        if name in self._definitions():
            raise VmError(f"pool {name!r} already exists")
        target = os.path.abspath(device)
        for other in self.all():
            if other.path == target:
                raise VmError(f"{target!r} is already pool {other.name!r}")
        if not os.path.exists(target):
            if size is None:
                raise SizeError(
                    f"{target!r} does not exist; give --size to create a file of that size"
                )
            os.makedirs(os.path.dirname(target), exist_ok=True)
            create_sparse_file(target, size)
        format_device(target, force=force)
        write_definition(self.conf_dir, name, "device", target)
        return self.get(name)

    def close(self) -> None:
        for pool in self._open.values():
            pool.close()
        self._open.clear()
