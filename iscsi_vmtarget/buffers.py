"""Buffers that the kernel or librbd fill whole: allocated without zeroing first.

A 64 KiB read's buffer is filled whole by librbd, so zeroing it first is wasted
work. Alone it was not a visible saving: py-spy put 2.8% of the loop under allocating
a zeroed buffer and 2.9% under an unzeroed one; the allocation was the cost, which
:func:`keep_freed_memory` mends. Every user fills the buffer whole before anyone
reads it, or zeroes what was not filled (storage/rbd_aio.py ``read_result``). No
imports from the package: every layer may use it.
"""

from __future__ import annotations

import ctypes

_new_bytearray = ctypes.pythonapi.PyByteArray_FromStringAndSize
_new_bytearray.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
_new_bytearray.restype = ctypes.py_object


def uninitialized(length: int) -> bytearray:
    """A bytearray of ``length`` bytes whose contents are whatever the allocator
    had there: the caller fills all of it before it is read."""
    if length < 0:
        raise ValueError(f"a buffer's length must not be negative: {length}")
    out: bytearray = _new_bytearray(None, length)
    return out


#: glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Freed memory above this stays with the process (glibc's default: 128 KiB, moving)
TRIM_THRESHOLD = 64 << 20
#: Allocations from this size on are mapped on their own (glibc's default: 128 KiB,
#: moving up to 32 MiB as large blocks are freed)
MMAP_THRESHOLD = 4 << 20


def keep_freed_memory() -> bool:
    """Let freed buffers be reused instead of going back to the kernel (glibc only;
    True when set). Every command allocates a buffer of its transfer's size (a 64 KiB
    read's Data-In, a write's data). Under glibc's defaults a burst of them grows the
    heap's top and freeing them trims it again, so the next burst faults every page
    in again (tests/test_buffers.py: 15 faults per 64 KiB). That doubled the loop's CPU
    per 64 KiB read and write (``tools/loop-bench``). The price: up to
    ``TRIM_THRESHOLD`` of freed memory stays with the serving process."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    )
