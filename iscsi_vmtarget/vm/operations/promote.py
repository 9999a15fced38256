"""``vm promote``: resume a replicated VM here, from the replica's last coherent checkpoint.

US 9,354,927: "at any point in time the virtual machine may be resumed at the destination ...
based on the last coherent replica". From a replica (:mod:`.replica`, usually the file
``vm receive`` made) this:

1. finishes the journal: a committed one is replayed (its SHA-256 checked first), an
   uncommitted one - a round cut short before its commit record - is discarded, so the
   replica holds exactly the last checkpoint the source committed;
2. checks everything before changing anything here: the superblock's and every embedded
   unit header's SHA-256, every grain of every disk image against its hash, and that
   the data keys sealing the state and config unwrap (the source's master key: this
   state directory's key file, or ``source_keys``);
3. builds the VM in a pool under a temporary name ``p-<12 hex digits>``: units with the
   source volumes' own UUIDs and NAA designators - so a guest view reports the
   ORIGINAL volume's identity (VPD 0x83 and 0x80), as for a reverted snapshot - the
   disk images copied (zero grains skipped: units stay sparse), the state and config
   decrypted chunk by chunk (authenticated: tampering is an error, never wrong bytes)
   and sealed again under a new data key wrapped by this state directory's master key;
4. renames it (the base unit's header commit last: the commit point, as for clones).

A crash (or power cut) in 3 leaves the temporary VM and an intent naming it
(``conf/promotes/<temp>.json``, :mod:`.intents`): the next repair - ``discover`` or any
command's - removes the temporary VM; the replica is untouched, so ``vm promote``
again resumes from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ...storage.backend import BlockBackend
from .. import faults
from ..format import sealed
from ..format.crypto import Keyring, MasterKey, RegionCipher
from ..format.header import RegionKind, RegionStatus, Role
from ..layers.cow import GRAIN, is_zero
from ..manager import MIN_MEMORY, RECOVERY, check_vm_name
from ..units.scan import FoundUnit, discover
from ..units.unit import Unit, create_unit
from ..units.unit_pools import DEFAULT_POOL
from ..vm_errors import IntegrityError, KeyFileError, VmError
from . import intents
from .replica import (
    BLOCK,
    HASH_BYTES,
    JOURNAL_MAGIC,
    RUN,
    ReplicaError,
    SealedArea,
    Superblock,
    VolumeArea,
    grain_hash,
    read_superblock,
    replay,
)

if TYPE_CHECKING:
    from ..manager import VmManager

Progress = Callable[[int, int], None]


@dataclass
class PromoteReport:
    name: str
    seq: int
    checkpoint: str
    journal: str  # what happened to the journal
    volumes: int = 0
    already: bool = False  # an earlier promote of this replica had finished


def temp_name(sb: Superblock) -> str:
    return f"p-{sb.base.unit_uuid.hex[:12]}"


def settle_journal(replica: BlockBackend, sb: Superblock) -> tuple[Superblock, str]:
    """Replay a committed journal, discard an uncommitted one; (superblock, what)."""
    if sb.journal_length:
        seq = sb.journal_seq
        sb, count = replay(replica, sb)
        return sb, f"committed journal of checkpoint {seq} replayed ({count} entries)"
    first = bytes(replica.read(sb.journal_offset, BLOCK))
    if first[:8] == JOURNAL_MAGIC and int.from_bytes(first[8:16], "little") > sb.seq:
        staged = int.from_bytes(first[8:16], "little")
        replica.write(sb.journal_offset, bytes(BLOCK))  # report it once
        replica.flush()
        return sb, f"uncommitted journal of checkpoint {staged} discarded"
    return sb, "no journal pending"


def _keyring(manager: VmManager, source_keys: list[MasterKey]) -> Keyring:
    """Unwraps with the source's keys too; seals with this state directory's key."""
    own = manager.keyring(create=True)
    return Keyring([*source_keys, *own.keys])


def _check_sealers(sb: Superblock, keyring: Keyring) -> None:
    """The data keys of the state and config unwrap, or a KeyFileError saying whose key
    is missing (before anything changes)."""
    for area in (sb.state, sb.config):
        if area.sealer is None:
            continue
        what = f"the {area.kind.name.lower()} of checkpoint {sb.checkpoint!r}"
        if keyring.find(area.sealer.key_id) is None:
            raise KeyFileError(
                f"{what} is sealed by the source's master key {area.sealer.key_id.hex()}, "
                "which this state directory does not hold: give the source's key file "
                "with --source-key"
            )
        keyring.unwrap(area.sealer.key_id, area.sealer.wrapped_key, what)


def _copy_volume(
    replica: BlockBackend,
    area: VolumeArea,
    target: BlockBackend | None,
    lun: int,
    step: Callable[[int], None],
) -> None:
    """Check every grain of ``area``'s image against its hash; with ``target``, copy the
    non-zero grains there. The image is the checkpoint's, ``area.size`` bytes (more than
    the source unit's header says when the disk grew while it had snapshots)."""
    size = area.size
    for offset in range(0, size, RUN):
        n = min(RUN, size - offset)
        data = memoryview(replica.read(area.image + offset, n))
        first = offset // GRAIN
        count = -(-n // GRAIN)
        hashes = replica.read(area.hashes + first * HASH_BYTES, count * HASH_BYTES)
        for i in range(count):
            grain = data[i * GRAIN : (i + 1) * GRAIN]
            if grain_hash(grain) != hashes[i * HASH_BYTES : (i + 1) * HASH_BYTES]:
                raise IntegrityError(
                    f"LUN {lun}: grain {first + i} of the replica does not match its hash "
                    "(the replica is damaged)"
                )
            if target is not None and not is_zero(grain):  # zero grains stay holes
                target.write(offset + i * GRAIN, grain)
        step(n)


def check_images(
    replica: BlockBackend, sb: Superblock, step: Callable[[int], None] | None = None
) -> None:
    """Check every grain of every disk image of the replica's checkpoint against its
    hash (IntegrityError names the first that differs)."""
    for lun, area in enumerate(sb.volumes):
        _copy_volume(replica, area, None, lun, step or (lambda _n: None))


def _restore_sealed(replica: BlockBackend, base: Unit, area: SealedArea, keyring: Keyring) -> None:
    region = area.region()
    if region is None or region.status is RegionStatus.EMPTY:
        return
    what = f"the {area.kind.name.lower()} region of the replica"
    if region.status is RegionStatus.WRITING:
        raise IntegrityError(f"{what}: it was being written when checkpointed")
    assert area.sealer is not None
    key = keyring.unwrap(area.sealer.key_id, area.sealer.wrapped_key, what)
    cipher = RegionCipher(key, area.sealer.unit_uuid, area.kind)
    pieces = sealed.read_chunks(replica, region, cipher, what)
    base.write_region(keyring, area.kind, pieces, region.used)


def _create_units(
    manager: VmManager, sb: Superblock, temp: str, pool: str, master: MasterKey
) -> None:
    """Units with the source volumes' UUIDs, secondaries first (as ``vm create``), each
    disk as large as the checkpoint's image."""
    target = manager.catalog.get(pool)
    created: list[FoundUnit] = []
    try:
        for area in sb.volumes[1:]:
            h = area.header
            ref, header = create_unit(
                target,
                mode=h.mode,
                role=Role.SECONDARY,
                disk_size=area.size,
                name=temp,
                owner=sb.base.unit_uuid,
                unit_uuid=h.unit_uuid,
            )
            created.append(FoundUnit(target.name, ref, header))
        create_unit(
            target,
            mode=sb.base.mode,
            role=Role.BASE,
            disk_size=sb.volumes[0].size,
            name=temp,
            memory=MIN_MEMORY,
            secondaries=sb.base.secondaries,
            master=master,
            unit_uuid=sb.base.unit_uuid,
        )
    except BaseException:
        for unit in created:
            target.delete(unit.ref)
        raise


def promote(
    manager: VmManager,
    name: str,
    replica: BlockBackend,
    *,
    source_keys: list[MasterKey] | None = None,
    pool: str = DEFAULT_POOL,
    progress: Progress | None = None,
) -> PromoteReport:
    """Make the replica's last coherent checkpoint VM ``name`` (module docstring)."""
    check_vm_name(name)
    sb = read_superblock(replica)
    if sb is None:
        raise ReplicaError("this LUN holds no replica: no round of 'vm replicate' reached it")
    if sb.vm_name != name:
        raise ReplicaError(f"this is a replica of VM {sb.vm_name!r}, not of {name!r}")
    sb, journal = settle_journal(replica, sb)
    if sb.seq == 0:
        raise ReplicaError("the replica holds no coherent checkpoint yet")
    report = PromoteReport(name, sb.seq, sb.checkpoint, journal, len(sb.volumes))
    existing = manager.discover(repair=False)
    vm = existing.find(name)
    if vm is not None:
        if vm.base.header.unit_uuid == sb.base.unit_uuid:
            report.already = True
            return report
        raise VmError(f"a VM named {name!r} already exists here ({vm.base.ref.location})")
    temp = temp_name(sb)
    if existing.find(temp) is not None:  # a promote a crash cut short
        manager.delete(temp, force=True)
        existing = manager.discover(repair=False)
    ours = {a.header.unit_uuid for a in sb.volumes}
    for other in existing.vms:
        clash = [u for u in other.all_units if u.header.unit_uuid in ours]
        if clash:
            raise VmError(
                f"VM {other.name!r} here already has unit {clash[0].header.unit_uuid} of the "
                "replicated VM (is this the source's own state directory?)"
            )
    keyring = _keyring(manager, source_keys or [])
    _check_sealers(sb, keyring)
    total = sum(a.size for a in sb.volumes)
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, 2 * total)

    check_images(replica, sb, step)  # every grain checked before any change
    # a failure, kill or power cut from here on leaves the intent: the next repair
    # (discover, any command's) removes the temporary VM (finish_promotes)
    with intents.held(manager, KIND, temp, {"temp": temp, "name": name}):
        _create_units(manager, sb, temp, pool, keyring.current)
        _fill(manager, sb, replica, temp, name, keyring, step)
    return report


