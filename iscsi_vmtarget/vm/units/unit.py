"""One storage unit: create it, open it, update its header, its hidden regions, grow it.

Every change is a header commit (:func:`Unit.commit`): write the slot holding the older
generation, flush. A resize is a short journal in the header itself:

1. the pool makes room (:meth:`Pool.begin_growth`) and the new tail gets the new
   header in state RESIZING, listing the copies (moves) and the ranges to zero
   (scrubs); the pool commits the new size (:meth:`Pool.end_growth`);
2. the moves run (sources are never overwritten: destinations lie past the old end),
   then a commit in state SCRUBBING;
3. the scrubs run and the GPT is rewritten, then a commit in state CLEAN.

A crash anywhere leaves either the old unit (step 1 not committed) or a header that
says what is left to do; :meth:`Unit.open` rolls it forward before anyone may open a
guest view, so a guest never sees a vacated range before it is zeroed.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace

from ...scsi.logical_unit import UnitIdentity
from ...storage.backend import BlockBackend
from .. import faults
from ..format import sealed, sealed_blocks
from ..format.crypto import Keyring, MasterKey, RandomSource, RegionCipher, new_data_key
from ..format.gpt import write_gpt
from ..format.header import (
    SLOT_OFFSETS,
    Mode,
    Region,
    RegionKind,
    RegionStatus,
    Role,
    UnitHeader,
    UnitState,
    encode_header,
    scan_slots,
)
from ..format.layout import GrowthPlan, initial_regions, plan_growth
from ..layers.cow import is_zero
from ..layers.view import GuestView, RawView
from ..vm_errors import ForeignUnitError, FormatError, IntegrityError, SizeError, VmError
from .unit_pools import Pool, UnitRef

_COPY = 4 << 20


def naa_for(unit_uuid: uuid.UUID) -> bytes:
    """The unit's NAA 6 designator (SPC-4 §7.8.6.6.5), fixed at creation."""
    return UnitIdentity.from_uuid(unit_uuid).naa


