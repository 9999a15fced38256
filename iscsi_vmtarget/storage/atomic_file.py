"""Crash-atomic small files: the one way this project writes a file that must survive
a crash whole (intents, key files, pool definitions, the managed configuration, APTPL
reservation state).

A file is written under a temporary name in the same directory, fsynced, renamed over
the final name (POSIX rename(2) replaces it atomically) and the directory fsynced, so
after a crash the final name holds the old content or the whole new one, never a torn
write. :func:`create_file` is the variant that never replaces an existing file: the
temporary is hard-linked to the final name, which fails if the name exists. The
temporary names are the caller's (repairs recognise their own leftovers by them); a
``before_*`` hook runs between the fsync and the rename or link (crash tests kill the
process there). Knows nothing of what the files hold.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import BinaryIO

Hook = Callable[[], None]


def _directory(path: str) -> str:
    return os.path.dirname(os.path.abspath(path))


def fsync_dir(path: str) -> None:
    """Make the directory's entries (a rename, a new or removed file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_temporary(path: str, tmp: str | None, mode: int | None) -> tuple[int, str]:
    """Create (or truncate) the temporary for ``path``: ``tmp`` if given, else a fresh
    hidden ``.<name>.XXXX.tmp`` (safe for writers that do not share a lock; 0600
    unless ``mode`` says otherwise). ``mode`` is set exactly, whatever the umask; None
    with ``tmp`` keeps open(2)'s 0666 less the umask."""
    if tmp is None:
        fd, tmp = tempfile.mkstemp(
            prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=_directory(path)
        )
        if mode is not None:
            os.fchmod(fd, mode)
        return fd, tmp
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o666 if mode is None else mode)
    if mode is not None:
        os.fchmod(fd, mode)
    return fd, tmp


@contextlib.contextmanager
def writing(
    path: str,
    *,
    tmp: str | None = None,
    mode: int | None = None,
    before_rename: Hook | None = None,
) -> Iterator[BinaryIO]:
    """Write ``path`` through the yielded file; on success it replaces ``path``
    atomically (module docstring), on an exception the temporary is removed and
    ``path`` is left as it was."""
    fd, tmp = _open_temporary(path, tmp, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(_directory(path))


def write_file(
    path: str,
    data: bytes,
    *,
    tmp: str | None = None,
    mode: int | None = None,
    before_rename: Hook | None = None,
) -> None:
    """Replace ``path`` with ``data``, atomically (:func:`writing`)."""
    with writing(path, tmp=tmp, mode=mode, before_rename=before_rename) as fh:
        fh.write(data)


def write_json(path: str, value: object, *, tmp: str | None = None) -> None:
    """Replace ``path`` with ``value`` as compact JSON, atomically; the directory is
    created if missing. The temporary is ``<path>.tmp`` unless given."""
    os.makedirs(_directory(path), exist_ok=True)
    write_file(path, json.dumps(value).encode(), tmp=path + ".tmp" if tmp is None else tmp)


def create_file(
    path: str, data: bytes, *, tmp: str, mode: int = 0o600, before_link: Hook | None = None
) -> None:
    """Create ``path`` holding ``data``, never replacing an existing file
    (FileExistsError): written and fsynced under ``tmp``, then hard-linked to
    ``path``, so it appears whole or not at all."""
    fd, tmp = _open_temporary(path, tmp, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    if before_link is not None:
        before_link()
    try:
        os.link(tmp, path)
    finally:
        os.unlink(tmp)
    fsync_dir(_directory(path))


def replace(source: str, target: str) -> None:
    """Rename ``source`` over ``target`` durably (a whole file made visible)."""
    os.replace(source, target)
    fsync_dir(_directory(target))


def remove(path: str, *, missing_ok: bool = False) -> bool:
    """Remove ``path`` durably; False if it was missing and ``missing_ok``."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        if missing_ok:
            return False
        raise
    fsync_dir(_directory(path))
    return True


@contextlib.contextmanager
def locked(path: str) -> Iterator[int]:
    """Hold an exclusive flock on the lock file ``path`` (created 0600 if missing)
    for a read-modify-write across processes; a dead holder releases it. Yields the
    descriptor."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


__all__ = [
    "create_file",
    "fsync_dir",
    "locked",
    "remove",
    "replace",
    "write_file",
    "write_json",
    "writing",
]