KIND = "promotes"  # the intents' directory under conf/ (:mod:`.intents`)


def finish_promotes(manager: VmManager) -> list[str]:
    """Roll back every promote that failed, was killed or cut (callers hold every pool
    lock): delete its temporary VM (unless it reached its rename). The replica is
    untouched: ``vm promote`` again resumes the VM from it."""
    notes = []
    for temp, intent in intents.leftovers(manager, KIND):
        found = discover(manager.catalog.all(), repair=False)
        notes += intents.remove_temp_vm(manager, found, temp, "promote", f"VM {intent['name']}")
    return notes


RECOVERY.when_all_locked(finish_promotes, rank=3)


def _fill(
    manager: VmManager,
    sb: Superblock,
    replica: BlockBackend,
    temp: str,
    name: str,
    keyring: Keyring,
    step: Callable[[int], None],
) -> None:
    """Disk images, state and config into the temporary VM, then the rename."""
    with manager.session(repair=False) as session:
        vm = session.find(temp)
        luns = vm.lun_map()
        units = [manager.open_unit(luns[n]) for n in sorted(luns)]
        try:
            for lun, (unit, area) in enumerate(zip(units, sb.volumes, strict=True)):
                if unit.header.naa != area.header.naa:  # keep the source's designator
                    unit.commit(replace(unit.header, naa=area.header.naa))
                view = unit.guest_view()
                try:
                    _copy_volume(replica, area, view, lun, step)
                    view.flush()
                finally:
                    view.close()
                faults.crashpoint("promote.copying")
            base = units[0]
            state_length = sb.state.length
            if base.header.require_region(RegionKind.STATE).length < state_length:
                base.grow(state_length=state_length)
            _restore_sealed(replica, base, sb.state, keyring)
            _restore_sealed(replica, base, sb.config, keyring)
            faults.crashpoint("promote.filled")
            for unit in units[1:]:  # the rename: the base unit last (the commit point)
                unit.commit(replace(unit.header, name=name))
            base.commit(replace(base.header, name=name))
        finally:
            for unit in units:
                unit.close()
