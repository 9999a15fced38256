"""Evicting a file's pages from the page cache, for tests of the nowait I/O path
(:mod:`iscsi_vmtarget.storage.nowait`): a read of them must then wait for the disk."""

from __future__ import annotations

import errno
import os

PAGE = 4096


def evict(path: str) -> bool:
    """Write ``path`` back and drop all of it from the page cache (POSIX_FADV_DONTNEED).
    True if a nowait read (RWF_NOWAIT) of its last page of data then says it would
    block, i.e. the pages really are out; False where that cannot be had (no
    RWF_NOWAIT on this file system, as on tmpfs, no data, or the kernel kept them).
    The last data page is the probe because a nowait read starts readahead, which
    goes forward: from there it reaches no other data, so a test reading before it
    still finds its pages out of the cache (a hole reads without the disk)."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        last = _last_data_page(fd)
        if last < 0:
            return False
        try:
            os.preadv(fd, [bytearray(PAGE)], last, getattr(os, "RWF_NOWAIT", 0))
        except BlockingIOError:
            return True
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                return False
            raise
        return False
    finally:
        os.close(fd)


def _last_data_page(fd: int) -> int:
    """Offset of the last page holding data (SEEK_DATA/SEEK_HOLE), -1 if none."""
    last, pos = -1, 0
    while True:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return last
            raise
        pos = os.lseek(fd, data, os.SEEK_HOLE)
        last = (pos - 1) // PAGE * PAGE
