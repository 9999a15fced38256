"""VM clones (seed: "a clone ... a snapshot that is unlinked from its parent").

``clone`` makes a new VM from the live disks of another, or from one of its snapshots:
new units, hence new identities (UUIDs, NAA designators, serials) for every volume,
never those of the source. This version makes full clones: each volume's image is
read through its copy-on-write chain and written into the new units (runs of zeros
are skipped, so the new units stay sparse), and the state and config are copied
sealed under the new base unit's own data key. A clone that shares grains with its
source until unlinked is not implemented yet.

Crash safety: the new VM is built under a temporary name and only renamed to ``dst``
- one header commit of its base unit - when every byte is in place; a crash before
leaves a VM named ``c-<12 hex digits>`` that ``vm delete`` removes.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable
from dataclasses import replace

from . import faults
from .discovery import discover
from .errors import VmError
from .format import RegionKind
from .manager import VmManager, check_vm_name
from .snapshot import _copy_sealed, find_snapshot, open_chain, open_live

Progress = Callable[[int, int], None]
_STEP = 1 << 20


def clone(
    manager: VmManager,
    src: str,
    dst: str,
    *,
    from_snapshot: str | None = None,
    full: bool = True,
    progress: Progress | None = None,
) -> None:
    """Clone VM ``src`` (its live disks, or snapshot ``from_snapshot``) as ``dst``."""
    if not full:
        raise VmError("linked clones are not implemented yet: use --full")
    check_vm_name(dst)
    pools = manager.catalog.all()
    with manager._locked(pools):
        found = discover(pools, repair=False)
        if found.find(dst) is not None:
            raise VmError(f"a VM named {dst!r} already exists")
        vm = manager.find(src, found)
        keyring = manager.keyring()
        record = find_snapshot(manager, vm, keyring, from_snapshot) if from_snapshot else None
        if record is None and manager.served(vm):
            raise VmError(f"VM {src!r} is being served: clone a snapshot of it (--from-snapshot)")
        luns = vm.lun_map()
        sizes = [luns[n].header.disk_size for n in sorted(luns)]
        memory_region = vm.base.header.require_region(RegionKind.STATE)
    temp = f"c-{uuid.uuid4().hex[:12]}"
    manager.create(
        temp,
        disk=sizes[0],
        memory=1 << 20,
        secondaries=tuple(sizes[1:]),
        mode=vm.base.header.mode,
        pool=vm.base.pool,
    )
    with manager._locked(pools):
        new = manager.find(temp, discover(pools, repair=False))
        total = sum(sizes)
        done = 0
        for number, volume in sorted(luns.items()):
            if record is not None:
                layer = dict(record.header.tops)[volume.header.naa]
                source = open_chain(manager, vm, volume, layer, read_only=True)
            else:
                source = open_live(manager, vm, number)
            target = open_live(manager, new, number)
            try:
                for offset in range(0, source.size, _STEP):
                    n = min(_STEP, source.size - offset)
                    piece = source.read(offset, n)
                    if piece.count(0) != n:
                        target.write(offset, piece)
                    done += n
                    if progress is not None:
                        progress(done, total)
                    faults.crashpoint("clone.copying")
                target.flush()
            finally:
                source.close()
                target.close()
        with (
            contextlib.closing(manager._open(new.base)) as base,
            contextlib.closing(manager._open(record if record is not None else vm.base)) as old,
        ):
            if base.header.require_region(RegionKind.STATE).length < memory_region.length:
                base.grow(state_length=memory_region.length)
            _copy_sealed(old, base, keyring, RegionKind.STATE)
            config = old.read_json(keyring, RegionKind.CONFIG)
            config["name"] = dst
            base.write_json(keyring, RegionKind.CONFIG, config)
            faults.crashpoint("clone.copied")
            for unit in new.units:  # the rename: the base unit last (the commit point)
                if unit is new.base:
                    continue
                with contextlib.closing(manager._open(unit)) as u:
                    u.commit(replace(u.header, name=dst))
            base.commit(replace(base.header, name=dst))