class Unit:
    """An open unit: its pool, its raw backend and its current header."""

    def __init__(
        self, pool: Pool, ref: UnitRef, backend: BlockBackend, header: UnitHeader, slot: int
    ) -> None:
        self.pool = pool
        self.ref = ref
        self.backend = backend
        self.header = header
        self.slot = slot
        self.repaired: list[str] = []

    @classmethod
    def open(cls, pool: Pool, ref: UnitRef, *, repair: bool = True) -> Unit:
        """Open the unit at ``ref``; with ``repair``, finish an interrupted resize.

        FormatError (not a unit, or both slots damaged), NewerFormatError.
        """
        notes = []
        if repair:
            note = pool.recover(ref)
            if note:
                notes.append(note)
        backend = pool.open(ref)
        try:
            scan = scan_slots(backend)
        except VmError:
            backend.close()
            raise
        if scan.header is None:
            backend.close()
            if not scan.marked:
                raise ForeignUnitError(f"{ref.location} is not an iscsi-vmtarget unit")
            raise FormatError(f"{ref.location}: damaged unit ({'; '.join(scan.problems)})")
        unit = cls(pool, ref, backend, scan.header, scan.slot)
        unit.repaired = notes
        if repair and unit.header.state is not UnitState.CLEAN:
            state = unit.header.state.name.lower()
            unit.finish_resize()
            unit.repaired.append(f"interrupted resize completed (was {state})")
        for region in unit.header.regions if repair else ():
            if region.status is RegionStatus.STAGED:
                unit.finish_staged(region.kind)
                unit.repaired.append(f"{region.kind.name.lower()} region write completed")
        return unit

    @property
    def what(self) -> str:
        label = f" of VM {self.header.name!r}" if self.header.name else ""
        return f"unit {self.header.unit_uuid}{label}"

    # -- header commits ------------------------------------------------------------------

    def commit(self, header: UnitHeader) -> UnitHeader:
        """Write ``header`` (generation + 1) into the older slot and flush."""
        new = replace(header, generation=self.header.generation + 1)
        slot = 1 - self.slot
        image = encode_header(new)
        offset = new.meta_offset + SLOT_OFFSETS[slot]
        if faults.armed("header.torn"):  # a write cut short by the crash
            self.backend.write(offset, image[:100])
            self.backend.flush()
            faults.crashpoint("header.torn")
        self.backend.write(offset, image)
        self.backend.flush()
        self.header, self.slot = new, slot
        faults.crashpoint("header.committed")
        return new

    # -- views -----------------------------------------------------------------------------

    def guest_view(
        self, *, read_only: bool = False, on_close: Callable[[], None] | None = None
    ) -> GuestView:
        """A guest view on its own backend handle (closing it leaves the unit open)."""
        return GuestView(
            self.pool.open(self.ref), self.header, read_only=read_only, on_close=on_close
        )

    def raw_view(self, *, writable: bool = False) -> RawView:
        return RawView(self.pool.open(self.ref), writable=writable)

    # -- encrypted regions ---------------------------------------------------------------

    def data_key(self, keyring: Keyring) -> bytes:
        if not self.header.wrapped_key:
            raise VmError(f"{self.what} has no encrypted regions")
        return keyring.unwrap(self.header.key_id, self.header.wrapped_key, self.what)

    def _cipher(self, keyring: Keyring, kind: RegionKind, random: RandomSource) -> RegionCipher:
        return RegionCipher(self.data_key(keyring), self.header.unit_uuid, kind, random)

    def read_region(self, keyring: Keyring, kind: RegionKind) -> Iterator[bytes]:
        """The plaintext of an encrypted region, chunk by chunk (authenticated)."""
        region = self.header.require_region(kind)
        what = f"the {kind.name.lower()} region of {self.what}"
        if region.status is RegionStatus.WRITING:
            raise IntegrityError(
                f"{what}: its last write was interrupted (generation {region.generation} "
                "is incomplete); it holds no usable data"
            )
        if region.status is RegionStatus.EMPTY:
            return iter(())
        if region.status is RegionStatus.BLOCKS:  # written through a hypervisor view
            key = self.data_key(keyring)
            return sealed_blocks.read_image(
                self.backend, region, key, self.header.unit_uuid, kind, what
            )
        cipher = self._cipher(keyring, kind, os.urandom)
        return sealed.read_chunks(self.backend, region, cipher, what)

    def write_region(
        self,
        keyring: Keyring,
        kind: RegionKind,
        pieces: Iterable[bytes],
        length: int,
        random: RandomSource = os.urandom,
    ) -> None:
        """Replace an encrypted region's content: ``length`` bytes in CHUNK pieces."""
        region = self.header.require_region(kind)
        room = sealed.capacity(region.length)
        if length > room:
            raise SizeError(
                f"{length} bytes do not fit the {kind.name.lower()} region of {self.what} "
                f"(capacity {room} bytes)"
                + ("; grow it with 'vm resize --memory'" if kind is RegionKind.STATE else "")
            )
        cipher = self._cipher(keyring, kind, random)  # wrong key: fail before any change
        if region.status is RegionStatus.STAGED:  # a crash left a staged write: finish it
            region = self.finish_staged(kind)
        generation = region.generation + 1
        first = sealed.staging_slot(region, length)
        if first is not None:  # crash-atomic: the old content stays until the commit
            staged = replace(region, status=RegionStatus.STAGED, generation=generation, used=length)
            written = sealed.write_chunks(self.backend, staged, generation, cipher, pieces, first)
            if written != length:
                raise VmError(f"expected {length} bytes of input, got {written}; nothing changed")
            self.backend.flush()
            faults.crashpoint("region.written")
            self.commit(self.header.with_region(staged))  # the switch
            faults.crashpoint("region.staged")
            self.finish_staged(kind)
            return
        # too large to stage: in place, the old content is gone from this commit on
        started = replace(region, status=RegionStatus.WRITING, generation=generation, used=length)
        self.commit(self.header.with_region(started))
        written = sealed.write_chunks(self.backend, started, generation, cipher, pieces)
        if written != length:
            raise VmError(f"expected {length} bytes of input, got {written}; nothing usable kept")
        self.backend.flush()
        faults.crashpoint("region.written")
        self.commit(self.header.with_region(replace(started, status=RegionStatus.VALID)))

    def finish_staged(self, kind: RegionKind) -> Region:
        """Copy a STAGED region's content to its place and commit it VALID (what a
        crash after the staged commit left to do; idempotent)."""
        region = self.header.require_region(kind)
        if region.status is not RegionStatus.STAGED:
            return region
        sealed.unstage(self.backend, region)
        self.backend.flush()
        faults.crashpoint("region.unstaged")
        done = replace(region, status=RegionStatus.VALID)
        self.commit(self.header.with_region(done))
        return done

    def read_json(self, keyring: Keyring, kind: RegionKind) -> dict[str, object]:
        data = b"".join(self.read_region(keyring, kind))
        if not data:
            return {}
        value = json.loads(data)
        if not isinstance(value, dict):
            raise FormatError(f"the {kind.name.lower()} region of {self.what} is not a table")
        return value

    def write_json(self, keyring: Keyring, kind: RegionKind, value: dict[str, object]) -> None:
        data = json.dumps(value, sort_keys=True).encode()
        pieces = [data[i : i + sealed.CHUNK] for i in range(0, len(data), sealed.CHUNK)]
        self.write_region(keyring, kind, pieces, len(data))

    def rewrap(self, keyring: Keyring, new_key: MasterKey) -> bool:
        """Wrap the data key under ``new_key`` (key rotation); False if it already is."""
        if not self.header.wrapped_key or self.header.key_id == new_key.key_id:
            return False
        data_key = self.data_key(keyring)
        self.commit(replace(self.header, key_id=new_key.key_id, wrapped_key=new_key.wrap(data_key)))
        return True

    # -- growth ----------------------------------------------------------------------------

    def plan(self, disk_size: int | None = None, state_length: int | None = None) -> GrowthPlan:
        return plan_growth(self.header, disk_size, state_length)

    def grow(self, disk_size: int | None = None, state_length: int | None = None) -> bool:
        """Grow the disk and/or the state region crash-safely; False if nothing to do."""
        plan = self.plan(disk_size, state_length)
        if plan.unit_size == self.header.unit_size and plan.regions == self.header.regions:
            return False
        journal = replace(
            self.header,
            regions=plan.regions,
            unit_size=plan.unit_size,
            state=UnitState.RESIZING,
            moves=plan.moves,
            scrubs=plan.scrubs,
            generation=self.header.generation + 1,
        )
        self.pool.begin_growth(self.ref, self.backend, plan.unit_size)
        faults.crashpoint("resize.extended")
        self.backend.write(journal.meta_offset + SLOT_OFFSETS[0], encode_header(journal))
        self.pool.end_growth(self.ref, self.backend)  # flushes, then commits the new size
        self.header, self.slot = journal, 0
        faults.crashpoint("resize.journaled")
        self.finish_resize()
        return True

    def finish_resize(self) -> None:
        """Roll a RESIZING or SCRUBBING unit forward to CLEAN (idempotent steps)."""
        if self.header.state is UnitState.RESIZING:
            for move in self.header.moves:
                self._copy(move.src, move.dst, move.length)
                faults.crashpoint("resize.moving")
            self.backend.flush()
            self.commit(replace(self.header, state=UnitState.SCRUBBING))
            faults.crashpoint("resize.moved")
        if self.header.state is UnitState.SCRUBBING:
            for extent in self.header.scrubs:
                self.backend.unmap(extent.offset, extent.length)
            if self.header.mode is not Mode.TRUNCATE:
                write_gpt(self.backend, self.header)
            self.backend.flush()
            faults.crashpoint("resize.scrubbed")
            self.commit(replace(self.header, state=UnitState.CLEAN, moves=(), scrubs=()))

    def _copy(self, src: int, dst: int, length: int) -> None:
        done = 0
        while done < length:
            n = min(_COPY, length - done)
            piece = self.backend.read(src + done, n)
            if not is_zero(piece):  # destinations are fresh zeros: keep them sparse
                self.backend.write(dst + done, piece)
            done += n

    def close(self) -> None:
        self.backend.close()


