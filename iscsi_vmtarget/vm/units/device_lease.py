"""Unit leases on device pools: where the lease block lives, its uncached I/O, and the
leases one process holds for the VMs of one state directory (:class:`LeaseKeeper`).

Where. Each unit's META region (its last MiB, :mod:`..format.header`) holds the header slots in
its first 16 KiB and nothing else; the lease block is the 4 KiB at **512 KiB into META**
(:func:`lease_offset`). It thus travels with the unit, needs no slot allocation shared
between hosts (nothing on a shared device could arbitrate one), and every unit made
before leases existed reads there as zeros (units are zeroed when allocated): a free
lease, so old pools open unchanged. Growth moves META to the new end: the device pool
copies the block there before it commits the longer table entry, and the holder
renews at the new place from then on (:func:`relocating`). Only the volume units a VM
exports (its LUN map) carry a lease: the copy-on-write layers and snapshot records of
a volume are only written by whoever serves it.

Writers elsewhere. A management command refuses a unit leased by a live owner elsewhere
(:func:`check_not_leased`: a changing heartbeat; a lease left by a dead owner costs one
duration of watching), and discovery repairs a unit only if no other owner holds its
VM's lease (:func:`leased_elsewhere`). Not covered: the pool's unit table itself is
serialised per host only (``pool.<name>.lock``), so units must not be created or
deleted in one device pool from two hosts at the same time.

Rbd pools lease their units through RBD's exclusive lock instead (:mod:`.lease_rbd`),
driven by the same :class:`LeaseKeeper`; :func:`check_not_leased` and
:func:`leased_elsewhere` ask the lock's owner and its watch there.

Directory pools are per host: the state-directory lock of ``serve`` and the per-unit
serve locks (:mod:`.locks`) already give each of their units a single owner, so their
units carry no lease.

Who. The owner id is a UUID made once per state directory and kept in
``<state-dir>/conf/owner.json``: a daemon restarted on the same state directory (even
after kill -9) takes its own leases back at once; another state directory, on this
host or another, must watch a lease expire first (:mod:`.lease`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import mmap
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ...storage import atomic_file
from ...storage.backend import BlockBackend
from ..format.header import UnitHeader
from .device_pool import LEASE_MOVERS, DevicePool, lease_offset
from .lease import (
    BLOCK,
    DEFAULT_SECONDS,
    LeaseHeldError,
    LeaseMachine,
    Owner,
    State,
    UnitLease,
    Unreadable,
    decode_record,
)
from .lease_rbd import RbdUnitLease, held_elsewhere
from .rbd_pool import RbdPool
from .scan import FoundVm
from .unit_pools import Pool, PoolCatalog, UnitRef

log = logging.getLogger("iscsi_vmtarget")


class DirectBlockIO:
    """One 4 KiB block of a device, read and written past every cache: O_DIRECT (the
    page cache of this host would hide another host's writes) and O_DSYNC (a write is
    on stable storage, not in a volatile disk cache, when it returns). A file system
    without O_DIRECT (tmpfs) gets O_DSYNC alone: one host shares its page cache."""

    def __init__(self, path: str, offset: int) -> None:
        self.path, self.offset = path, offset
        flags = os.O_RDWR | os.O_DSYNC | os.O_CLOEXEC
        try:
            self._fd = os.open(path, flags | getattr(os, "O_DIRECT", 0))
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._fd = os.open(path, flags)
        self._buf = mmap.mmap(-1, BLOCK)  # page aligned, as O_DIRECT wants

    def read(self) -> bytes:
        got = os.preadv(self._fd, [self._buf], self.offset)
        if got != BLOCK:
            raise OSError(errno.EIO, f"short read of the lease block at {self.offset}")
        return bytes(self._buf)

    def write(self, block: bytes) -> None:
        self._buf[:] = block
        if os.pwritev(self._fd, [self._buf], self.offset) != BLOCK:
            raise OSError(errno.EIO, f"short write of the lease block at {self.offset}")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self._buf.close()


def owner_id(state_dir: str) -> uuid.UUID:
    """This state directory's lease owner id, made on first use."""
    path = os.path.join(state_dir, "conf", "owner.json")
    try:
        with open(path) as fh:
            return uuid.UUID(str(json.load(fh)["owner_id"]))
    except FileNotFoundError:
        made = uuid.uuid4()
        atomic_file.write_json(path, {"owner_id": str(made)})
        return made


def _unit_block(pool: Pool, ref: UnitRef) -> tuple[str, int]:
    """(device path, lease block offset) of a device-pool unit, from a fresh table."""
    assert isinstance(pool, DevicePool)
    return pool.path, lease_offset(*pool.extent(ref))


def _what(vm_name: str, unit_uuid: uuid.UUID) -> str:
    return f"unit {unit_uuid} of VM {vm_name!r}"


@dataclass
class _Lease:
    lease: UnitLease | RbdUnitLease
    vm: str
    lock: threading.Lock = field(default_factory=threading.Lock)


