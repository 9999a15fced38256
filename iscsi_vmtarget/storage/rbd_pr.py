"""Persistent reservation state shared by every gateway of an RBD image, in RADOS.

The LU's whole reservation state (the JSON document of ``scsi/pr_state.py``; this
module only moves bytes) is the body of one RADOS object beside the image:
``iscsi_vmtarget.pr.<image id>`` in the image's pool and namespace (named by the id, so
it follows a renamed image).

- **Compare-and-swap.** :meth:`RadosPrStore.load` reads the body and the object's
  version; :meth:`RadosPrStore.commit` writes the new body only if the object is still
  at that version (:class:`~.rados_object.VersionedObject`: ``assert_version``, or an
  exclusive create when there was none). A refused commit writes nothing; the caller
  reads again and makes its change anew.
- **Watch/notify.** Every gateway watches the object. After a commit the gateway
  notifies it with the new state and the unit attentions the change implies; each other
  gateway takes both in its watch callback before it acknowledges, and ``notify``
  returns when all have acknowledged (or after :data:`NOTIFY_TIMEOUT_MS`), so when a
  PERSISTENT RESERVE OUT completes the live gateways enforce what it did. A gateway whose
  watch broke (it was cut off longer than the watch timeout) watches again and reads the
  state anew.
- **Power on.** A gateway that opens the LU while no other one serves it
  (:meth:`RadosPrStore.alone`: nobody acknowledges a probe notify on the object, and
  no other client has the image open) is the LU's power on: what was registered
  without APTPL ends there (SPC-4 §5.13.5).
"""

from __future__ import annotations

import errno
import json
import logging
import threading
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from .backend import BackendError
from .rados_object import VersionedObject
from .rbd import OP_TIMEOUT, RbdBackend, bindings, pr_object_name

log = logging.getLogger(__name__)

#: How long a change waits for the other gateways to take it (milliseconds).
NOTIFY_TIMEOUT_MS = 5000
#: The largest state read (a registration takes ~300 bytes of JSON).
_MAX_STATE = 4 << 20

Listener = Callable[[bytes], None]


class Legacy(Protocol):
    """Where an earlier version kept the state (read once, while no object exists)."""

    def load(self) -> bytes | None: ...


#: the RADOS object holding the reservations of the image with a given id
object_name = pr_object_name


