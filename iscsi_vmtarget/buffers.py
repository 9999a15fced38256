"""Buffers that the kernel or librbd fill whole: allocated without zeroing first.

Zeroing 64 KiB only to overwrite it at once was a measurable share of the event
loop's time per 64 KiB read (tools/bench --rbd). Every user fills the buffer whole
before anyone reads it, or zeroes what was not filled (storage/rbd_aio.py
``read_result``); a buffer not filled whole is never sent or stored. No imports from
the package: every layer may use it.
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