class LeaseKeeper:
    """The unit leases this process holds, or waits for, for one state directory;
    a thread renews the held ones every ``duration / 4``."""

    def __init__(
        self,
        state_dir: str,
        duration: float = DEFAULT_SECONDS,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.state_dir = os.path.abspath(state_dir)
        self.duration = duration
        self._me: Owner | None = None
        self._clock, self._sleep = clock, sleep
        self._leases: dict[uuid.UUID, _Lease] = {}
        self.waiting: dict[str, str] = {}  # VM name -> why it is not served (last message)
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: called after each round of renewals (the daemon fences and retries VMs)
        self.on_tick: Callable[[list[str], list[str]], None] = lambda lost, waiting: None

    @property
    def me(self) -> Owner:
        """Our owner identity (its id made on first use: only where a device pool is)."""
        if self._me is None:
            self._me = Owner.here(owner_id(self.state_dir))
        return self._me

    # -- acquiring -------------------------------------------------------------------------

    def _lease_for(self, vm: str, unit_uuid: uuid.UUID, pool: Pool, ref: UnitRef) -> _Lease:
        with self._mutex:
            held = self._leases.get(unit_uuid)
            if held is None or held.lease.state in (State.LOST, State.RELEASED):
                lease: Any
                if isinstance(pool, RbdPool):  # the lease is RBD's lock (:mod:`.lease_rbd`)
                    lease = RbdUnitLease(pool.where, unit_uuid, _what(vm, unit_uuid))
                else:
                    machine = LeaseMachine(unit_uuid, self.me, self.duration)
                    lease = UnitLease(
                        DirectBlockIO(*_unit_block(pool, ref)), machine, _what(vm, unit_uuid),
                        self._clock, self._sleep,
                    )  # fmt: skip
                held = self._leases[unit_uuid] = _Lease(lease, vm)
            return held

    def acquire_vm(self, vm: FoundVm, catalog: PoolCatalog) -> set[uuid.UUID]:
        """Hold the lease of every device-pool unit ``vm`` exports; returns their
        UUIDs (:meth:`release` gives them up). LeaseHeldError (nothing held) while one
        is another's: the watch goes on, and :attr:`waiting` names the VM meanwhile."""
        units = []
        for found in vm.lun_map().values():
            pool = catalog.get(found.pool)
            if pool.kind in ("device", "rbd"):
                units.append((found.header.unit_uuid, pool, found.ref))
        got: list[uuid.UUID] = []
        if units:
            self.start()
        try:
            for unit_uuid, pool, ref in units:
                held = self._lease_for(vm.name, unit_uuid, pool, ref)
                with held.lock:
                    ok = held.lease.attempt()
                if not ok:
                    raise LeaseHeldError(held.lease.busy_message())
                got.append(unit_uuid)
        except BaseException as exc:
            self.release(got)
            if isinstance(exc, LeaseHeldError):
                self._note_waiting(vm.name, str(exc))
            raise
        if self.waiting.pop(vm.name, None) is not None:
            log.warning("VM %s: lease acquired, serving it now", vm.name)
        return set(got)

    def releaser(self, then: Callable[[], None], unit_uuid: uuid.UUID) -> Callable[[], None]:
        """``then()``, then release the lease of ``unit_uuid`` if we hold it (what
        closing a unit's guest view runs)."""

        def release() -> None:
            then()
            self.release([unit_uuid])

        return release

    def _note_waiting(self, vm: str, message: str) -> None:
        before = self.waiting.get(vm)
        self.waiting[vm] = message
        owner = message.partition(" is leased by ")[2].partition(";")[0]
        if before is None or owner not in before:  # log once per owner, not per retry
            log.warning("VM %s not served: %s; retrying until it expires", vm, message)

    def release(self, units: Iterable[uuid.UUID]) -> None:
        for unit_uuid in units:
            with self._mutex:
                held = self._leases.pop(unit_uuid, None)
            if held is not None:
                with held.lock:
                    try:
                        held.lease.release()
                    except OSError as exc:
                        log.warning("%s: lease not released: %s", held.lease.what, exc)
                    held.lease.io.close()

    # -- keeping ---------------------------------------------------------------------------

    def renew(self) -> list[str]:
        """Renew every held lease; the VMs whose lease was lost (taken over, or not
        renewed within a duration): their writes must stop."""
        lost = []
        with self._mutex:
            leases = list(self._leases.values())
        for held in leases:
            with held.lock:
                if held.lease.state is not State.HELD:
                    continue
                try:
                    ok = held.lease.renew()
                except OSError as exc:
                    log.error("%s: lease renewal failed: %s", held.lease.what, exc)
                    continue  # retried next round; LATE once a whole duration passed
                if not ok:
                    log.error("%s: lease lost: no longer serving this VM", held.lease.what)
                    lost.append(held.vm)
        return lost

    def start(self) -> None:
        """Renew in a thread of its own (a busy event loop or executor never delays a
        renewal), then call :attr:`on_tick` ``(lost VMs, VMs waiting for a lease)``:
        from the first lease held or waited for on."""
        with self._mutex:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.duration / 4):
            lost = self.renew()
            try:
                self.on_tick(lost, sorted(self.waiting))
            except Exception:  # never let the renewals stop
                log.exception("lease keeper")

    def close(self) -> None:
        """Stop renewing and release every lease (clean shutdown: another host may
        take the units at once)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._mutex:
            units = list(self._leases)
        self.release(units)

    def status(self) -> list[dict[str, Any]]:
        with self._mutex:
            leases = list(self._leases.values())
        out: list[dict[str, Any]] = [
            {"vm": h.vm, "unit": str(h.lease.machine.unit_uuid), "state": h.lease.state.value}
            for h in leases
            if h.lease.state is State.HELD
        ]
        for vm, message in sorted(self.waiting.items()):
            out.append({"vm": vm, "state": "waiting", "reason": message})
        return out

    @contextlib.contextmanager
    def relocating(self, unit_uuid: uuid.UUID, new_offset: int) -> Iterator[None]:
        held = self._leases.get(unit_uuid)
        if held is None:
            yield
            return
        with held.lock:  # no renewal between the copy and the commit
            yield
            held.lease.io.offset = new_offset  # type: ignore[attr-defined]


_KEEPERS: dict[str, LeaseKeeper] = {}


def keeper(state_dir: str, duration: float | None = None) -> LeaseKeeper:
    """This process's lease keeper for ``state_dir`` (made on first use)."""
    root = os.path.abspath(state_dir)
    found = _KEEPERS.get(root)
    if found is None:
        found = _KEEPERS[root] = LeaseKeeper(root, duration or DEFAULT_SECONDS)
    elif duration is not None:
        found.duration = duration
    return found


