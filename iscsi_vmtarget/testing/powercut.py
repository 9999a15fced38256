"""What a power cut leaves on disk: replay a :mod:`.fsrecord` log up to a cut point,
keeping what was flushed and a chosen subset of what was not.

The model (ext4, default mount options: ``data=ordered``, delayed allocation, barriers
on; the guarantees an application may rely on, not the luckier behaviour ext4 usually
shows):

* **Data** (writes, truncates, hole punches, fallocate) is per inode. A data change is
  durable once ``fsync`` or ``fdatasync`` of that inode (through any descriptor) has
  returned after it, or at once when written through a descriptor opened ``O_DSYNC``,
  ``O_SYNC`` or ``O_DIRECT``. Every other data change is volatile: any subset of them
  survives, independently of each other and of the name changes (delayed allocation
  writes data back in any order, and a size change can reach the journal before the
  data: a file may come back with its new size and zeros, or its old bytes, where
  unflushed data was), and a 4 KiB write can be torn at 512-byte sectors.
  ``auto_da_alloc`` (the rename-over-existing heuristic) is not relied on.
* **Names** (create, mkdir, rename, link, unlink, rmdir) go through the one ext4
  journal, in order: after a cut, a *prefix* of them survives. Everything up to the last
  journal commit an application forced survives: ``fsync`` of any file or directory
  commits the running transaction, which holds every earlier name change (ext4 has one
  journal per file system); ``fdatasync`` commits it only when the inode's size or
  allocation changed since its last flush (ext4 then must commit its i_size), otherwise
  it flushes data alone. Past that point any prefix may survive (the 5-second commit).

Choices at a cut point (:data:`CHOICES`): ``flushed`` (only what is durable: names up to
the last forced commit, no volatile data), ``all`` (everything: what kill -9 leaves),
``random`` (each volatile data change kept with probability 1/2, a random prefix of the
later names; several seeds) and ``torn`` (as ``random``, and one volatile write of
1 KiB or more torn: a random subset of its 512-byte sectors kept).
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from .fsrecord import Record

PAGE = 4096
SECTOR = 512
NAME_OPS = ("create", "mkdir", "rename", "link", "unlink", "rmdir")
DATA_OPS = ("write", "trunc", "zero", "falloc")
FLUSH_OPS = ("fsync", "fdatasync")
CHOICES = ("flushed", "all", "random", "torn")


class Sparse:
    """A file's content as 4 KiB pages (missing pages read zeros) and a size."""

    def __init__(self) -> None:
        self.size = 0
        self.pages: dict[int, bytearray] = {}

    def copy(self) -> Sparse:
        out = Sparse()
        out.size = self.size
        out.pages = {k: bytearray(v) for k, v in self.pages.items()}
        return out

    def write(self, offset: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            page, at = divmod(offset + pos, PAGE)
            n = min(PAGE - at, len(data) - pos)
            buf = self.pages.setdefault(page, bytearray(PAGE))
            buf[at : at + n] = data[pos : pos + n]
            pos += n
        self.size = max(self.size, offset + len(data))

    def zero(self, offset: int, length: int) -> None:
        end = min(offset + length, self.size)
        pos = offset
        while pos < end:
            page, at = divmod(pos, PAGE)
            n = min(PAGE - at, end - pos)
            if page in self.pages:
                self.pages[page][at : at + n] = bytes(n)
            pos += n

    def truncate(self, size: int) -> None:
        if size < self.size:
            self.zero(size, self.size - size)
            for page in [p for p in self.pages if p * PAGE >= size]:
                del self.pages[page]
        self.size = size

    def save(self, path: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, self.size)
            for page, buf in self.pages.items():
                if buf.count(0) != PAGE:
                    os.pwrite(fd, bytes(buf[: max(0, min(PAGE, self.size - page * PAGE))]),
                              page * PAGE)  # fmt: skip
        finally:
            os.close(fd)


@dataclass
class Log:
    """A recorded operation: the tree it started from and its mutations, in order."""

    # path -> inode, as (number, generation): a number freed and reused is a new inode
    dirs: dict[str, int] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)
    inodes: dict[int, Sparse] = field(default_factory=dict)
    ops: list[Record] = field(default_factory=list)

    @classmethod
    def parse(cls, records: list[Record]) -> Log:
        log = cls()
        generation: dict[int, int] = {}  # a freed inode number is reused by a new file

        def ident(ino: int) -> tuple[int, int]:
            return (ino, generation.get(ino, 0))

        for rec in records:
            kind = rec[0]
            if kind == "base_dir":
                log.dirs[rec[1]] = ident(rec[2])  # type: ignore[assignment]
            elif kind == "base_file":
                _, path, ino, size, extents = rec
                log.files[path] = ident(ino)  # type: ignore[assignment]
                if ident(ino) not in log.inodes:
                    content = log.inodes[ident(ino)] = Sparse()  # type: ignore[index]
                    for offset, data in extents:
                        content.write(offset, data)
                    content.truncate(size)
            elif kind in ("create", "mkdir"):
                generation[rec[2]] = generation.get(rec[2], 0) + 1
                log.ops.append((kind, rec[1], ident(rec[2])))
            elif kind in DATA_OPS or kind in FLUSH_OPS:
                log.ops.append((kind, ident(rec[1]), *rec[2:]))
            else:
                log.ops.append(rec)
        return log

    @property
    def cut_points(self) -> int:
        """Cut after 0, 1, ... len(ops) mutations: len(ops) + 1 points."""
        return len(self.ops) + 1


