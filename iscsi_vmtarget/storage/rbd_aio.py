"""librbd's asynchronous reads and writes through its C API, finished on the event loop.

Why not python3-rbd's ``Image.aio_read``/``aio_write``: they call back into Python
from librbd's finisher thread, so every completion takes the GIL from the event loop
that is serving the sessions. The loop then waits for the GIL in turn, and every
request pays for two thread switches. Measured with ``tools/bench --rbd`` (one
gateway, QD16, quiet machine):

* gateway CPU per 64 KiB read: 288 µs with the binding's callbacks, 242 µs this way;
* per 64 KiB write: 313 µs, 241 µs;
* gateway/direct-librbd ratios: 64 KiB reads 0.58 → 0.63, writes 0.57 → 0.69.

How: librbd's own event notification, the way SPDK's ``bdev_rbd`` and fio's rbd
engine use it (``rbd_set_image_notification`` with an eventfd):

* a request is started with a completion that has no callback;
* when it finishes, librbd queues the completion inside the image and signals the
  eventfd;
* the event loop watches the eventfd, takes the finished completions in batches with
  ``rbd_poll_io_events`` and calls each request's ``done`` itself.

No Python runs on librbd's threads. A read lands directly in the ``bytearray`` that
becomes the Data-In; nothing is copied into a ``bytes`` first, and the buffer is not
zeroed before librbd fills it (:mod:`..buffers`, :func:`read_result`). The calls that
only touch memory keep the GIL (``ctypes.PyDLL``), as a C extension's would.
Together they measured 146 → 131 µs of the event loop's CPU per 64 KiB read (old and
new gateway alternately on one cluster, 4 runs each); a later run could not tell the
GIL part from noise (README, Scale-out on Ceph).

The C handle: python3-rbd does not expose the ``rbd_image_t`` of an ``rbd.Image``.
Cython keeps it as the object's first field, right after the object header.
:func:`image_handle` reads it there, but only for the layout checked here
(Debian 12's python3-rbd 16.2: ``rbd.Image`` 64 bytes, no virtual table). It then
verifies the handle through librbd: the same image id and size. Any other layout
keeps the binding's callbacks, which are slower and just as correct.
``tests/storage/test_rbd_aio.py`` fails if CI's packages stop matching.

An image with notification set queues *every* C-API aio completion for polling, so
one image never mixes the two ways: it is decided at its first asynchronous request
(:class:`ImageEvents` needs a running event loop to watch the eventfd).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from typing import Any

from ..buffers import uninitialized

_log = logging.getLogger(__name__)

#: ``sizeof`` of python3-rbd's ``rbd.Image`` whose first field is the ``rbd_image_t``
#: (Debian 12, 16.2.x, CPython 3.11): PyObject header, then the handle.
_KNOWN_IMAGE_SIZE = 64
_HANDLE_OFFSET = object.__basicsize__
_EVENT_TYPE_EVENTFD = 2  # librbd.h: event_socket_type_t
_BATCH = 128  # completions taken per rbd_poll_io_events call

_c = ctypes
_ptr = _c.c_void_p


def _load() -> Any | None:
    """librbd's C functions this module calls (the library python3-rbd loaded).

    The calls that only touch memory (a completion's creation, result and release,
    polling for finished ones) keep the GIL, as a C extension would: they never
    wait. The calls that may wait (starting a request: the Objecter's throttle; the
    setup calls) release it."""
    try:
        lib = _c.CDLL("librbd.so.1")
        quick = _c.PyDLL("librbd.so.1")
    except OSError:
        return None
    sigs: dict[str, tuple[list[Any], Any]] = {
        "rbd_aio_create_completion": ([_ptr, _ptr, _c.POINTER(_ptr)], _c.c_int),
        "rbd_aio_read": ([_ptr, _c.c_uint64, _c.c_size_t, _ptr, _ptr], _c.c_int),
        "rbd_aio_write": ([_ptr, _c.c_uint64, _c.c_size_t, _ptr, _ptr], _c.c_int),
        "rbd_poll_io_events": ([_ptr, _ptr, _c.c_int], _c.c_int),
        "rbd_aio_get_return_value": ([_ptr], _c.c_ssize_t),
        "rbd_aio_release": ([_ptr], None),
        "rbd_set_image_notification": ([_ptr, _c.c_int, _c.c_int], _c.c_int),
        "rbd_get_size": ([_ptr, _c.POINTER(_c.c_uint64)], _c.c_int),
        "rbd_get_id": ([_ptr, _c.c_char_p, _c.c_size_t], _c.c_int),
    }
    for name, (args, result) in sigs.items():
        fn = getattr(quick if name in _QUICK else lib, name)
        fn.argtypes, fn.restype = args, result
        setattr(lib, name, fn)
    return lib


_QUICK = frozenset({"rbd_aio_create_completion", "rbd_poll_io_events",
                    "rbd_aio_get_return_value", "rbd_aio_release"})


_lib = _load()


def _in_a_file_mapping(address: int) -> bool:
    """True if ``address`` lies in a mapped file (a library's code or data), where a
    virtual table would point; librbd's image context is on the heap."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                span, _, rest = line.partition(" ")
                low, _, high = span.partition("-")
                if int(low, 16) <= address < int(high, 16):
                    fields = rest.split()
                    return len(fields) > 4 and fields[4].startswith("/")
    except OSError:
        return True
    return False


def image_handle(image: Any) -> int | None:
    """The ``rbd_image_t`` of an open python3-rbd ``rbd.Image``, or None when this
    build's layout is not the known one or the handle does not check out (module doc)."""
    if _lib is None or type(image).__basicsize__ != _KNOWN_IMAGE_SIZE:
        return None
    handle = _c.c_void_p.from_address(id(image) + _HANDLE_OFFSET).value
    if not handle or _in_a_file_mapping(handle):
        return None
    size = _c.c_uint64()
    name = _c.create_string_buffer(64)
    if _lib.rbd_get_size(handle, _c.byref(size)) != 0 or size.value != image.size():
        return None
    if _lib.rbd_get_id(handle, name, len(name)) != 0 or name.value.decode() != image.id():
        return None
    return handle


def read_result(out: bytearray, code: int) -> bytearray:
    """A finished read's buffer (``code``: librbd's count of bytes read): whatever a
    short read did not reach is zeroed, so no old memory ever leaves in a Data-In.
    (librbd reads all of a range inside the image; this is the guarantee.)"""
    if code < len(out):
        out[code:] = bytes(len(out) - code)
    return out


Done = Callable[[Any], None]
#: (what failed: "read" or "write", librbd's negative errno) -> the error ``done`` gets
Failure = Callable[[str, int], Exception]


class ImageEvents:
    """One open image's asynchronous requests, finished on one event loop.

    ``start_read``/``start_write`` may be called from any thread; ``done`` runs on the
    loop's thread (or on the thread that :meth:`drain` s at close)."""

    def __init__(self, handle: int, loop: asyncio.AbstractEventLoop, failed: Failure) -> None:
        assert _lib is not None
        self._handle = handle
        self._failed = failed
        self._closed = False
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        if _lib.rbd_set_image_notification(handle, self._fd, _EVENT_TYPE_EVENTFD) != 0:
            os.close(self._fd)
            raise OSError(errno.EIO, "rbd_set_image_notification failed")
        #: completion address -> (buffer kept alive, done, read length or -1 for a write)
        self._pending: dict[int, tuple[Any, Done, int]] = {}
        self._reaping = threading.Lock()
        self._batch = (_c.c_void_p * _BATCH)()
        self.loop = loop
        loop.add_reader(self._fd, self.reap)

    def _start(self, call: Any, offset: int, length: int, buf: Any, keep: Any,
               done: Done, read: int) -> None:
        completion = _c.c_void_p()
        _lib.rbd_aio_create_completion(None, None, _c.byref(completion))
        key = completion.value
        # registered before starting: the loop may reap it before the call returns
        self._pending[key] = (keep, done, read)
        closed = self._closed
        code = -errno.EBADF if closed else call(self._handle, offset, length, buf, completion)
        if code < 0:  # refused before it started
            del self._pending[key]
            _lib.rbd_aio_release(completion)
            raise self._failed("read" if read >= 0 else "write", code)

    def start_read(self, offset: int, length: int, done: Done) -> None:
        """Read into a new, unzeroed bytearray: ``done(bytearray)``, or
        ``done(error)``."""
        out = uninitialized(length)
        view = (_c.c_char * length).from_buffer(out)
        self._start(_lib.rbd_aio_read, offset, length, view, (out, view), done, length)

    def start_write(self, offset: int, data: bytes | bytearray | memoryview,
                    done: Done) -> None:
        """Write ``data``: ``done(None)``, or ``done(error)``."""
        buf: Any = data
        if not isinstance(data, bytes):
            try:
                buf = (_c.c_char * len(data)).from_buffer(data)
            except TypeError:  # a read-only view: librbd gets a copy
                buf = bytes(data)
        self._start(_lib.rbd_aio_write, offset, len(data), buf, (data, buf), done, -1)

    @property
    def busy(self) -> int:
        """Requests started and not yet finished."""
        return len(self._pending)

    def reap(self) -> None:
        """Call ``done`` for every finished request (the eventfd's reader)."""
        with self._reaping:
            if self._closed:  # a wakeup already queued when the image closed
                return
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._fd)
            batch, pending, lib = self._batch, self._pending, _lib
            while True:
                count = lib.rbd_poll_io_events(self._handle, batch, _BATCH)
                finished = []
                for i in range(count):
                    completion = batch[i]
                    code = lib.rbd_aio_get_return_value(completion)
                    lib.rbd_aio_release(completion)
                    entry = pending.pop(completion, None)
                    if entry is not None:
                        finished.append((entry, code))
                for (keep, done, read), code in finished:
                    try:
                        if code < 0:
                            done(self._failed("read" if read >= 0 else "write", code))
                        else:
                            done(None if read < 0 else read_result(keep[0], code))
                    except Exception:  # a caller's bug: the other requests still finish
                        _log.exception("rbd completion callback failed")
                if count < _BATCH:
                    return

    def drain(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) for every started request to finish,
        reaping in this thread, then stop watching: before the image closes."""
        end = time.monotonic() + timeout
        while self._pending and not self._closed and time.monotonic() < end:
            select.select([self._fd], [], [], max(0.0, min(0.1, end - time.monotonic())))
            self.reap()
        with self._reaping:  # no reap after this: the image's handle is about to go
            self._closed = True
        if self._pending:
            _log.error("%d RBD requests still running at close", len(self._pending))
        self._stop_watching()

    def _stop_watching(self) -> None:
        fd, self._fd = self._fd, -1
        if fd < 0:
            return

        def stop() -> None:
            with contextlib.suppress(Exception):  # the loop may be closed already
                self.loop.remove_reader(fd)
            os.close(fd)

        if self.loop.is_closed():
            os.close(fd)
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            stop()
        else:
            try:
                self.loop.call_soon_threadsafe(stop)
            except RuntimeError:  # closed meanwhile
                os.close(fd)


def events_for(image: Any, failed: Failure) -> ImageEvents | None:
    """An :class:`ImageEvents` for ``image`` bound to the event loop running in this
    thread; None when no loop runs here or the C handle is not available."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    handle = image_handle(image)
    if handle is None:
        return None
    return ImageEvents(handle, loop, failed)
