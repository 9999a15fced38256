"""Ceph RBD images as block backends, through librbd's Python bindings.

The bindings (``rados``, ``rbd``) are Debian's ``python3-rados``/``python3-rbd`` (not on
PyPI; ``tools/install-deps --ceph`` makes them importable): they are imported when an
image is first opened, so this module loads, and everything else works, without Ceph.

One ``rados.Rados`` connection is shared by every image of one cluster and user
(librados multiplexes them; a connection per image would cost a monitor session and
threads each) and kept up while the process runs (:func:`close_connections`).

What RBD offers beyond reads and writes, and how each ability maps:

- ``unmap``: ``write_zeroes``, which frees whole RADOS objects and zeroes the rest, so
  the range always reads as zeros. Not ``discard``: with librbd's defaults it skips
  ranges smaller than its discard granularity, which would then keep their old data.
- ``zero_range`` (keep the allocation, a resource-provisioned LU's UNMAP): written
  zeros; RBD has no unwritten extents, and ``write_zeroes`` would give the space back.
- ``allocated_ranges``: ``diff_iterate`` against no snapshot lists the extents of the
  RADOS objects that exist (object granularity: a range inside an object that holds
  any data counts as mapped, which SBC-3 allows; an object never written, or freed
  whole, is a hole).
- ``flush``: librbd's flush (the OSDs have acknowledged every write; with RBD's cache
  off, the default for an image opened here, that is already so for each write).
- ``resize``: the image's own resize (thin).
- :class:`~.backend.AsyncIO` (``start_read``/``start_write``): librbd's ``aio_read``
  and ``aio_write``, so a gateway's READ or WRITE holds no thread for the round trip
  (fencing is unchanged: the OSDs refuse a blocklisted client's request, which then
  completes with an error). Started on an event loop, they go through librbd's C API
  and finish on that loop, adjacent ones of one loop turn merged into one librbd
  request (:mod:`.rbd_aio`); elsewhere through python3-rbd's callbacks.
"""

from __future__ import annotations

import atexit
import base64
import errno
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .backend import BackendError, ReadDone, WriteDone, check_range
from .rbd_aio import ImageEvents, events_for

#: How long a monitor or OSD may stay unreachable before an operation fails (seconds),
#: instead of librados' default of waiting forever: a gateway must answer its initiator.
OP_TIMEOUT = 30
_ZERO_CHUNK = 4 << 20


def bindings() -> tuple[Any, Any]:
    """The ``rados`` and ``rbd`` modules; BackendError saying how to get them."""
    try:
        import rados
        import rbd
    except ImportError as exc:
        raise BackendError(
            "Ceph's Python bindings are not importable (python3-rados, python3-rbd: "
            "run tools/install-deps --ceph)"
        ) from exc
    return rados, rbd


@dataclass(frozen=True)
class RbdPoolSpec:
    """Where images live: a RADOS pool, an optional RBD namespace inside it, the
    cluster's configuration file (None: librados' default search, /etc/ceph/ceph.conf)
    and the cephx user without ``client.`` (None: ``admin``)."""

    pool: str
    namespace: str = ""
    conf: str | None = None
    client_id: str | None = None

    @classmethod
    def parse(cls, text: str, conf: str | None = None, client_id: str | None = None) -> RbdPoolSpec:
        """``POOL`` or ``POOL/NAMESPACE``; ValueError naming the problem."""
        pool, _, namespace = text.partition("/")
        if not pool or "/" in namespace or "@" in text:
            raise ValueError(f"{text!r} is not POOL or POOL/NAMESPACE")
        return cls(pool, namespace, conf, client_id)

    def __str__(self) -> str:
        return f"{self.pool}/{self.namespace}" if self.namespace else self.pool


