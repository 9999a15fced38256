"""Intents of the operations that build a VM under a temporary name and rename it at the
end (clone, promote): ``<state-dir>/conf/<kind>/<temp>.json``, written first and held
under the operation's lock (:func:`~..units.locks.operation`) while it runs. One that
failed, or was killed, or cut by a power loss, leaves an intent nobody holds; the
repair (:data:`~..manager.RECOVERY`, under every pool lock) finds it
(:func:`leftovers`) and removes what the operation had made (:func:`remove_temp_vm`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ...storage import atomic_file
from ..units import locks
from ..units.scan import Discovery
from ..vm_errors import VmError

if TYPE_CHECKING:
    from ..manager import VmManager


def intent_path(manager: VmManager, kind: str, temp: str) -> str:
    return os.path.join(manager.state.root, "conf", kind, f"{temp}.json")


@contextlib.contextmanager
def held(manager: VmManager, kind: str, temp: str, intent: dict[str, str]) -> Iterator[None]:
    """Hold the operation's lock and intent while it runs; drop the intent when it
    succeeded, roll it back (the repair) when it failed."""
    path = intent_path(manager, kind, temp)
    try:
        with locks.operation(manager.state.root, f"{kind}.{temp}"):
            atomic_file.write_json(path, intent)
            yield
            atomic_file.remove(path)
    except BaseException:
        # the operation lock is released now: taking every pool lock runs the repair
        with contextlib.suppress(VmError, OSError), manager.locked(manager.catalog.all()):
            pass
        raise


def leftovers(manager: VmManager, kind: str) -> Iterator[tuple[str, dict[str, str]]]:
    """(temporary name, intent) of every intent no running operation holds; each is
    removed, with its lock file, once the caller has undone it (the next step of the
    iteration). An intent half written (the operation had not started) just goes."""
    directory = os.path.join(manager.state.root, "conf", kind)
    if not os.path.isdir(directory):
        return
    for entry in sorted(os.listdir(directory)):
        path = os.path.join(directory, entry)
        temp = entry.partition(".")[0]
        if locks.operation_running(manager.state.root, f"{kind}.{temp}"):
            continue  # in progress (in this process or another)
        if entry.endswith(".json"):
            with open(path) as fh:
                yield temp, json.load(fh)
        os.unlink(path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(locks.operation_path(manager.state.root, f"{kind}.{temp}"))


def remove_temp_vm(
    manager: VmManager, found: Discovery, temp: str, what: str, source: str
) -> list[str]:
    """Delete the units of temporary VM ``temp`` (the unfinished ``what``, e.g. clone,
    of ``source``), and secondaries a power cut left before their base unit."""
    notes = []
    vm = found.find(temp)
    if vm is not None:
        for unit in vm.all_units:  # base first: the rest is unreachable after it
            manager.catalog.get(unit.pool).delete(unit.ref)
        notes.append(f"unfinished {what} {temp} of {source} removed")
    for unit in found.orphans:
        if unit.header.name == temp:
            manager.catalog.get(unit.pool).delete(unit.ref)
            notes.append(f"secondary {unit.ref.location} of unfinished {what} {temp} removed")
    return notes
