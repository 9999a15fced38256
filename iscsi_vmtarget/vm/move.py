"""``vm move NAME --pool P2``: move every unit of a VM (disks, snapshot layers and
records) to another pool, offline (seed: "moving a virtual machine ... to a different
storage pool" done by the storage layer).

Crash safety, with an intent file ``<state-dir>/conf/moves/<vm>.json``:

1. every unit is copied (sparse: zero runs skipped) into a temporary file of the
   destination pool, invisible to discovery; a crash here leaves only temporaries,
   which the next repair removes;
2. the intent names the units (the commit point);
3. the temporaries are renamed into place, then the originals deleted, then the intent.

:func:`finish_moves` runs under the pool locks before every VM operation: with an
intent, if every unit has its copy (renamed or not) the move is rolled forward,
otherwise rolled back, so discovery never sees a unit in two pools. Unit UUIDs and
designators do not change, so chains, linked clones and identities stay valid.
Only directory pools can be destinations; a VM a server exports is refused (a live
move - copy, catch up, switch - is not implemented).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import faults
from .discovery import discover
from .errors import InUseError, VmError
from .pool import DirectoryPool, UnitRef

if TYPE_CHECKING:
    from .manager import VmManager

Progress = Callable[[int, int], None]
_STEP = 4 << 20


def _intent_dir(state_root: str) -> str:
    return os.path.join(state_root, "conf", "moves")


def _write_intent(path: str, value: dict[str, object]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(value, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def finish_moves(manager: VmManager) -> list[str]:
    """Roll every interrupted move forward or back (callers hold all pool locks)."""
    directory = _intent_dir(manager.state.root)
    if not os.path.isdir(directory):
        return []
    notes = []
    for entry in sorted(os.listdir(directory)):
        path = os.path.join(directory, entry)
        if not entry.endswith(".json"):
            os.unlink(path)  # a half-written intent: the move never reached its commit
            continue
        with open(path) as fh:
            intent = json.load(fh)
        dest = manager.catalog.get(str(intent["to"]))
        assert isinstance(dest, DirectoryPool)
        units = list(intent["units"])
        final = {u["key"]: os.path.exists(os.path.join(dest.path, u["key"])) for u in units}
        temp = {u["key"]: os.path.exists(os.path.join(dest.path, u["temp"])) for u in units}
        if all(final[u["key"]] or temp[u["key"]] for u in units):
            for u in units:
                if not final[u["key"]]:
                    os.rename(os.path.join(dest.path, u["temp"]), os.path.join(dest.path, u["key"]))
            _fsync(dest.path)
            for u in units:
                src = manager.catalog.get(str(u["pool"]))
                ref = UnitRef(src.name, str(u["src_key"]))
                if ref in src.candidates():
                    src.delete(ref)
            notes.append(f"move of VM {intent['vm']} to pool {dest.name} finished")
        else:
            for u in units:
                for name in (u["key"], u["temp"]):
                    target = os.path.join(dest.path, name)
                    if os.path.exists(target):
                        os.unlink(target)
            notes.append(f"interrupted move of VM {intent['vm']} rolled back")
        os.unlink(path)
    return notes


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def move(manager: VmManager, name: str, pool: str, progress: Progress | None = None) -> int:
    """Move VM ``name``'s units to ``pool``; returns how many units moved."""
    dest = manager.catalog.get(pool)
    if not isinstance(dest, DirectoryPool):
        raise VmError("vm move: only directory pools can be destinations for now")
    pools = manager.catalog.all()
    with manager._locked(pools):
        vm = manager.find(name, discover(pools, repair=True))
        if manager.served(vm):
            raise InUseError(f"VM {name!r} is being served: stop serving it to move it")
        units = [u for u in vm.all_units if u.pool != pool]
        total = sum(u.header.unit_size for u in units)
        done = 0
        plan = []
        for found in units:
            src_pool = manager.catalog.get(found.pool)
            source = src_pool.open(found.ref, read_only=True)
            ref, target = dest.allocate(found.header.unit_uuid, found.header.unit_size)
            try:
                for offset in range(0, found.header.unit_size, _STEP):
                    n = min(_STEP, found.header.unit_size - offset)
                    piece = source.read(offset, n)
                    if piece.count(0) != n:
                        target.write(offset, piece)
                    done += n
                    if progress is not None:
                        progress(done, total)
                    faults.crashpoint("move.copying")
                target.flush()
            finally:
                target.close()
                source.close()
            plan.append(
                {
                    "pool": found.pool,
                    "src_key": found.ref.key,
                    "key": f"{found.header.unit_uuid}.unit",
                    "temp": ref.key,
                }
            )
        _fsync(dest.path)
        faults.crashpoint("move.copied")
        intent = os.path.join(_intent_dir(manager.state.root), f"{name}.json")
        _write_intent(intent, {"vm": name, "to": pool, "units": plan})
        faults.crashpoint("move.committed")
        finish_moves(manager)
    return len(units)