def create_unit(
    pool: Pool,
    *,
    mode: Mode,
    role: Role,
    disk_size: int,
    name: str,
    memory: int = 0,
    owner: uuid.UUID | None = None,
    secondaries: tuple[bytes, ...] = (),
    master: MasterKey | None = None,
    config: dict[str, object] | None = None,
    unit_uuid: uuid.UUID | None = None,
    random: RandomSource = os.urandom,
) -> tuple[UnitRef, UnitHeader]:
    """Allocate, write and commit a new unit; on any error nothing is left behind."""
    unit_uuid = unit_uuid or uuid.uuid4()
    regions, size = initial_regions(mode, role, disk_size, memory)
    key_id, wrapped, data_key = bytes(8), b"", b""
    if role is Role.BASE:
        if master is None:
            raise VmError("a base unit needs a master key to seal its state")
        data_key = new_data_key(random)
        key_id, wrapped = master.key_id, master.wrap(data_key)
    header = UnitHeader(
        unit_uuid=unit_uuid,
        naa=naa_for(unit_uuid),
        role=role,
        mode=mode,
        unit_size=size,
        regions=regions,
        name=name,
        owner_uuid=owner or unit_uuid,
        created=int(time.time()),
        key_id=key_id,
        wrapped_key=wrapped,
        secondaries=secondaries,
        generation=1,
    )
    ref, backend = pool.allocate(unit_uuid, size)
    try:
        if mode is not Mode.TRUNCATE:
            write_gpt(backend, header)
        backend.write(header.meta_offset + SLOT_OFFSETS[0], encode_header(header))
        unit = Unit(pool, ref, backend, header, 0)
        if config is not None and master is not None:
            unit.write_json(Keyring([master]), RegionKind.CONFIG, config)
        backend.flush()
        faults.crashpoint("create.written")
        final = pool.commit(ref, backend)
    except BaseException:
        pool.abandon(ref, backend)
        raise
    backend.close()
    return final, unit.header
