"""Crash-atomic small files: the intents of multi-step VM operations (moves, clones).

A file is written under a temporary name, flushed to disk, renamed over the final
name and the directory flushed, so after a crash the final name holds either the old
content or the whole new one (POSIX rename), never a torn write.
"""

from __future__ import annotations

import json
import os


def fsync_dir(path: str) -> None:
    """Make the directory's entries (a rename, a new or removed file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str, value: object) -> None:
    """Replace ``path`` with ``value`` as JSON, atomically (module docstring)."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(value, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(directory)


def remove(path: str) -> None:
    """Remove ``path`` durably."""
    os.unlink(path)
    fsync_dir(os.path.dirname(path))
