"""VM operations end to end on real pools: create, discover, state, resize, delete,
key rotation and every kind of bad input (a clear error and nothing changed)."""

from __future__ import annotations

import hashlib
import io
import os
import struct
from pathlib import Path

import pytest

from iscsi_vmtarget.scsi import LogicalUnit, ScsiTarget, Status
from iscsi_vmtarget.server.vm_luns import capacity_listener, unit_identity
from iscsi_vmtarget.vm import (
    IntegrityError,
    InUseError,
    KeyFileError,
    NotFoundError,
    SizeError,
    StateDir,
    VmError,
    VmManager,
)
from iscsi_vmtarget.vm.format.header import SLOT_OFFSETS, Mode, RegionKind, Role
from iscsi_vmtarget.vm.format.sealed import table_bytes
from iscsi_vmtarget.vm.operations.resize import resize_vm
from iscsi_vmtarget.vm.units.locks import ServeLock
from iscsi_vmtarget.vm.units.unit import Unit
from tests.vm.helpers import make_nexus, sense_triplet

MIB = 1 << 20
DISK = 8 * MIB
MEMORY = 4 * MIB
PATTERN = b"STATE-PATTERN-7f3a9c" * 1000  # 20 kB, recognisable anywhere


def snapshot(root: Path) -> dict[str, str]:
    """Hash of every file under ``root`` but the lock files."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and "locks" not in path.parts:
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def write_state(manager: VmManager, name: str, data: bytes) -> None:
    manager.write_state(name, io.BytesIO(data), len(data))


def read_state(manager: VmManager, name: str) -> bytes:
    return b"".join(manager.read_state(name))


def unit_files(state_dir: Path) -> list[Path]:
    return sorted((state_dir / "pools" / "default").glob("*.unit"))


def guest_read_all(manager: VmManager, name: str) -> bytes:
    vm = manager.find(name)
    unit = Unit.open(manager.catalog.get(vm.base.pool), vm.base.ref)
    view = unit.guest_view()
    try:
        return bytes(view.read(0, view.size))
    finally:
        view.close()
        unit.close()


# -- create, list, discover -------------------------------------------------------------


@pytest.mark.parametrize("mode", list(Mode))
def test_create_and_discover_with_secondaries(manager: VmManager, mode: Mode, pool: str) -> None:
    vm = manager.create(
        "web", disk=DISK, memory=MEMORY, secondaries=(4 * MIB, 6 * MIB), mode=mode, pool=pool
    )
    assert {u.pool for u in vm.units} == {pool}
    assert [u.header.disk_size for u in vm.units] == [DISK, 4 * MIB, 6 * MIB]
    assert vm.base.header.role is Role.BASE and vm.base.header.mode is mode
    assert all(u.header.role is Role.SECONDARY for u in vm.secondaries)
    assert vm.base.header.secondaries == tuple(u.header.naa for u in vm.secondaries)
    again = manager.discover()
    assert [v.name for v in again.vms] == ["web"]
    assert not again.orphans and not again.damaged
    assert {n: u.header.naa for n, u in again.vms[0].lun_map().items()} == {
        n: u.header.naa for n, u in vm.lun_map().items()
    }
    assert manager.config("web")["memory"] == MEMORY


def test_name_clash_changes_nothing(manager: VmManager, state_dir: Path) -> None:
    manager.create("web", disk=DISK, memory=MEMORY)
    before = snapshot(state_dir)
    with pytest.raises(VmError, match="already exists"):
        manager.create("web", disk=DISK, memory=MEMORY, secondaries=(4 * MIB,))
    assert snapshot(state_dir) == before


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"disk": 1000}, "not a multiple of the 512-byte block"),
        ({"disk": MIB}, "below the minimum"),
        ({"disk": 1 << 60}, "above the maximum"),
        ({"memory": 0}, "memory size 0 is out of range"),
        ({"secondaries": (4 * MIB, 513)}, "secondary disk 2 size 513"),
        ({"pool": "nope"}, "unknown pool 'nope'"),
        ({"name": "Bad_Name"}, "bad VM name"),
    ],
)
def test_bad_input_creates_nothing(
    manager: VmManager, state_dir: Path, kwargs: dict[str, object], message: str
) -> None:
    args: dict[str, object] = {"name": "db", "disk": DISK, "memory": MEMORY, **kwargs}
    name = args.pop("name")
    with pytest.raises(VmError, match=message):
        manager.create(name, **args)  # type: ignore[arg-type]
    assert snapshot(state_dir) == {}


def test_newer_format_unit_is_reported_and_left_alone(manager: VmManager, state_dir: Path) -> None:
    manager.create("old", disk=DISK, memory=MEMORY)
    path = unit_files(state_dir)[0]
    data = bytearray(path.read_bytes())
    meta = len(data) - MIB
    for rel in SLOT_OFFSETS:
        slot = meta + rel
        if data[slot : slot + 8] == b"IVMTUNIT":
            struct.pack_into("<H", data, slot + 8, 4)  # format version 4
            (length,) = struct.unpack_from("<H", data, slot + 10)
            data[slot + length : slot + length + 32] = hashlib.sha256(
                data[slot : slot + length]
            ).digest()
    path.write_bytes(data)
    before = snapshot(state_dir)
    found = manager.discover()
    assert not found.vms and "format version 4" in found.damaged[0]["reason"]
    for action in (
        lambda: resize_vm(manager, "old", disk=2 * DISK),
        lambda: write_state(manager, "old", b"x"),
        lambda: manager.delete("old"),
    ):
        with pytest.raises(NotFoundError, match="format version 4"):
            action()
    assert snapshot(state_dir) == before


# -- state: encryption at rest, isolation, tampering, keys -----------------------------


@pytest.mark.parametrize("mode", list(Mode))
def test_state_pattern_never_reaches_disk_or_guest(
    manager: VmManager, state_dir: Path, mode: Mode, pool: str
) -> None:
    manager.create("vm1", disk=DISK, memory=MEMORY, mode=mode, pool=pool)
    write_state(manager, "vm1", PATTERN)
    manager.set_config("vm1", ["description=STATE-PATTERN-7f3a9c"])
    assert read_state(manager, "vm1") == PATTERN
    needle = b"STATE-PATTERN-7f3a9c"
    for path in state_dir.rglob("*"):
        if path.is_file():
            assert needle not in path.read_bytes(), path
    guest = guest_read_all(manager, "vm1")
    assert len(guest) == DISK and needle not in guest
    vm = manager.find("vm1")
    unit = Unit.open(manager.catalog.get(vm.base.pool), vm.base.ref)
    raw = unit.raw_view()
    try:
        assert raw.size == unit.header.unit_size and raw.read_only
        assert needle not in bytes(raw.read(0, raw.size))  # ciphertext only
    finally:
        raw.close()
        unit.close()


def _state_data_offset(manager: VmManager, name: str) -> tuple[Path, int]:
    vm = manager.find(name)
    region = vm.base.header.require_region(RegionKind.STATE)
    path = Path(manager.catalog.get(vm.base.pool).path) / vm.base.ref.key
    return path, region.offset + table_bytes(region.length)


def test_one_tampered_ciphertext_byte_fails_clearly(manager: VmManager) -> None:
    manager.create("vm1", disk=DISK, memory=MEMORY)
    write_state(manager, "vm1", PATTERN)
    path, offset = _state_data_offset(manager, "vm1")
    with open(path, "r+b") as fh:
        fh.seek(offset + 5000)
        byte = fh.read(1)[0]
        fh.seek(offset + 5000)
        fh.write(bytes([byte ^ 0x80]))
    with pytest.raises(IntegrityError, match="chunk 0 failed authentication"):
        read_state(manager, "vm1")


def test_wrong_key_file_fails_clearly_and_changes_nothing(
    manager: VmManager, state_dir: Path, tmp_path: Path
) -> None:
    manager.create("vm1", disk=DISK, memory=MEMORY)
    write_state(manager, "vm1", PATTERN)
    before = snapshot(state_dir)
    other = VmManager(StateDir.at(str(state_dir), str(tmp_path / "other.key")))
    from iscsi_vmtarget.vm.format.crypto import create_key_file

    create_key_file(str(tmp_path / "other.key"))
    with other:
        for action in (
            lambda: read_state(other, "vm1"),
            lambda: write_state(other, "vm1", b"new state"),
            lambda: other.set_config("vm1", ["cpus=2"]),
            lambda: resize_vm(other, "vm1", disk=2 * DISK),
            lambda: other.config("vm1"),
        ):
            with pytest.raises(KeyFileError, match="wrong key file"):
                action()
    assert snapshot(state_dir) == before
    assert read_state(manager, "vm1") == PATTERN


def test_state_too_big_changes_nothing(manager: VmManager, state_dir: Path) -> None:
    manager.create("vm1", disk=DISK, memory=MEMORY)
    write_state(manager, "vm1", PATTERN)
    before = snapshot(state_dir)
    with pytest.raises(SizeError, match="vm resize --memory"):
        write_state(manager, "vm1", bytes(64 * MIB))
    assert snapshot(state_dir) == before


def test_key_rotation_rewraps_without_reencrypting(manager: VmManager, state_dir: Path) -> None:
    manager.create("a", disk=DISK, memory=MEMORY)
    manager.create("b", disk=DISK, memory=MEMORY, mode=Mode.OFFSET)
    write_state(manager, "a", PATTERN)
    path, offset = _state_data_offset(manager, "a")
    ciphertext = path.read_bytes()[offset : offset + len(PATTERN)]
    old_key = (state_dir / "master.key").read_bytes()
    report = manager.rotate_key()
    assert len(report["rewrapped"]) == 2 and not report["skipped"]  # type: ignore[arg-type]
    assert (state_dir / "master.key").read_bytes() != old_key
    assert not (state_dir / "master.key.new").exists()
    assert path.read_bytes()[offset : offset + len(PATTERN)] == ciphertext
    assert read_state(manager, "a") == PATTERN
    assert manager.config("b")["name"] == "b"
    (state_dir / "old.key").write_bytes(old_key)
    (state_dir / "old.key").chmod(0o600)
    with VmManager(StateDir.at(str(state_dir), str(state_dir / "old.key"))) as stale:
        with pytest.raises(KeyFileError, match="wrong key file"):
            read_state(stale, "a")


def test_interrupted_rotation_finishes_on_the_next_run(manager: VmManager, state_dir: Path) -> None:
    manager.create("a", disk=DISK, memory=MEMORY)
    write_state(manager, "a", PATTERN)
    from iscsi_vmtarget.vm.format.crypto import create_key_file

    create_key_file(str(state_dir / "master.key.new"))  # as if killed mid-rotation
    assert read_state(manager, "a") == PATTERN  # both keys are in the ring meanwhile
    report = manager.rotate_key()
    assert report["rewrapped"]
    assert read_state(manager, "a") == PATTERN


# -- resize ----------------------------------------------------------------------------------


def _guest_write(manager: VmManager, name: str, offset: int, data: bytes) -> None:
    vm = manager.find(name)
    unit = Unit.open(manager.catalog.get(vm.base.pool), vm.base.ref)
    view = unit.guest_view()
    try:
        view.write(offset, data)
        view.flush()
    finally:
        view.close()
        unit.close()


@pytest.mark.parametrize("mode", list(Mode))
def test_resize_keeps_data_and_shows_zeros(manager: VmManager, mode: Mode, pool: str) -> None:
    manager.create("vm1", disk=DISK, memory=MEMORY, mode=mode, pool=pool)
    write_state(manager, "vm1", PATTERN)
    head, tail = b"HEAD" * 128, b"TAIL" * 128
    _guest_write(manager, "vm1", 0, head)
    _guest_write(manager, "vm1", DISK - len(tail), tail)
    vm = resize_vm(manager, "vm1", disk=3 * DISK, memory=8 * MEMORY)
    assert vm.base.header.disk_size == 3 * DISK
    guest = guest_read_all(manager, "vm1")
    assert len(guest) == 3 * DISK
    assert guest[: len(head)] == head and guest[DISK - len(tail) : DISK] == tail
    assert guest[DISK:] == bytes(2 * DISK)  # vacated hidden ranges were scrubbed
    assert read_state(manager, "vm1") == PATTERN
    assert manager.config("vm1")["memory"] == 8 * MEMORY
    assert not manager.discover().repaired


def test_resize_refuses_shrinking_and_changes_nothing(manager: VmManager, state_dir: Path) -> None:
    manager.create("vm1", disk=DISK, memory=MEMORY)
    before = snapshot(state_dir)
    with pytest.raises(SizeError, match="shrinking"):
        resize_vm(manager, "vm1", disk=DISK // 2)
    with pytest.raises(SizeError, match="not a multiple"):
        resize_vm(manager, "vm1", disk=DISK + 1)
    assert snapshot(state_dir) == before


def test_resize_while_served_is_refused(manager: VmManager, state_dir: Path) -> None:
    vm = manager.create("vm1", disk=DISK, memory=MEMORY)
    lock = ServeLock(str(state_dir), vm.base.header.unit_uuid)
    try:
        with pytest.raises(InUseError, match="running iscsi-vmtarget server"):
            resize_vm(manager, "vm1", disk=2 * DISK)
        with pytest.raises(InUseError):
            manager.delete("vm1")
        assert manager.served(manager.find("vm1"))
    finally:
        lock.release()
    manager.delete("vm1")


def test_live_resize_raises_capacity_data_has_changed(manager: VmManager) -> None:
    """In-process resize of an exported guest view: the LU reports the new capacity and
    every I_T nexus gets CAPACITY DATA HAS CHANGED (2Ah/09h) once."""
    vm = manager.create("vm1", disk=DISK, memory=MEMORY, mode=Mode.ALIGNED)
    unit = Unit.open(manager.catalog.get(vm.base.pool), vm.base.ref)
    view = unit.guest_view()
    unit.close()
    lu = LogicalUnit(view, unit_identity(unit.header), block_size=512)
    view.add_capacity_listener(capacity_listener(lu))
    target = ScsiTarget({0: lu})
    nexus = make_nexus()
    target.nexus_added(nexus)
    target.execute(nexus, 0, bytes(6), None)  # power-on attention
    resize_vm(manager, "vm1", disk=2 * DISK, live={vm.base.header.unit_uuid: view})
    first = target.execute(nexus, 0, bytes(6), None)
    assert sense_triplet(first) == (0x6, 0x2A, 0x09)
    rc16 = target.execute(nexus, 0, struct.pack(">BBQIBB", 0x9E, 0x10, 0, 32, 0, 0), None)
    assert rc16.status == Status.GOOD
    assert struct.unpack_from(">Q", rc16.data_in)[0] == 2 * DISK // 512 - 1
    assert target.execute(nexus, 0, bytes(6), None).status == Status.GOOD
    view.close()


# -- delete and discovery's lists apart ------------------------------------------------------


def test_delete_removes_every_unit(manager: VmManager, state_dir: Path) -> None:
    manager.create("vm1", disk=DISK, memory=MEMORY, secondaries=(4 * MIB,))
    manager.create("vm2", disk=DISK, memory=MEMORY)
    manager.delete("vm1")
    assert [v.name for v in manager.discover().vms] == ["vm2"]
    assert len(unit_files(state_dir)) == 1
    with pytest.raises(NotFoundError, match="no VM named 'vm1'"):
        manager.delete("vm1")


def test_discovery_lists_foreign_damaged_orphans_and_missing(
    manager: VmManager, state_dir: Path
) -> None:
    manager.create("vm1", disk=DISK, memory=MEMORY, secondaries=(4 * MIB, 4 * MIB))
    manager.create("vm2", disk=DISK, memory=MEMORY)
    pool = state_dir / "pools" / "default"
    (pool / "notes.txt").write_bytes(b"not a unit")
    vm1, vm2 = manager.find("vm1"), manager.find("vm2")
    (pool / vm1.secondaries[0].ref.key).unlink()  # vm1 loses LUN 1
    (pool / vm1.base.ref.key).rename(pool / "moved-away")  # still found: names don't matter
    base2 = pool / vm2.base.ref.key
    data = bytearray(base2.read_bytes())
    for rel in SLOT_OFFSETS:
        data[len(data) - MIB + rel + 20] ^= 0xFF  # both header slots damaged
    base2.write_bytes(data)
    found = manager.discover()
    assert [v.name for v in found.vms] == ["vm1"]
    assert found.vms[0].missing == [vm1.secondaries[0].header.naa]
    assert sorted(found.vms[0].lun_map()) == [0, 2]  # LUN 2 keeps its number
    assert [f["location"] for f in found.foreign] == ["default:notes.txt"]
    assert found.damaged[0]["location"] == f"default:{vm2.base.ref.key}"
    assert "checksum" in found.damaged[0]["reason"]
    assert not found.orphans
    manager.delete("vm1")
    assert manager.discover().orphans == []


# -- device pools --------------------------------------------------------------------------


def test_device_pool_lifecycle(manager: VmManager, tmp_path: Path) -> None:
    device = tmp_path / "device.img"
    pool = manager.catalog.create_device("dev", str(device), size=96 * MIB)
    assert pool.describe()["units"] == 0
    manager.create("a", disk=DISK, memory=MEMORY, secondaries=(4 * MIB,), pool="dev")
    manager.create("b", disk=DISK, memory=MEMORY, pool="dev", mode=Mode.OFFSET)
    write_state(manager, "a", PATTERN)
    assert PATTERN[:20] not in device.read_bytes()
    with pytest.raises(SizeError, match="no free extent"):
        manager.create("c", disk=64 * MIB, memory=MEMORY, pool="dev")
    assert [v.name for v in manager.discover().vms] == ["a", "b"]  # c left nothing behind
    manager.delete("a")
    manager.create("c", disk=DISK, memory=MEMORY, pool="dev")  # reuses a's space
    assert guest_read_all(manager, "c") == bytes(DISK)  # never a former unit's bytes
    # the pool is found again from the device alone
    (Path(manager.catalog.conf_dir) / "pools" / "dev.toml").unlink()
    manager.catalog.close()
    fresh = VmManager(StateDir.at(manager.state.root))
    with fresh:
        fresh.catalog.create_device("again", str(device))
        assert sorted(v.name for v in fresh.discover().vms) == ["b", "c"]


def test_device_with_data_is_not_formatted(manager: VmManager, tmp_path: Path) -> None:
    device = tmp_path / "disk.img"
    device.write_bytes(b"MBR!" + bytes(4 * MIB))
    with pytest.raises(VmError, match="--force"):
        manager.catalog.create_device("dev", str(device))
    assert device.read_bytes()[:4] == b"MBR!"
    with pytest.raises(NotFoundError):
        manager.catalog.get("dev")


def test_directory_pool_and_clashes(manager: VmManager, tmp_path: Path) -> None:
    pool = manager.catalog.create_directory("fast", str(tmp_path / "fast"))
    assert pool.kind == "directory" and os.path.isdir(pool.path)
    with pytest.raises(VmError, match="already exists"):
        manager.catalog.create_directory("fast", None)
    with pytest.raises(VmError, match="already pool 'fast'"):
        manager.catalog.create_directory("other", str(tmp_path / "fast"))
    with pytest.raises(VmError, match="bad pool name"):
        manager.catalog.create_directory("No!", None)
    manager.create("vm1", disk=DISK, memory=MEMORY, pool="fast")
    with pytest.raises(VmError, match="already exists"):
        manager.create("vm1", disk=DISK, memory=MEMORY)  # names are unique across pools
    assert manager.find("vm1").base.pool == "fast"
