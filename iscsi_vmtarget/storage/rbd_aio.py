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

Merging: requests started on the loop's thread while others are in flight wait for
the end of the loop's turn (``loop.call_soon``; the commands of one receive, say)
and go to librbd then. With nothing in flight a request goes at once, so nothing
waits at queue depth 1. Consecutive waiting requests of one direction that are
adjacent on the image go as one request (``rbd_aio_readv``/``rbd_aio_writev`` over
their own buffers: nothing is copied), up to :data:`MERGE_BYTES`. This is what the
kernel's block layer does below LIO (a plugged queue merges adjacent bios before
krbd sees them). An OSD's cost is mostly per request, not per byte: on this
project's single-host test cluster, ``rbd bench`` reads 64 KiB requests 16 at a
time at 348-367 MiB/s and 256 KiB requests 4 at a time (the same bytes in flight)
at 602-683 MiB/s. A sequential stream at queue depth 16 arrives in bursts of
adjacent commands, so it merges (through one gateway: 5.8 reads or 4.5 writes of 64
KiB per librbd request); random I/O does not, and pays only the wait for the end of
the turn (no system call). Each request still holds its own range
(:class:`..scsi.logical_unit.RangeLock`), so merged requests never overlap; a
merged request that fails fails each of its requests.

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
        "rbd_aio_readv": ([_ptr, _ptr, _c.c_int, _c.c_uint64, _ptr], _c.c_int),
        "rbd_aio_writev": ([_ptr, _ptr, _c.c_int, _c.c_uint64, _ptr], _c.c_int),
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

#: Adjacent requests started in one turn of the event loop go to librbd as one
#: (module doc, "Merging"): at most this many bytes and requests each.
MERGE_BYTES = 512 << 10
MERGE_COUNT = 64


class _Iovec(_c.Structure):
    _fields_ = [("base", _c.c_void_p), ("len", _c.c_size_t)]


#: one request: offset, length, what librbd reads into or writes from (a ctypes
#: array over the caller's buffer, which it keeps alive, or ``bytes``), ``done``, and
#: the buffer a read fills (None for a write)
Request = tuple[int, int, Any, Done, "bytearray | None"]


def merged_runs(requests: list[tuple[int, int, bool]],
                max_bytes: int = MERGE_BYTES, max_count: int = MERGE_COUNT) -> list[int]:
    """Where each run of ``requests`` ((offset, length, is a write), in the order they
    were started) ends: consecutive requests of one direction, each starting where
    the one before ended, at most ``max_bytes`` and ``max_count`` together. The
    run ends as indexes past its last request (the last one: ``len(requests)``)."""
    ends: list[int] = []
    run_end = run_bytes = run_count = 0
    run_write = False
    for i, (offset, length, write) in enumerate(requests):
        if (
            i
            and offset == run_end
            and write == run_write
            and run_bytes + length <= max_bytes
            and run_count < max_count
        ):
            run_end += length
            run_bytes += length
            run_count += 1
            continue
        if i:
            ends.append(i)
        run_end, run_bytes, run_count, run_write = offset + length, length, 1, write
    if requests:
        ends.append(len(requests))
    return ends


def _address(buf: Any) -> int:
    """The address of a request's bytes (a ctypes array, or ``bytes``)."""
    if isinstance(buf, bytes):
        return _c.cast(_c.c_char_p(buf), _c.c_void_p).value or 0
    return _c.addressof(buf)


def finish_run(run: list[Request], code: int, failed: Failure) -> None:
    """End the requests of one finished librbd request: ``code`` is its result (for
    a read, the bytes read into the run's buffers in order; whatever it did not
    reach is zeroed, :func:`read_result`). A failure fails every request of the run.
    A ``done`` that raises (a caller's bug) is logged; the others still run."""
    read = run[0][4] is not None
    error = failed("read" if read else "write", code) if code < 0 else None
    for _offset, length, _buf, done, out in run:
        try:
            if error is not None:
                done(error)
            elif out is None:
                done(None)
            else:
                done(read_result(out, max(0, code)))
                code -= length
        except Exception:
            _log.exception("rbd completion callback failed")


