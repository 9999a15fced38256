"""A small RADOS object beside an RBD image, read with its version and written by
compare-and-swap.

Several gateways of one image share state this way (the persistent reservations of
:mod:`.rbd_pr`, the ALUA owner role of ``server/alua_role.py``): :meth:`VersionedObject.read`
returns the body and the object's version; :meth:`VersionedObject.swap` writes a new
body in one write operation that first asserts that version (``assert_version``: the OSD
refuses the whole operation with ERANGE/EOVERFLOW when another client wrote in
between), or creates the object exclusively when there was none (EEXIST when another
client created it first). A refused swap writes nothing; the caller reads again.
"""

from __future__ import annotations

import threading
from typing import Any

from .backend import BackendError
from .rbd import RbdBackend, bindings

#: errnos of a refused assert_version: the object is newer (ERANGE) or older (EOVERFLOW).
_VERSION_MISMATCH = (34, 75)


class VersionedObject:
    """The object ``name`` in the pool (and namespace) of ``backend``'s image."""

    def __init__(self, backend: RbdBackend, name: str, limit: int) -> None:
        self._rados, _ = bindings()
        self._spec = backend.spec
        self.name = name
        self._limit = limit  # the largest body read
        where = backend.spec.where
        try:
            self.ioctx: Any = backend.cluster.open_ioctx(where.pool)
            if where.namespace:
                self.ioctx.set_namespace(where.namespace)
        except self._rados.Error as exc:
            raise BackendError(f"cannot open RADOS pool {where.pool!r}: {exc}") from exc
        #: one operation and its get_last_version at a time (the version is the I/O
        #: context's, of its last operation)
        self._io = threading.Lock()

    def error(self, what: str, exc: Exception) -> BackendError:
        return BackendError(f"RBD image {self._spec}: {what} {self.name}: {exc}")

    def read(self) -> tuple[int | None, bytes | None]:
        """The object's (version, body); (None, None) when it does not exist."""
        with self._io:
            try:
                data = self.ioctx.read(self.name, self._limit)
                version = int(self.ioctx.get_last_version())
            except self._rados.ObjectNotFound:
                return None, None
            except self._rados.Error as exc:
                raise self.error("reading", exc) from exc
        return version, bytes(data)

    def swap(self, data: bytes, based_on: int | None) -> int | None:
        """Write ``data`` if the object is still at version ``based_on`` (None: if it
        still does not exist): the new version, or None when another client wrote (or
        created it) first and nothing was written."""
        rados = self._rados
        with self._io:
            op = self.ioctx.create_write_op()
            try:
                if based_on is None:
                    op.new(rados.LIBRADOS_CREATE_EXCLUSIVE)
                else:
                    op.assert_version(based_on)
                op.write_full(bytes(data))
                self.ioctx.operate_write_op(op, self.name)
                return int(self.ioctx.get_last_version())
            except rados.ObjectExists:
                return None
            except rados.Error as exc:
                if getattr(exc, "errno", None) in _VERSION_MISMATCH:
                    return None
                raise self.error("writing", exc) from exc
            finally:
                self.ioctx.release_write_op(op)

    def ensure(self) -> None:
        """Create the object (empty) unless it exists."""
        with self._io:
            op = self.ioctx.create_write_op()
            try:
                op.new(self._rados.LIBRADOS_CREATE_IDEMPOTENT)
                self.ioctx.operate_write_op(op, self.name)
            except self._rados.Error as exc:
                raise self.error("creating", exc) from exc
            finally:
                self.ioctx.release_write_op(op)

    def close(self) -> None:
        try:
            self.ioctx.close()
        except self._rados.Error:
            pass
