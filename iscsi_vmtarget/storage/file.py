"""Sparse-file and raw block-device backends (pread/pwrite on one descriptor)."""

from __future__ import annotations

import errno
import functools
import os
import stat
import struct
from collections.abc import Callable
from typing import Any

from . import nowait
from .atomic_file import fsync_dir
from .backend import BackendError, check_range
from .nowait import MODE, RWF_NOWAIT, WouldBlock

try:  # Linux: punch holes so UNMAP really frees space and reads zeros after.
    import fcntl

    _FALLOC_FL_KEEP_SIZE = 0x01
    _FALLOC_FL_PUNCH_HOLE = 0x02
    _FALLOC_FL_ZERO_RANGE = 0x10
except ImportError:  # pragma: no cover
    pass


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    """libc through ctypes, loaded once (find_library runs ldconfig: far too slow per call)."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    return libc


def _fallocate(fd: int, mode: int, offset: int, length: int, what: str) -> bool:
    """fallocate(2) through libc; False when the file system does not support ``mode``."""
    import ctypes

    rc = _libc().fallocate(fd, mode, offset, length)
    if rc != 0:
        err = ctypes.get_errno()
        if err in (errno.EOPNOTSUPP, errno.ENOSYS):
            return False
        raise BackendError(f"fallocate {what} failed: {os.strerror(err)}")
    return True


def _punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate: the range becomes a hole (reads zeros, frees space)."""
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    return _fallocate(fd, mode, offset, length, "punch hole")


def _zero_range(fd: int, offset: int, length: int) -> bool:
    """Zero in place, keeping the blocks allocated (unwritten extents on ext4/xfs)."""
    mode = _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE
    return _fallocate(fd, mode, offset, length, "zero range")


_FS_IOC_FIEMAP = 0xC020660B  # _IOWR('f', 11, struct fiemap)
_FIEMAP_FLAG_SYNC = 0x1  # write dirty pages back first: delayed allocations count
_FIEMAP_EXTENT_LAST = 0x1
_FIEMAP_EXTENT_UNWRITTEN = 0x800
_FIEMAP_HEADER = struct.Struct("=QQIIII")  # struct fiemap (linux/fiemap.h)
_FIEMAP_EXTENT = struct.Struct("=QQQQQIIII")  # struct fiemap_extent
_FIEMAP_BATCH = 128


def _fiemap(fd: int, offset: int, length: int) -> list[tuple[int, int, int]]:
    """(logical offset, length, flags) of every extent overlapping a range."""
    out: list[tuple[int, int, int]] = []
    position, end = offset, offset + length
    request = bytearray(_FIEMAP_HEADER.size + _FIEMAP_BATCH * _FIEMAP_EXTENT.size)
    while position < end:
        _FIEMAP_HEADER.pack_into(
            request, 0, position, end - position, _FIEMAP_FLAG_SYNC, 0, _FIEMAP_BATCH, 0
        )
        fcntl.ioctl(fd, _FS_IOC_FIEMAP, request)
        mapped = _FIEMAP_HEADER.unpack_from(request, 0)[3]
        if mapped == 0:
            break
        last_flags = 0
        for i in range(mapped):
            at = _FIEMAP_HEADER.size + i * _FIEMAP_EXTENT.size
            fields = _FIEMAP_EXTENT.unpack_from(request, at)
            logical, _, size, _, _, last_flags = fields[:6]
            out.append((logical, size, last_flags))
            position = logical + size
        if last_flags & _FIEMAP_EXTENT_LAST:
            break
    return out


