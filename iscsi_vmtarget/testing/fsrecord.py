"""Record every file-system mutation a Python process makes under one directory.

The power-cut simulator (:mod:`.powercut`) needs the exact sequence of writes, flushes
and name changes an operation makes, with their data, to rebuild what a disk would
hold after a power cut at any point. This module wraps the ``os``-level calls (and
``open``/``io.open``/``os.fdopen`` for writable files) in the process under test and
appends one record per call to a log; nothing else of the program changes.

Recorded (only for paths and descriptors under ``ROOT``):

* ``base_dir``/``base_file``: what ``ROOT`` held at start (inode numbers, sizes and
  the data extents of every file, read with SEEK_DATA/SEEK_HOLE so sparse units stay
  small);
* ``create``, ``mkdir``, ``rename`` (``os.rename``/``os.replace``), ``link``,
  ``unlink``, ``rmdir``: name changes, by path relative to ``ROOT``;
* ``write`` (``os.write``/``pwrite``/``pwritev``, buffered file writes, with the
  position they land at), ``trunc`` (``O_TRUNC``, ``ftruncate``, ``truncate``),
  ``zero`` (hole punching / zero range), ``falloc`` (``posix_fallocate``): data, by
  inode number; a write through a descriptor opened ``O_DSYNC``/``O_SYNC``/``O_DIRECT``
  is marked durable;
* ``fsync``/``fdatasync`` of a file or a directory, by inode number.

Each record is logged after its call succeeded, with one unbuffered ``write(2)``, so
another process (the verifying initiator of a data-path run) can tell by the log's size
which mutations happened before it received an acknowledgement (:func:`mark`).

Run a command under it: ``python3 -m iscsi_vmtarget.testing.fsrecord LOG ROOT --
ARGS...`` runs ``python3 -m iscsi_vmtarget ARGS...`` with the recorder installed
(``--module MODULE`` before ``--``: ``python3 -m MODULE ARGS...`` instead).
"""

from __future__ import annotations

import builtins
import io
import os
import pickle
import runpy
import struct
import sys
import threading
from collections.abc import Iterator
from typing import Any

Record = tuple[Any, ...]
_SYNC_FLAGS = os.O_DSYNC | os.O_SYNC | getattr(os, "O_DIRECT", 0)


def read_log(path: str) -> list[Record]:
    """Every record of a log, in order."""
    return [rec for _, rec in read_log_offsets(path)]


def read_log_offsets(path: str) -> Iterator[tuple[int, Record]]:
    """(end offset in the log, record) for every record of a log."""
    with open(path, "rb") as fh:
        data = fh.read()
    pos = 0
    while pos + 4 <= len(data):
        (n,) = struct.unpack_from("<I", data, pos)
        if pos + 4 + n > len(data):
            break  # a record cut by a kill: not logged
        yield pos + 4 + n, pickle.loads(data[pos + 4 : pos + 4 + n])
        pos += 4 + n