@dataclass(frozen=True)
class RbdImageSpec:
    """One image: its pool (:class:`RbdPoolSpec`) and name."""

    where: RbdPoolSpec
    name: str

    @classmethod
    def parse(
        cls, text: str, conf: str | None = None, client_id: str | None = None
    ) -> RbdImageSpec:
        """``POOL/IMAGE`` or ``POOL/NAMESPACE/IMAGE`` (rbd's own spelling); ValueError
        naming the problem."""
        head, sep, name = text.rpartition("/")
        bad = ValueError(f"{text!r} is not POOL/IMAGE or POOL/NAMESPACE/IMAGE")
        if not sep or not name or not head or "@" in name:
            raise bad
        try:
            return cls(RbdPoolSpec.parse(head, conf, client_id), name)
        except ValueError:
            raise bad from None

    def __str__(self) -> str:
        return f"{self.where}/{self.name}"


class _Connection:
    """A shared ``rados.Rados`` with a count of the pools sessions that use it."""

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster
        self.users = 0


#: The Objecter's in-flight budget on a gateway's connections (librbd defaults: 1024
#: requests, 100 MiB): above what its sessions keep in flight (64 sessions x 128
#: commands, 1 GiB), as a request over budget would wait in the submitting thread.
OBJECTER_OPS = 16384
OBJECTER_BYTES = 1 << 30
_connections: dict[tuple[str | None, str | None], _Connection] = {}
_connections_lock = threading.Lock()


def _connect(where: RbdPoolSpec) -> _Connection:
    rados, _ = bindings()
    key = (where.conf, where.client_id)
    with _connections_lock:
        conn = _connections.get(key)
        if conn is None:
            settings = {
                "rados_mon_op_timeout": str(OP_TIMEOUT),
                "rados_osd_op_timeout": str(OP_TIMEOUT),
                "client_mount_timeout": str(OP_TIMEOUT),
                # no write-back cache in a gateway: a write is on the OSDs when it
                # completes, so a failover to another gateway never loses or reorders
                # an acknowledged write (librbd's default caches once it sees a flush)
                "rbd_cache": "false",
                # aio_read/aio_write dispatched in the calling thread (the event loop),
                # not handed to librbd's work-queue thread first: one thread hand-off
                # fewer per request (4 KiB QD16 reads 0.50-0.54 of direct librbd against
                # 0.40-0.46, tools/bench --rbd). Dispatch is asynchronous in librbd
                # (lock acquisition, refresh and blocked writes queue the request); the
                # one wait left is the Objecter's in-flight budget, raised here above
                # what a gateway's sessions keep in flight, so it does not stall the loop
                "rbd_non_blocking_aio": "false",
                "objecter_inflight_ops": str(OBJECTER_OPS),
                "objecter_inflight_op_bytes": str(OBJECTER_BYTES),
            }
            try:
                cluster = rados.Rados(
                    conffile=where.conf or "", rados_id=where.client_id, conf=settings
                )
                cluster.connect(timeout=OP_TIMEOUT)
            except rados.Error as exc:
                raise BackendError(
                    f"cannot connect to the Ceph cluster of {where.conf or 'ceph.conf'} "
                    f"as client.{where.client_id or 'admin'}: {exc}"
                ) from exc
            if not _connections:
                atexit.register(close_connections)
            conn = _connections[key] = _Connection(cluster)
        conn.users += 1
        return conn


def _release(conn: _Connection) -> None:
    """One user less. The connection stays up for the next image: connecting costs a
    monitor session and tens of milliseconds, and units open and close images often
    (:func:`close_connections` ends them all)."""
    with _connections_lock:
        conn.users -= 1


def close_connections() -> None:
    """Shut down every connection no image uses any more (at exit; before a test
    stops its cluster)."""
    with _connections_lock:
        for key, conn in list(_connections.items()):
            if conn.users == 0:
                del _connections[key]
                conn.cluster.shutdown()