class ImageEvents:
    """One open image's asynchronous requests, finished on one event loop.

    ``start_read``/``start_write`` may be called from any thread; ``done`` runs on the
    loop's thread (or on the thread that :meth:`drain` s at close). Requests started
    on the loop's thread while others are in flight wait for the end of the loop's
    turn and go to librbd then, adjacent ones merged (module doc, "Merging")."""

    def __init__(self, handle: int, loop: asyncio.AbstractEventLoop, failed: Failure) -> None:
        assert _lib is not None
        self._handle = handle
        self._failed = failed
        self._closed = False
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        if _lib.rbd_set_image_notification(handle, self._fd, _EVENT_TYPE_EVENTFD) != 0:
            os.close(self._fd)
            raise OSError(errno.EIO, "rbd_set_image_notification failed")
        #: completion address -> (its requests, what librbd reads from while it runs)
        self._pending: dict[int, tuple[list[Request], Any]] = {}
        self._reaping = threading.Lock()
        self._batch = (_c.c_void_p * _BATCH)()
        #: requests started in this turn of the loop, not yet given to librbd
        self._plug: list[Request] = []
        self._plugging = threading.Lock()
        self._loop_thread = threading.get_ident()  # made on the loop (events_for)
        #: reads and writes that went out merged into the one before them (iostat's
        #: rrqm and wrqm)
        self.merged_reads = self.merged_writes = 0
        self.loop = loop
        loop.add_reader(self._fd, self.reap)

    def _queue(self, request: Request) -> None:
        if self._closed:  # refused outright, as librbd refuses a closed image
            raise self._failed("read" if request[4] is not None else "write", -errno.EBADF)
        # off the loop, or nothing in flight to wait behind (queue depth 1): at once
        if threading.get_ident() != self._loop_thread or not (self._pending or self._plug):
            self._submit([request], refuse=True)
            return
        with self._plugging:
            plug = self._plug
            plug.append(request)
            if len(plug) > 1:
                return
        try:
            self.loop.call_soon(self.unplug)
        except RuntimeError:  # the loop is closed: no turn will end, send it now
            self.unplug()

    def unplug(self) -> None:
        """Give librbd every request waiting for the end of the loop's turn, adjacent
        ones merged (:func:`merged_runs`)."""
        with self._plugging:
            plug, self._plug = self._plug, []
        if len(plug) == 1:
            self._submit(plug)
            return
        begin = 0
        for end in merged_runs([(r[0], r[1], r[4] is None) for r in plug]):
            self._submit(plug[begin:end])
            begin = end

    def _submit(self, run: list[Request], refuse: bool = False) -> None:
        """Start one librbd request for ``run`` (adjacent, one direction). If librbd
        refuses it, ``refuse``: raise (nothing started); else each ``done`` gets the
        error."""
        completion = _c.c_void_p()
        _lib.rbd_aio_create_completion(None, None, _c.byref(completion))
        key = completion.value
        first = run[0]
        read = first[4] is not None
        iov = None
        if len(run) > 1:
            if read:
                self.merged_reads += len(run) - 1
            else:
                self.merged_writes += len(run) - 1
            iov = (_Iovec * len(run))()
            for i, request in enumerate(run):
                iov[i].base, iov[i].len = _address(request[2]), request[1]
        # registered before starting: the loop may reap it before the call returns
        self._pending[key] = (run, iov)
        if self._closed:
            code = -errno.EBADF
        elif iov is None:
            call = _lib.rbd_aio_read if read else _lib.rbd_aio_write
            code = call(self._handle, first[0], first[1], first[2], completion)
        else:
            call = _lib.rbd_aio_readv if read else _lib.rbd_aio_writev
            code = call(self._handle, iov, len(run), first[0], completion)
        if code < 0:  # refused before it started
            del self._pending[key]
            _lib.rbd_aio_release(completion)
            error = self._failed("read" if read else "write", code)
            if refuse:
                raise error
            for request in run:
                request[3](error)

    def start_read(self, offset: int, length: int, done: Done) -> None:
        """Read into a new, unzeroed bytearray: ``done(bytearray)``, or
        ``done(error)``."""
        out = uninitialized(length)
        view = (_c.c_char * length).from_buffer(out)
        self._queue((offset, length, view, done, out))

    def start_write(self, offset: int, data: bytes | bytearray | memoryview,
                    done: Done) -> None:
        """Write ``data``: ``done(None)``, or ``done(error)``."""
        buf: Any = data
        if not isinstance(data, bytes):
            try:
                buf = (_c.c_char * len(data)).from_buffer(data)
            except TypeError:  # a read-only view: librbd gets a copy
                buf = bytes(data)
        self._queue((offset, len(data), buf, done, None))

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
                        finished.append((entry[0], code))
                for run, code in finished:
                    finish_run(run, code, self._failed)
                if count < _BATCH:
                    return

    def drain(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) for every started request to finish,
        reaping in this thread, then stop watching: before the image closes."""
        end = time.monotonic() + timeout
        self.unplug()  # what waits for the loop's turn goes now: it must finish too
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