def data_extents(fd: int, size: int) -> list[tuple[int, bytes]]:
    """The data (non-hole, non-zero) extents of an open file, as (offset, bytes)."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break  # ENXIO: only a hole remains
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        for at in range(start, end, 1 << 16):  # zeros left out: a copy may be dense
            piece = os.pread(fd, min(1 << 16, end - at), at)
            if piece.count(0) != len(piece):
                out.append((at, piece))
        pos = end
    return out


class Recorder:
    """The wrappers; :meth:`install` replaces the ``os`` functions in this process."""

    def __init__(self, log: str, root: str) -> None:
        self.root = os.path.realpath(root)
        self.lock = threading.RLock()
        self.fds: dict[int, tuple[int, bool]] = {}  # fd -> (inode, durable writes)
        self.orig: dict[str, Any] = {}
        self.log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)

    # -- the log -----------------------------------------------------------------------
    def emit(self, *record: Any) -> None:
        blob = pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)
        with self.lock:
            os.write(self.log_fd, struct.pack("<I", len(blob)) + blob)

    def rel(self, path: Any) -> str | None:
        """``path`` relative to the root, None when outside it (or not a path)."""
        if isinstance(path, int):
            return None
        full = os.path.abspath(os.fsdecode(path))
        parent, name = os.path.split(full)
        full = os.path.join(os.path.realpath(parent), name)
        if full == self.root:
            return "."
        if not full.startswith(self.root + os.sep):
            return None
        return full[len(self.root) + 1 :]

    def snapshot_root(self) -> None:
        """Record what the root holds now (the state every cut starts from)."""
        for top, _dirs, files in os.walk(self.root):
            rel = os.path.relpath(top, self.root)
            self.emit("base_dir", rel, os.stat(top).st_ino)
            for name in sorted(files):
                path = os.path.join(top, name)
                fd = self.orig["open"](path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    st = os.fstat(fd)
                    extents = data_extents(fd, st.st_size)
                finally:
                    self.orig["close"](fd)
                self.emit("base_file", os.path.normpath(os.path.join(rel, name)),
                          st.st_ino, st.st_size, extents)  # fmt: skip

    # -- descriptors -------------------------------------------------------------------
    def track(self, fd: int, path: Any, flags: int, existed: bool) -> None:
        rel = self.rel(path)
        if rel is None:
            return
        ino = os.fstat(fd).st_ino
        self.fds[fd] = (ino, bool(flags & _SYNC_FLAGS))
        if not existed:
            self.emit("create", rel, ino)
        elif flags & os.O_TRUNC and flags & (os.O_WRONLY | os.O_RDWR):
            self.emit("trunc", ino, 0)

    def ino(self, fd: int) -> int | None:
        got = self.fds.get(fd)
        return got[0] if got else None

    def written(self, fd: int, offset: int, data: bytes) -> None:
        ino, durable = self.fds[fd]
        self.emit("write", ino, offset, bytes(data), durable)

    # -- the wrappers ------------------------------------------------------------------
    def install(self) -> None:
        names = ("open", "close", "write", "pwrite", "pwritev", "ftruncate", "truncate",
                 "posix_fallocate", "rename", "replace", "link", "unlink", "remove",
                 "mkdir", "rmdir", "fsync", "fdatasync")  # fmt: skip
        for name in names:
            self.orig[name] = getattr(os, name)
            setattr(os, name, getattr(self, "_" + name))
        self.orig["io.open"] = io.open
        builtins.open = io.open = self._io_open  # type: ignore[assignment]
        try:  # hole punching goes through ctypes: wrap the backend's helper
            from ..storage import file as file_backend
        except ImportError:  # pragma: no cover
            return
        inner = file_backend._fallocate

        def fallocate(fd: int, mode: int, offset: int, length: int, what: str) -> bool:
            done = inner(fd, mode, offset, length, what)
            if done and self.ino(fd) is not None:
                self.emit("zero", self.ino(fd), offset, length)
            return done

        file_backend._fallocate = fallocate  # type: ignore[attr-defined]

    def _open(self, path: Any, flags: int, mode: int = 0o777, *, dir_fd: Any = None) -> int:
        existed = os.path.lexists(path) if self.rel(path) is not None else True
        fd = self.orig["open"](path, flags, mode, dir_fd=dir_fd)
        with self.lock:
            self.track(fd, path, flags, existed)
        return fd

    def _close(self, fd: int) -> None:
        self.fds.pop(fd, None)
        self.orig["close"](fd)

    def _write(self, fd: int, data: Any) -> int:
        if fd not in self.fds:
            return self.orig["write"](fd, data)
        pos = os.lseek(fd, 0, os.SEEK_CUR)
        n = self.orig["write"](fd, data)
        self.written(fd, pos, bytes(memoryview(data).cast("B")[:n]))
        return n

    def _pwrite(self, fd: int, data: Any, offset: int) -> int:
        n = self.orig["pwrite"](fd, data, offset)
        if fd in self.fds:
            self.written(fd, offset, bytes(memoryview(data).cast("B")[:n]))
        return n

    def _pwritev(self, fd: int, buffers: Any, offset: int, *args: Any) -> int:
        n = self.orig["pwritev"](fd, buffers, offset, *args)
        if fd in self.fds:
            joined = b"".join(bytes(memoryview(b).cast("B")) for b in buffers)
            self.written(fd, offset, joined[:n])
        return n

    def _ftruncate(self, fd: int, length: int) -> None:
        self.orig["ftruncate"](fd, length)
        if fd in self.fds:
            self.emit("trunc", self.fds[fd][0], length)

    def _truncate(self, path: Any, length: int) -> None:
        if isinstance(path, int):
            return self._ftruncate(path, length)
        self.orig["truncate"](path, length)
        if self.rel(path) is not None:
            self.emit("trunc", os.stat(path).st_ino, length)
        return None

    def _posix_fallocate(self, fd: int, offset: int, length: int) -> None:
        self.orig["posix_fallocate"](fd, offset, length)
        if fd in self.fds:
            self.emit("falloc", self.fds[fd][0], offset, length)

    def _rename(self, src: Any, dst: Any, **kw: Any) -> None:
        self._names("rename", "rename", src, dst, **kw)

    def _replace(self, src: Any, dst: Any, **kw: Any) -> None:
        self._names("replace", "rename", src, dst, **kw)

    def _link(self, src: Any, dst: Any, **kw: Any) -> None:
        self._names("link", "link", src, dst, **kw)

    def _names(self, call: str, kind: str, src: Any, dst: Any, **kw: Any) -> None:
        self.orig[call](src, dst, **kw)
        a, b = self.rel(src), self.rel(dst)
        if a is not None and b is not None:
            self.emit(kind, a, b)
        elif b is not None:  # pragma: no cover - nothing here moves files in from outside
            raise RuntimeError(f"{call} into the recorded tree from outside: {src} -> {dst}")

    def _unlink(self, path: Any, *, dir_fd: Any = None) -> None:
        self.orig["unlink"](path, dir_fd=dir_fd)
        if self.rel(path) is not None:
            self.emit("unlink", self.rel(path))

    _remove = _unlink

    def _mkdir(self, path: Any, mode: int = 0o777, *, dir_fd: Any = None) -> None:
        self.orig["mkdir"](path, mode, dir_fd=dir_fd)
        if self.rel(path) is not None:
            self.emit("mkdir", self.rel(path), os.stat(path).st_ino)

    def _rmdir(self, path: Any, *, dir_fd: Any = None) -> None:
        self.orig["rmdir"](path, dir_fd=dir_fd)
        if self.rel(path) is not None:
            self.emit("rmdir", self.rel(path))

    def _fsync(self, fd: Any) -> None:
        fd = fd if isinstance(fd, int) else fd.fileno()
        self.orig["fsync"](fd)
        if fd in self.fds:
            self.emit("fsync", self.fds[fd][0])

    def _fdatasync(self, fd: Any) -> None:
        fd = fd if isinstance(fd, int) else fd.fileno()
        self.orig["fdatasync"](fd)
        if fd in self.fds:
            self.emit("fdatasync", self.fds[fd][0])

    def _io_open(self, file: Any, mode: str = "r", buffering: int = -1,
                 encoding: str | None = None, errors: str | None = None,
                 newline: str | None = None, closefd: bool = True,
                 opener: Any = None) -> Any:  # fmt: skip
        writable = any(c in mode for c in "wax+")
        if not writable or (isinstance(file, int) and file not in self.fds):
            return self.orig["io.open"](file, mode, buffering, encoding, errors, newline,
                                        closefd, opener)  # fmt: skip
        recorder = self
        existed = isinstance(file, int) or os.path.lexists(file)

        class RecordedFileIO(io.FileIO):
            def write(self, data: Any) -> int:  # type: ignore[override]
                if self.fileno() not in recorder.fds:
                    return super().write(data)
                pos = os.lseek(self.fileno(), 0, os.SEEK_CUR)
                n = super().write(data) or 0
                recorder.written(self.fileno(), pos, bytes(memoryview(data).cast("B")[:n]))
                return n

            def truncate(self, size: int | None = None) -> int:
                n = super().truncate(size)
                if self.fileno() in recorder.fds:
                    recorder.emit("trunc", recorder.fds[self.fileno()][0], n)
                return n

            def close(self) -> None:
                if not self.closed and self.closefd:
                    recorder.fds.pop(self.fileno(), None)
                super().close()

        raw_mode = "".join(c for c in mode if c in "rwax+")
        raw = RecordedFileIO(file, raw_mode, closefd, opener=opener)
        if not isinstance(file, int):
            flags = os.O_TRUNC if "w" in mode else 0
            flags |= os.O_RDWR if "+" in mode or "r" not in mode else 0
            with self.lock:
                self.track(raw.fileno(), file, flags | os.O_WRONLY, existed)
        binary = "b" in mode
        if buffering == 0 and binary:
            return raw
        size = io.DEFAULT_BUFFER_SIZE if buffering in (-1, 1) else buffering
        buffer: Any
        if "+" in mode:
            buffer = io.BufferedRandom(raw, size)
        else:
            buffer = io.BufferedWriter(raw, size)
        if binary:
            return buffer
        return io.TextIOWrapper(buffer, encoding, errors, newline, line_buffering=buffering == 1)


_installed: Recorder | None = None


def install(log: str, root: str) -> Recorder:
    """Snapshot ``root`` into ``log`` and record from now on (once per process)."""
    global _installed
    if _installed is None:
        rec = Recorder(log, root)
        rec.orig["open"], rec.orig["close"] = os.open, os.close
        rec.snapshot_root()
        rec.install()
        _installed = rec
    return _installed


def mark(log: str) -> int:
    """The log's size now: the records a later acknowledgement must follow."""
    try:
        return os.stat(log).st_size
    except FileNotFoundError:
        return 0


def main(argv: list[str]) -> None:
    module = "iscsi_vmtarget"
    if len(argv) >= 4 and argv[2] == "--module":  # another program than the CLI
        module = argv[3]
        argv = [*argv[:2], *argv[4:]]
    if len(argv) < 3 or argv[2] != "--":
        sys.exit("usage: python3 -m iscsi_vmtarget.testing.fsrecord LOG ROOT "
                 "[--module MODULE] -- ARGS...")  # fmt: skip
    log, root, args = argv[0], argv[1], argv[3:]
    install(log, root)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