class _PoolSession:
    """An I/O context on a pool (and namespace), with its share of the connection."""

    def __init__(self, where: RbdPoolSpec) -> None:
        self.where = where
        rados, _ = bindings()
        self._conn = _connect(where)
        self.cluster = self._conn.cluster
        try:
            self.ioctx = self._conn.cluster.open_ioctx(where.pool)
            if where.namespace:
                self.ioctx.set_namespace(where.namespace)
        except rados.Error as exc:
            _release(self._conn)
            raise BackendError(f"cannot open RADOS pool {where.pool!r}: {exc}") from exc

    def close(self) -> None:
        if self.ioctx is not None:
            self.ioctx.close()
            self.ioctx = None
            _release(self._conn)

    def __enter__(self) -> _PoolSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def create_image(spec: RbdImageSpec, size: int) -> None:
    """Create a thin image of ``size`` bytes; BackendError when it exists already
    (nothing stored is touched) or the pool refuses."""
    _, rbd = bindings()
    with _PoolSession(spec.where) as pool:
        try:
            rbd.RBD().create(pool.ioctx, spec.name, size)
        except rbd.ImageExists as exc:
            raise BackendError(f"RBD image {spec} exists already") from exc
        except rbd.Error as exc:
            raise BackendError(f"cannot create RBD image {spec}: {exc}") from exc


def pr_object_name(image_id: str) -> str:
    """The RADOS object beside the image with id ``image_id`` that holds its LU's
    persistent reservations (:mod:`.rbd_pr`)."""
    return f"iscsi_vmtarget.pr.{image_id}"


def role_object_name(image_id: str) -> str:
    """The RADOS object beside the image with id ``image_id`` that names the gateway
    holding its ALUA owner role (``server/alua_role.py``)."""
    return f"iscsi_vmtarget.alua.{image_id}"


def remove_image(spec: RbdImageSpec) -> None:
    """Delete an image and its data, and the objects kept beside it (reservations,
    ALUA owner role); BackendError when it cannot."""
    rados, rbd = bindings()
    with _PoolSession(spec.where) as pool:
        try:
            with rbd.Image(pool.ioctx, spec.name, read_only=True) as image:
                image_id = str(image.id())
            rbd.RBD().remove(pool.ioctx, spec.name)
        except rbd.Error as exc:
            raise BackendError(f"cannot remove RBD image {spec}: {exc}") from exc
        for name in (pr_object_name(image_id), role_object_name(image_id)):
            try:
                pool.ioctx.remove_object(name)
            except rados.ObjectNotFound:
                pass
            except rados.Error as exc:
                raise BackendError(f"RBD image {spec} removed, not {name}: {exc}") from exc


def list_images(where: RbdPoolSpec) -> list[str]:
    """Names of the images in a pool (namespace), sorted."""
    _, rbd = bindings()
    with _PoolSession(where) as pool:
        try:
            return sorted(rbd.RBD().list(pool.ioctx))
        except rbd.Error as exc:
            raise BackendError(f"cannot list RBD pool {where}: {exc}") from exc


def rename_image(where: RbdPoolSpec, old: str, new: str) -> None:
    """Rename an image (atomic in RBD's directory; an open image stays usable: it is
    addressed by its id)."""
    _, rbd = bindings()
    with _PoolSession(where) as pool:
        try:
            rbd.RBD().rename(pool.ioctx, old, new)
        except rbd.Error as exc:
            raise BackendError(f"cannot rename RBD image {where}/{old} to {new}: {exc}") from exc


def free_bytes(where: RbdPoolSpec) -> int | None:
    """Raw space still free in the cluster (before replication; pool quotas not
    counted); None when the cluster does not know (its usage comes from ceph-mgr: a
    cluster without one reports 0 of 0)."""
    rados, _ = bindings()
    with _PoolSession(where) as pool:
        try:
            stats = pool.cluster.get_cluster_stats()
        except rados.Error as exc:
            raise BackendError(f"cannot read the free space of {where}: {exc}") from exc
    return int(stats["kb_avail"]) * 1024 if stats["kb"] else None