class FileBackend:
    """A regular (normally sparse) file, or a block device, used as a flat store.

    Opening never creates or truncates: :func:`create_sparse_file` does that, so a
    wrong path at start is a clear error and nothing existing is overwritten.

    In nowait mode (:mod:`.nowait`) reads (and writes if ``NOWAIT_WRITES``) ask the
    kernel with RWF_NOWAIT and raise :class:`~.nowait.WouldBlock` instead of blocking;
    one plain offset mapping to one descriptor, so cutting an I/O off there has no
    other effect.
    """

    @property
    def nowait_io(self) -> frozenset[str]:
        """Reads are tried nowait; writes only if ``NOWAIT_WRITES``, or the test seam
        refuses them (:class:`~.backend.NowaitCapable`)."""
        writes = nowait.NOWAIT_WRITES or "write" in nowait.refused
        return frozenset({"read", "write"}) if writes else frozenset({"read"})

    def __init__(self, path: str, read_only: bool = False) -> None:
        self.path = path
        self._read_only = read_only
        flags = os.O_RDONLY if read_only else os.O_RDWR
        try:
            self._fd = os.open(path, flags | os.O_CLOEXEC)
        except OSError as exc:
            raise BackendError(f"cannot open backing store {path!r}: {exc.strerror}") from exc
        st = os.fstat(self._fd)
        self.is_block_device = stat.S_ISBLK(st.st_mode)
        if not (self.is_block_device or stat.S_ISREG(st.st_mode)):
            os.close(self._fd)
            raise BackendError(
                f"backing store {path!r} is neither a regular file nor a block device"
            )
        self._size = self._measure()
        # RWF_NOWAIT per direction, 0 once the file system refused it (EOPNOTSUPP);
        # writes only if NOWAIT_WRITES (storage/nowait.py: measured, not worth it)
        self._nowait_read = RWF_NOWAIT
        self._nowait_write = RWF_NOWAIT if nowait.NOWAIT_WRITES else 0

    def _measure(self) -> int:
        if self.is_block_device:
            return os.lseek(self._fd, 0, os.SEEK_END)
        return os.fstat(self._fd).st_size

    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self._read_only

    def fileno(self) -> int:
        return self._fd

    def read_into(self, offset: int, buf: memoryview) -> None:
        check_range(self._size, offset, len(buf))
        mode = MODE.flags
        if mode and nowait.refused:
            self._refuse("read", offset, buf)
        flags = mode & self._nowait_read  # 0 outside nowait mode: plain preadv
        done = 0
        total = len(buf)
        try:
            while done < total:
                n = os.preadv(self._fd, [buf[done:]], offset + done, flags)
                if n <= 0:  # short file (should not happen): holes past EOF read as zeros
                    buf[done:] = bytes(total - done)
                    return
                done += n  # a short nowait read: the next call says EAGAIN or goes on
        except BlockingIOError:
            raise WouldBlock(f"read of {total} bytes at {offset}") from None
        except OSError as exc:
            if not (flags and exc.errno == errno.EOPNOTSUPP):
                raise
            self._nowait_read = 0  # this file system has no nowait reads: block
            self.read_into(offset, buf)

    def read(self, offset: int, length: int) -> bytearray:
        out = bytearray(length)
        self.read_into(offset, memoryview(out))
        return out

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self._read_only:
            raise BackendError("backend is read-only")
        view = memoryview(data).cast("B")
        check_range(self._size, offset, len(view))
        flags = 0  # plain pwritev, unless nowait writes are on (or the seam) and asked for
        if (self._nowait_write or nowait.refused) and MODE.flags:
            if nowait.refused:
                self._refuse("write", offset, view)
            flags = self._nowait_write
        done = 0
        try:
            while done < len(view):
                done += os.pwritev(self._fd, [view[done:]], offset + done, flags)
        except BlockingIOError:  # maybe after a short count: the caller rewrites it whole
            raise WouldBlock(f"write of {len(view)} bytes at {offset}") from None
        except OSError as exc:
            if not (flags and exc.errno == errno.EOPNOTSUPP):
                raise
            self._nowait_write = 0  # no nowait buffered writes here (ext4): block
            self.write(offset, view)

    def _refuse(self, kind: str, offset: int, buf: memoryview) -> None:
        """The :data:`~.nowait.REFUSE_ENV` test seam: refuse a nowait I/O of a kind it
        names as a kernel that would block does (a write after a short count)."""
        if kind not in nowait.refused:
            return
        if kind == "write":
            half = len(buf) // 2
            os.pwrite(self._fd, buf[:half], offset)
        raise WouldBlock(f"{kind} of {len(buf)} bytes at {offset} refused (test seam)")

    def flush(self) -> None:
        if not self._read_only:
            os.fdatasync(self._fd)

    def unmap(self, offset: int, length: int) -> None:
        """Make a range read as zeros and give its space back (a hole)."""
        self._zero(offset, length, _punch_hole)

    def zero_range(self, offset: int, length: int) -> None:
        """Make a range read as zeros without giving its space back (a thick file
        stays fully allocated, so later writes cannot fail for lack of space)."""
        self._zero(offset, length, _zero_range)

    def _zero(self, offset: int, length: int, fallocate: Callable[[int, int, int], bool]) -> None:
        """Zero a range with ``fallocate``; written zeros where it does not apply."""
        check_range(self._size, offset, length)
        if self._read_only or length == 0:
            return
        if self.is_block_device or not fallocate(self._fd, offset, length):
            self.write_zeros(offset, length)

    def write_zeros(self, offset: int, length: int) -> None:
        chunk = bytes(min(length, 1 << 20))
        while length > 0:
            n = min(length, len(chunk))
            self.write(offset, memoryview(chunk)[:n])
            offset += n
            length -= n

    def resize(self, size: int) -> None:
        if self.is_block_device:
            raise BackendError("a block device cannot be resized")
        os.ftruncate(self._fd, size)
        self._size = size

    def allocated_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Mapped (data) extents within a range, from SEEK_DATA/SEEK_HOLE."""
        end = offset + length
        out: list[tuple[int, int]] = []
        pos = offset
        while pos < end:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            if data >= end:
                break
            hole = min(os.lseek(self._fd, data, os.SEEK_HOLE), end)
            out.append((data, hole - data))
            pos = hole
        return out

    def written_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Extents holding written data within a range: FIEMAP extents that are not
        marked unwritten (preallocated by fallocate, or zeroed by ``zero_range``).

        Unlike SEEK_DATA this does not count an unwritten extent as data once a read
        has pulled its zero pages into the page cache. Falls back to
        :meth:`allocated_ranges` where the file system has no FIEMAP.
        """
        try:
            extents = _fiemap(self._fd, offset, length)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                return self.allocated_ranges(offset, length)
            raise
        end = offset + length
        out: list[tuple[int, int]] = []
        for start, size, flags in extents:
            if flags & _FIEMAP_EXTENT_UNWRITTEN:
                continue
            first, last = max(start, offset), min(start + size, end)
            if last <= first:
                continue
            if out and out[-1][0] + out[-1][1] == first:
                out[-1] = (out[-1][0], last - out[-1][0])
            else:
                out.append((first, last - first))
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def create_sparse_file(path: str, size: int) -> None:
    """Create a new sparse file of ``size`` bytes; refuses to touch an existing file.

    A size the file system refuses (EFBIG, ENOSPC) leaves nothing behind: the empty
    file just created is removed before the error is raised. The file and its name are
    fsynced: a power cut after this returned cannot leave it empty (a cut inside it
    can, which callers that create at start treat as "not created yet").
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.ftruncate(fd, size)
        except OverflowError:  # past off_t (2**63): no file system holds that either
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG), path) from None
        os.fsync(fd)
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