def forget_keeper(state_dir: str) -> None:
    found = _KEEPERS.pop(os.path.abspath(state_dir), None)
    if found is not None:
        found.close()


@contextlib.contextmanager
def relocating(
    device: BlockBackend, unit_uuid: uuid.UUID, old_offset: int, new_offset: int
) -> Iterator[None]:
    """Around the table commit that moves a unit's META region: copy the lease block
    to its new place first, so the lease never looks free or stale to another host."""
    block = device.read(old_offset, BLOCK)
    device.write(new_offset, block)
    device.flush()
    with contextlib.ExitStack() as stack:
        for found in list(_KEEPERS.values()):
            stack.enter_context(found.relocating(unit_uuid, new_offset))
        yield


def leased_elsewhere(state_dir: str, catalog: PoolCatalog, header: UnitHeader) -> bool:
    """Whether the VM of the unit ``header`` describes is leased by another owner (its
    base unit's or this unit's lease block holds another owner's record): then only
    that owner may repair it. Reads the blocks once, without watching: a stale lease
    is left to whoever takes it over."""
    wanted = {header.unit_uuid, header.owner_uuid or header.unit_uuid}
    for pool in catalog.all():
        if isinstance(pool, RbdPool):
            if any(held_elsewhere(pool.where, u) for u in wanted):
                return True
            continue
        if not isinstance(pool, DevicePool):
            continue
        for unit_uuid in wanted:
            extent = pool.extent_of(unit_uuid)
            if extent is None:
                continue
            io = DirectBlockIO(pool.path, lease_offset(*extent))
            try:
                raw = io.read()
            finally:
                io.close()
            try:
                record = decode_record(raw)
            except Unreadable:
                return True
            if record is not None and record.held and record.unit_uuid == unit_uuid:
                if record.owner.owner_id != owner_id(state_dir):
                    return True
    return False


def check_not_leased(state_dir: str, pool: Pool, ref: UnitRef, unit_uuid: uuid.UUID, vm: str,
                     *, sleep: Callable[[float], None] = time.sleep) -> None:  # fmt: skip
    """For a management command about to write a unit: LeaseHeldError if another
    owner's lease on it is live (its block changes within a lease duration). A lease
    left by a dead owner costs one duration of watching; ours passes at once."""
    if isinstance(pool, RbdPool):
        holder = held_elsewhere(pool.where, unit_uuid)
        if holder is not None:
            raise LeaseHeldError(
                f"{_what(vm, unit_uuid)} is leased by the RBD client at {holder}; it is "
                "served by that daemon, stop it there first"
            )
        return
    if pool.kind != "device":
        return
    path, offset = _unit_block(pool, ref)
    io = DirectBlockIO(path, offset)
    try:
        raw = io.read()
        if not any(raw):
            return  # never leased
        machine = LeaseMachine(unit_uuid, Owner.here(owner_id(state_dir)), 0.0)
        lease = UnitLease(io, machine, _what(vm, unit_uuid), sleep=sleep)
        machine.observe(raw, lease.clock())
        if machine.state is not State.WATCHING:
            return
        expiry = machine.expiry() or DEFAULT_SECONDS  # unreadable: the default duration
        deadline = lease.clock() + expiry
        while lease.clock() < deadline:
            sleep(expiry / 20)
            if io.read() != machine.seen:
                raise LeaseHeldError(
                    f"{lease.busy_message()}; it is served by that daemon, stop it there first"
                )
        owner = machine.foreign.owner.describe() if machine.foreign else "an unreadable lease"
        log.warning("%s: the lease of %s went stale; going on", lease.what, owner)
    finally:
        io.close()


LEASE_MOVERS.append(relocating)