def image_exists(spec: RbdImageSpec) -> bool:
    return spec.name in list_images(spec.where)


def open_image(spec: RbdImageSpec, size: int | None, read_only: bool = False) -> RbdBackend:
    """Open an image, first creating it thin when it is missing and ``size`` is given
    (an existing image is never resized); BackendError naming the problem."""
    if size is not None and not image_exists(spec):
        create_image(spec, size)
    return RbdBackend(spec, read_only=read_only)


class RbdBackend:
    """An open RBD image as a :class:`~.backend.BlockBackend`, with the abilities
    :class:`~.backend.AllocationMap`, :class:`~.backend.Zeroing`,
    :class:`~.backend.Remeasurable` and :class:`~.backend.AsyncIO`."""

    #: each I/O waits on OSDs (a millisecond or more): never on the server's event loop
    remote_io = True

    def __init__(self, spec: RbdImageSpec, read_only: bool = False) -> None:
        rados, rbd = bindings()
        self.spec = spec
        self._rados, self._rbd = rados, rbd
        self.read_only = read_only
        self._pool = _PoolSession(spec.where)
        self._closers: list[Callable[[], None]] = []
        try:
            self._image = rbd.Image(self._pool.ioctx, spec.name, read_only=read_only)
            self._retired: list[Any] = []
            # the C-API path of the open handle (rbd_aio), decided at its first aio
            self._events: ImageEvents | None = None
            self._events_decided = False
            self._retired_events: list[ImageEvents] = []
            self._size = int(self._image.size())
            #: the image's own id: stays the same when the image is renamed
            self.image_id = str(self._image.id())
        except rbd.Error as exc:
            self._pool.close()
            if isinstance(exc, rbd.ImageNotFound):
                raise BackendError(f"RBD image {spec} does not exist") from exc
            raise BackendError(f"cannot open RBD image {spec}: {exc}") from exc

    @property
    def size(self) -> int:
        return self._size

    def remeasure(self) -> int:
        """The image's size now; :attr:`size` from then on. librbd refreshes a
        writable handle whose image another handle resized (it watches the image's
        header); a read-only handle does not watch, so it is opened again (by the
        image's id: a unit's image may have been renamed since). The old handle
        stays open until :meth:`close`, for I/O still running on it."""
        try:
            if self.read_only:
                again = self._rbd.Image(self._pool.ioctx, image_id=self.image_id, read_only=True)
                self._retired.append(self._image)
                if self._events is not None:
                    self._retired_events.append(self._events)
                self._image, self._events, self._events_decided = again, None, False
            self._size = int(self._image.size())
        except self._rbd.Error as exc:
            raise self._io_error("size", exc) from exc
        return self._size

    def _io_error(self, what: str, exc: Exception) -> BackendError:
        return BackendError(f"RBD image {self.spec}: {what} failed: {exc}")

    def _read(self, offset: int, length: int) -> bytes:
        check_range(self._size, offset, length)
        try:
            return bytes(self._image.read(offset, length)) if length else b""
        except self._rbd.Error as exc:
            raise self._io_error("read", exc) from exc

    def read_into(self, offset: int, buf: memoryview) -> None:
        data = self._read(offset, len(buf))
        buf[: len(data)] = data
        if len(data) < len(buf):  # librbd returns what exists; the rest reads as zeros
            buf[len(data) :] = bytes(len(buf) - len(data))

    def read(self, offset: int, length: int) -> bytearray:
        out = bytearray(self._read(offset, length))
        if len(out) < length:
            out.extend(bytes(length - len(out)))
        return out

    def _check_writable(self) -> None:
        if self.read_only:
            raise BackendError(f"RBD image {self.spec} is open read-only")

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check_writable()
        payload = data if isinstance(data, bytes) else bytes(data)  # librbd wants bytes
        check_range(self._size, offset, len(payload))
        try:
            done = self._image.write(payload, offset)
        except self._rbd.Error as exc:
            raise self._io_error("write", exc) from exc
        if done != len(payload):
            raise BackendError(f"RBD image {self.spec}: short write ({done} of {len(payload)})")

    def flush(self) -> None:
        if self.read_only:
            return
        try:
            self._image.flush()
        except self._rbd.Error as exc:
            raise self._io_error("flush", exc) from exc

    # -- AsyncIO (backend.AsyncIO): librbd's aio_read / aio_write ------------------------
    # Started on an event loop: the C API, finished on the loop (rbd_aio). Elsewhere:
    # python3-rbd's, whose callback runs in librbd's finisher thread (holding the GIL);
    # its completion keeps the request's buffer alive until then. One image handle
    # never mixes the two (rbd_aio's module doc).

    def _aio_failed(self, what: str, code: int) -> BackendError:
        return BackendError(f"RBD image {self.spec}: {what} failed: {os.strerror(-code)}")

    def merged_requests(self) -> tuple[int, int]:
        """Reads and writes that went to librbd merged into an adjacent one, since the
        image was opened (:mod:`.rbd_aio`, "Merging")."""
        events = [e for e in (*self._retired_events, self._events) if e is not None]
        return sum(e.merged_reads for e in events), sum(e.merged_writes for e in events)

    def _event_path(self) -> ImageEvents | None:
        if not self._events_decided:
            self._events_decided = True
            self._events = events_for(self.handle(), self._aio_failed)
        return self._events

    def start_read(self, offset: int, length: int, done: ReadDone) -> None:
        check_range(self._size, offset, length)
        events = self._events if self._events_decided else self._event_path()
        if events is not None:
            events.start_read(offset, length, done)
            return

        def complete(completion: Any, data: bytes | None) -> None:
            code = completion.get_return_value()
            if code < 0 or data is None:
                done(self._aio_failed("read", min(code, -errno.EIO)))
            elif len(data) < length:  # what exists; the rest reads as zeros
                done(data + bytes(length - len(data)))
            else:
                done(data)

        try:
            self._image.aio_read(offset, length, complete)
        except self._rbd.Error as exc:
            raise self._io_error("read", exc) from exc

    def start_write(self, offset: int, data: bytes | bytearray | memoryview,
                    done: WriteDone) -> None:
        self._check_writable()
        check_range(self._size, offset, len(data))
        events = self._events if self._events_decided else self._event_path()
        if events is not None:
            events.start_write(offset, data, done)
            return
        payload = data if isinstance(data, bytes) else bytes(data)  # the binding wants bytes

        def complete(completion: Any) -> None:
            code = completion.get_return_value()  # 0 once the whole write is stored
            done(self._aio_failed("write", code) if code < 0 else None)

        try:
            self._image.aio_write(payload, offset, complete)
        except self._rbd.Error as exc:
            raise self._io_error("write", exc) from exc

    def unmap(self, offset: int, length: int) -> None:
        """Free a range (whole objects are deleted); it then reads as zeros."""
        self._check_writable()
        check_range(self._size, offset, length)
        if not length:
            return
        try:
            self._image.write_zeroes(offset, length)
        except self._rbd.Error as exc:
            raise self._io_error("write_zeroes", exc) from exc

    def zero_range(self, offset: int, length: int) -> None:
        """Zero a range and keep its space (written zeros: RBD has no unwritten
        extents)."""
        self._check_writable()
        check_range(self._size, offset, length)
        chunk = bytes(min(length, _ZERO_CHUNK))
        end = offset + length
        while offset < end:
            n = min(end - offset, len(chunk))
            self.write(offset, chunk if n == len(chunk) else chunk[:n])
            offset += n

    def allocated_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Extents of the existing RADOS objects within a range, in order, merged."""
        check_range(self._size, offset, length)
        out: list[tuple[int, int]] = []
        end = offset + length

        def extent(start: int, size: int, exists: bool) -> int:
            first, last = max(start, offset), min(start + size, end)
            if exists and last > first:
                if out and out[-1][0] + out[-1][1] >= first:
                    out[-1] = (out[-1][0], max(last, out[-1][0] + out[-1][1]) - out[-1][0])
                else:
                    out.append((first, last - first))
            return 0

        if length:
            try:
                self._image.diff_iterate(offset, length, None, extent)
            except self._rbd.Error as exc:
                raise self._io_error("diff_iterate", exc) from exc
        return out

    def resize(self, size: int) -> None:
        self._check_writable()
        try:
            self._image.resize(size)
        except self._rbd.Error as exc:
            raise self._io_error(f"resize to {size}", exc) from exc
        self._size = size

    @property
    def closed(self) -> bool:
        return self._image is None

    def handle(self) -> Any:
        """The open ``rbd.Image`` (for :mod:`.rbd_lock`); BackendError once closed."""
        if self._image is None:
            raise BackendError(f"RBD image {self.spec} is closed")
        return self._image

    @property
    def cluster(self) -> Any:
        """The ``rados.Rados`` connection this image is reached through."""
        return self._pool.cluster

    def client_address(self) -> str:
        """This process's client address, as lock owners and watchers name it."""
        try:
            return str(self.cluster.get_addrs())
        except self._rados.Error as exc:
            raise BackendError(f"RBD image {self.spec}: own address unknown: {exc}") from exc

    def watchers(self) -> list[str]:
        """The client addresses watching the image header: the clients that have it
        open (a dead one's watch lasts until ``osd client watch timeout``)."""
        try:
            return [str(w["addr"]) for w in self.handle().watchers_list()]
        except self._rbd.Error as exc:
            raise BackendError(f"RBD image {self.spec}: watchers unknown: {exc}") from exc

    def metadata_store(self, key: str) -> RbdMetadataBlob:
        """A small blob kept in this image's own metadata under ``key``."""
        return RbdMetadataBlob(self, key)

    def on_close(self, closer: Callable[[], None]) -> None:
        """Call ``closer`` when the image is closed (what lives beside it goes with it)."""
        self._closers.append(closer)

    def close(self) -> None:
        if self._image is not None:
            closers, self._closers = self._closers, []
            for closer in closers:
                closer()
            for events in [*self._retired_events, self._events]:
                if events is not None:  # its requests finish before the handle goes
                    events.drain(OP_TIMEOUT + 5)
            try:
                for image in [*self._retired, self._image]:
                    image.close()
            finally:
                self._image = None
                self._pool.close()


