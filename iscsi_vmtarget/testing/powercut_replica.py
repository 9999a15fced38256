"""Replication under power cuts (issue 17: ``discover`` and the next repair finish or
undo a half-done ``receive``), for :mod:`.powercut_ops`.

Replicas here are files of the state directory, ``replicas/NAME.replica``, as
``vm receive`` makes them, each exported by a receiving target ``replica.NAME`` in the
managed configuration. A round writes the replica through a file handle instead of an
iSCSI session (:func:`round_into`): the destination's writes and the source's
checkpoint are recorded together, one machine losing power.

What :func:`replica_worlds` reads of each replica after a cut, for the old-or-new
comparison: the checkpoint it holds once its journal is settled (a committed one
replayed, an uncommitted one discarded, as ``vm promote`` does) and the SHA-256 of its
disk images; every grain is checked against its hash. A replica file without its
receiving target, or a receiving target without its file (of the size it names), is a
half-done ``receive``.

Run as a program (under :mod:`.fsrecord`): ``python3 -m
iscsi_vmtarget.testing.powercut_replica STATE NAME`` runs one round of VM NAME into
its replica in state directory STATE, offline.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from ..server.persist import ConfigStore
from ..storage import FileBackend
from ..vm import StateDir, VmError, VmManager
from ..vm.operations.promote import check_images, settle_journal
from ..vm.operations.replica import read_superblock
from ..vm.operations.replicate import OfflineCheckpointer, replicate_round

#: names the destination in checkpoint names (no connection is made to it)
URL = "iscsi://127.0.0.1:3260/iqn.2026-11.org.iscsi-vmtarget:replica.powercut/0"
RECEIVING = ":replica."  # in a receiving target's name, before the VM's
EMPTY = "no replica written yet"


def replica_file(state: Path, name: str) -> Path:
    return state / "replicas" / f"{name}.replica"


def round_into(manager: VmManager, name: str, path: Path) -> None:
    """One replication round of VM ``name`` into the replica file ``path``."""
    disk = FileBackend(str(path))
    try:
        replicate_round(manager, name, disk, OfflineCheckpointer(manager, name), url=URL)
    finally:
        disk.close()


def describe(path: Path) -> str:
    """What the replica at ``path`` holds once settled (this changes the file)."""
    disk = FileBackend(str(path))
    try:
        sb = read_superblock(disk)
        if sb is None:
            return EMPTY
        sb, _what = settle_journal(disk, sb)
        check_images(disk, sb)
        digest = hashlib.sha256()
        for area in sb.volumes:
            digest.update(disk.read(area.image, area.size))
        return f"checkpoint {sb.seq} {sb.checkpoint} images {digest.hexdigest()[:16]}"
    finally:
        disk.close()


def replica_worlds(state: Path) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """Each replica's :func:`describe` by VM name; the half-done receives (VM name ->
    what is wrong): a replica file never written without its receiving target, or a
    receiving target without its file of the size it names (a replica file that rounds
    reached needs no target: ``vm promote`` resumes from it, a promote cut short
    deletes the target first); failures: a replica that does not read."""
    worlds: dict[str, str] = {}
    half: dict[str, str] = {}
    failures: list[str] = []
    receiving = {}
    for target in ConfigStore(str(state)).load().targets:
        if RECEIVING in target.name:
            name = target.name.rpartition(RECEIVING)[2]
            receiving[name] = target.luns[0].size if target.luns else None
    files = {p.name.removesuffix(".replica"): p for p in (state / "replicas").glob("*.replica")}
    for name in sorted(set(receiving) | set(files)):
        path = files.get(name)
        if path is not None:
            try:
                worlds[name] = describe(path)
            except (VmError, OSError) as exc:
                failures.append(f"the replica of VM {name} does not read: {exc}")
                continue
        if name not in receiving:
            if worlds[name] == EMPTY:
                half[name] = f"replica file {path.name} without its receiving target"
        elif path is None or path.stat().st_size != receiving[name]:
            size = None if path is None else path.stat().st_size
            half[name] = f"receiving target of {receiving[name]} bytes, replica file {size}"
    return worlds, half, failures


def main(argv: list[str]) -> None:
    state, name = Path(argv[0]), argv[1]
    with VmManager(StateDir.at(str(state))) as manager:
        round_into(manager, name, replica_file(state, name))


if __name__ == "__main__":
    main(sys.argv[1:])