class RadosPrStore:
    """The shared reservation state of the LU on ``backend``'s image (the
    ``SharedPrStore`` protocol of ``scsi/pr_state.py``). ``legacy``: where an earlier
    version kept APTPL state (the image's metadata, a file of the state directory),
    read once when no object exists."""

    def __init__(self, backend: RbdBackend, legacy: Legacy | None = None) -> None:
        self._rados, _ = bindings()
        self._backend = backend
        self._spec = backend.spec
        self._legacy = legacy
        self.name = object_name(backend.image_id)
        self._object = VersionedObject(backend, self.name, _MAX_STATE)
        self._ioctx = self._object.ioctx
        #: tells this gateway's own announcements from the others'
        self._token = uuid.uuid4().hex
        self._io = threading.Lock()  # one load or commit at a time (``_based_on``)
        self._based_on: int | None = None  # version load() returned; None: no object
        self._newest_lock = threading.Lock()
        self._newest_version = -1  # the newest state known (read, written or announced)
        self._newest: bytes | None = None
        self._listener: Listener | None = None
        self._watch: Any = None
        self._closed = False
        backend.on_close(self.close)

    def _read(self) -> tuple[int | None, bytes | None]:
        """The object's (version, body); (None, None) when it does not exist."""
        version, data = self._object.read()
        if version is not None and data is not None:
            self._took(version, data)
        return version, data

    def _took(self, version: int, data: bytes) -> None:
        with self._newest_lock:
            if version > self._newest_version:
                self._newest_version, self._newest = version, data

    def load(self) -> bytes | None:
        with self._io:
            version, data = self._read()
            if version is None and self._legacy is not None:
                data = self._legacy.load()
                if data:  # state of an earlier version: it becomes the shared object
                    self._based_on = None
                    self._write(data)
                    version, data = self._read()
            self._based_on = version
            return data

    def commit(self, data: bytes) -> bool:
        with self._io:
            return self._write(data)

    def _write(self, data: bytes) -> bool:
        version = self._object.swap(data, self._based_on)
        if version is None:
            return False
        self._based_on = version
        self._took(version, bytes(data))
        return True

    def latest(self) -> bytes | None:
        with self._newest_lock:
            return self._newest

    def announce(self, message: bytes) -> None:
        with self._newest_lock:
            version, state = self._newest_version, self._newest
        note = {
            "from": self._token,
            "version": version,
            "state": None if state is None else state.decode(),
            "message": message.decode(),
        }
        try:
            self._ioctx.notify(self.name, json.dumps(note), NOTIFY_TIMEOUT_MS)
        except self._rados.Error as exc:
            # stored all the same: a gateway that did not answer reads it when its
            # watch comes back, and before each reservation command
            log.warning("RBD image %s: not every gateway took a change: %s", self._spec, exc)

    def listen(self, listener: Listener) -> None:
        self._listener = listener
        self._start_watch()

    def _start_watch(self) -> None:
        """Watch the object, made first (empty: no state) if it does not exist: a watch
        needs one."""
        self._object.ensure()
        try:
            self._watch = self._ioctx.watch(self.name, self._notified, self._broken)
        except self._rados.Error as exc:
            raise self._object.error("watching", exc) from exc

    def _notified(self, notify_id: int, notifier_id: int, watch_id: int, data: bytes) -> None:
        """A notify on the object (run by librados; the notifier waits for the return)."""
        listener = self._listener
        try:
            note = json.loads(data)
            if note.get("from") == self._token or note.get("probe") or listener is None:
                return
            version, state = note.get("version"), note.get("state")
            message = str(note.get("message", "")).encode()
        except (ValueError, AttributeError):
            return
        if isinstance(version, int) and isinstance(state, str):
            self._took(version, state.encode())
        try:
            listener(message)
        except Exception:
            log.exception("RBD image %s: applying a reservation change failed", self._spec)

    def _broken(self, watch_id: int, err: int) -> None:
        """The watch is gone (this gateway was cut off): watch again, read again.
        python3-rados calls this with the watch's id and the error (its ``watch``
        annotation names one argument; a callback taking one raised TypeError inside
        librados, so the watch stayed lost and the next gateway to start took itself
        for the LU's power on)."""
        if self._closed:
            return
        log.warning("RBD image %s: reservation watch lost (%s); watching again", self._spec, err)
        threading.Thread(target=self._rewatch, name="rbd-pr-rewatch", daemon=True).start()

    def _rewatch(self) -> None:
        try:
            if self._watch is not None:
                self._watch.close()
        except self._rados.Error:
            pass
        try:
            self._start_watch()
            with self._io:
                self._read()
            if self._listener is not None:
                self._listener(b"")
        except BackendError as exc:
            log.error("RBD image %s: reservations not watched: %s", self._spec, exc)

    def alone(self) -> bool:
        """Whether no other gateway watches the object: a probe notify that nobody
        acknowledges (called before this gateway watches it). A gateway that does not
        answer (dead, its watch not yet expired) counts as there: the state is kept."""
        rados = self._rados
        done = threading.Event()
        answer: dict[str, Any] = {}

        def finished(completion: Any, ret: int, acks: Any, timeouts: Any) -> None:
            answer.update(ret=ret, acks=acks or [], timeouts=timeouts or [])
            done.set()

        probe = json.dumps({"from": self._token, "probe": True})
        try:
            self._ioctx.aio_notify(self.name, finished, msg=probe, timeout_ms=NOTIFY_TIMEOUT_MS)
        except rados.ObjectNotFound:
            return True
        except rados.Error as exc:
            log.warning("RBD image %s: other gateways unknown: %s", self._spec, exc)
            return False
        if not done.wait(NOTIFY_TIMEOUT_MS / 1000 + OP_TIMEOUT):
            return False
        if answer["ret"] not in (0, -errno.ENOENT) or answer["acks"] or answer["timeouts"]:
            return False
        return not self._image_open_elsewhere()

    def _image_open_elsewhere(self) -> bool:
        """Whether another client has the image open (watches its header): a gateway
        whose watch on the reservation object lapsed a moment (it watches again) still
        serves the LU, so this is no power on. Unknown counts as open: the state is kept."""
        try:
            me = self._backend.client_address()
            return any(address != me for address in self._backend.watchers())
        except BackendError as exc:
            log.warning("RBD image %s: other clients unknown: %s", self._spec, exc)
            return True

    def close(self) -> None:
        """Stop watching and close the I/O context (with the image)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._watch is not None:
                self._watch.close()
        except self._rados.Error:
            pass
        self._object.close()