class RbdMetadataBlob:
    """Bytes kept under one key of an image's metadata (``rbd image-meta``; stored in
    the image header object, so whoever opens the image reads the same, and it goes
    with the image). ``load``/``save``/``clear``, each one round trip to the cluster."""

    def __init__(self, backend: RbdBackend, key: str) -> None:
        self._backend = backend
        self.key = key

    def _image(self) -> Any:
        image = self._backend._image
        if image is None:
            raise BackendError(f"RBD image {self._backend.spec} is closed")
        return image

    def load(self) -> bytes | None:
        rbd = self._backend._rbd
        try:
            text = self._image().metadata_get(self.key)
        except KeyError:
            return None
        except rbd.Error as exc:
            raise self._backend._io_error(f"reading metadata {self.key}", exc) from exc
        return base64.b64decode(text)

    def save(self, data: bytes) -> None:
        rbd = self._backend._rbd
        try:
            self._image().metadata_set(self.key, base64.b64encode(data).decode("ascii"))
        except rbd.Error as exc:
            raise self._backend._io_error(f"writing metadata {self.key}", exc) from exc

    def clear(self) -> None:
        if self.load() is None:  # nothing to do, also on a read-only image
            return
        rbd = self._backend._rbd
        try:
            self._image().metadata_remove(self.key)
        except KeyError:
            pass
        except rbd.Error as exc:
            raise self._backend._io_error(f"removing metadata {self.key}", exc) from exc