def _durability(ops: list[Record]) -> tuple[list[bool], int]:
    """Which data changes of ``ops`` are durable, and the index up to which name
    changes are (everything before the last forced journal commit)."""
    durable = [False] * len(ops)
    flushed: set[int] = set()
    for i in range(len(ops) - 1, -1, -1):
        kind = ops[i][0]
        if kind in FLUSH_OPS:
            flushed.add(ops[i][1])
        elif kind in DATA_OPS:
            durable[i] = ops[i][1] in flushed or (kind == "write" and ops[i][4])
    barrier = 0
    meta_dirty: set[int] = set()  # inodes whose size or allocation changed since a flush
    for i, rec in enumerate(ops):
        kind = rec[0]
        if kind in ("create", "trunc", "falloc") or kind == "write":
            meta_dirty.add(rec[2] if kind == "create" else rec[1])
        elif kind == "fsync" or (kind == "fdatasync" and rec[1] in meta_dirty):
            barrier = i
            meta_dirty.discard(rec[1])
    return durable, barrier


@dataclass
class Outcome:
    """One materialized cut: where, which choice, and a digest of what it kept."""

    n: int
    choice: str
    seed: int
    kept_names: int
    volatile: int
    kept_volatile: int
    torn: bool
    digest: str


def materialize(log: Log, n: int, choice: str, seed: int, dest: str) -> Outcome:
    """Write into the empty directory ``dest`` the tree a power cut after ``n``
    mutations leaves under ``choice`` (module docstring)."""
    ops = log.ops[:n]
    durable, barrier = _durability(ops)
    rng = random.Random(f"{n}:{choice}:{seed}")
    if choice in ("flushed", "all"):
        names_upto = barrier if choice == "flushed" else n
    else:
        names_upto = rng.randint(barrier, n)
    volatile = [i for i, rec in enumerate(ops) if rec[0] in DATA_OPS and not durable[i]]
    keep: dict[int, frozenset[int]] = {}  # index -> its lost sectors (torn) or none
    for i in volatile:
        if choice == "all" or (choice in ("random", "torn") and rng.random() < 0.5):
            keep[i] = frozenset()
    torn = False
    if choice == "torn":
        big = [i for i in volatile if ops[i][0] == "write" and len(ops[i][3]) >= 2 * SECTOR]
        if big:
            i = rng.choice(big)
            sectors = -(-len(ops[i][3]) // SECTOR)
            keep[i] = frozenset(rng.sample(range(sectors), rng.randint(1, sectors - 1)))
            torn = True
    dirs = dict(log.dirs)
    names = dict(log.files)
    inodes = {ino: content.copy() for ino, content in log.inodes.items()}
    for i, rec in enumerate(ops):
        kind = rec[0]
        if kind in NAME_OPS:
            if i < names_upto:
                _rename_etc(rec, dirs, names, inodes)
        elif kind in DATA_OPS and (durable[i] or i in keep):
            content = inodes.setdefault(rec[1], Sparse())
            if kind == "write":
                lost = keep.get(i, frozenset())
                for off in range(0, len(rec[3]), SECTOR):  # a torn write: sectors kept
                    if off // SECTOR not in lost:
                        content.write(rec[2] + off, rec[3][off : off + SECTOR])
                content.size = max(content.size, rec[2] + len(rec[3]))
            elif kind == "trunc":
                content.truncate(rec[2])
            elif kind == "zero":
                content.zero(rec[2], rec[3])
            else:
                content.size = max(content.size, rec[2] + rec[3])
    _save(dest, dirs, names, inodes)
    digest = _digest(dirs, names, inodes)
    return Outcome(n, choice, seed, names_upto, len(volatile), len(keep), torn, digest)


def _digest(dirs: dict[str, int], names: dict[str, int], inodes: dict[int, Sparse]) -> str:
    """What the cut left, by content: two cuts leaving the same tree need one check."""
    h = hashlib.sha256(repr(sorted(dirs)).encode())
    for path, ino in sorted(names.items()):
        content = inodes.get(ino, Sparse())
        h.update(f"{path}\0{ino}\0{content.size}\0".encode())
        for page in sorted(content.pages):
            if content.pages[page].count(0) != PAGE:
                h.update(page.to_bytes(8, "little") + content.pages[page])
    return h.hexdigest()


def _rename_etc(rec: Record, dirs: dict[str, int], names: dict[str, int],
                inodes: dict[int, Sparse]) -> None:  # fmt: skip
    kind = rec[0]
    if kind == "create":
        names[rec[1]] = rec[2]
        inodes[rec[2]] = inodes.get(rec[2]) or Sparse()
    elif kind == "mkdir":
        dirs[rec[1]] = rec[2]
    elif kind == "unlink":
        names.pop(rec[1], None)
    elif kind == "rmdir":
        dirs.pop(rec[1], None)
    elif kind == "link":
        if rec[1] in names:
            names[rec[2]] = names[rec[1]]
    elif kind == "rename":
        src, dst = rec[1], rec[2]
        if src in names:
            names[dst] = names.pop(src)
        elif src in dirs:
            for table in (dirs, names):
                for path in [p for p in table if p == src or p.startswith(src + "/")]:
                    table[dst + path[len(src) :]] = table.pop(path)


def _save(dest: str, dirs: dict[str, int], names: dict[str, int],
          inodes: dict[int, Sparse]) -> None:  # fmt: skip
    for path in sorted(dirs, key=lambda p: p.count("/")):
        os.makedirs(os.path.join(dest, path), exist_ok=True)
    first: dict[int, str] = {}
    for path, ino in sorted(names.items()):
        full = os.path.join(dest, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)  # a dir whose mkdir is lost
        if ino in first:
            os.link(first[ino], full)
        else:
            inodes.setdefault(ino, Sparse()).save(full)
            first[ino] = full


@dataclass
class Tally:
    """What a power-cut run checked: counts and failures."""

    what: str
    mutations: int = 0
    cut_points: int = 0
    checked: int = 0
    duplicates: int = 0
    failures: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.what}: {self.mutations} mutations, {self.cut_points} cut points, "
                f"{self.checked} states checked ({self.duplicates} duplicates skipped), "
                f"{len(self.failures)} failures")  # fmt: skip


def plan(log: Log, limit: int | None = None, seeds: int = 2) -> Iterator[tuple[int, str, int]]:
    """The cut points and choices to check: every cut point of the first ``limit``
    mutations (all when None), each under every choice (``seeds`` random seeds)."""
    last = log.cut_points if limit is None else min(limit + 1, log.cut_points)
    for n in range(last):
        for choice in CHOICES:
            for seed in range(seeds if choice in ("random", "torn") else 1):
                yield n, choice, seed
