"""Shared helpers for the VM layer tests: units over memory and SCSI harnesses on
guest views."""

from __future__ import annotations

import inspect
import itertools
import os
import signal
import struct
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from iscsi_vmtarget.scsi import LogicalUnit, Nexus, ScsiResponse, ScsiTarget, Status
from iscsi_vmtarget.scsi.sense import parse_sense
from iscsi_vmtarget.storage import MemoryBackend
from iscsi_vmtarget.vm import StateDir, VmManager
from iscsi_vmtarget.vm.faults import ENV
from iscsi_vmtarget.vm.format.header import Mode, Role, UnitHeader
from iscsi_vmtarget.vm.format.layout import initial_regions
from iscsi_vmtarget.vm.layers.view import GuestView, guest_segments
from iscsi_vmtarget.vm.operations import snapshot as snaps
from iscsi_vmtarget.vm.units.unit import naa_for

BLOCK = 512
HIDDEN_BYTE = 0xA5  # what every byte outside the guest disk holds in these tests
LBA_OOB = (0x5, 0x21, 0x00)
UNIT_UUID = uuid.UUID("0a1b2c3d-4e5f-4071-8293-a4b5c6d7e8f9")


def make_header(mode: Mode, disk: int, memory: int = 4 << 20) -> UnitHeader:
    regions, size = initial_regions(mode, Role.BASE, disk, memory)
    return UnitHeader(
        unit_uuid=UNIT_UUID,
        naa=naa_for(UNIT_UUID),
        role=Role.BASE,
        mode=mode,
        unit_size=size,
        regions=regions,
        name="t",
        owner_uuid=UNIT_UUID,
        generation=1,
    )


def flattened(unit: bytes, header: UnitHeader, guest: bytes) -> bytes:
    """What a raw view of a unit with a snapshot chain serves (the unit flattened
    now): ``unit``'s bytes, with the guest's disk ``guest`` where ``header``'s
    concealment mode places it."""
    out = bytearray(unit)
    for start, length, unit_off in guest_segments(header):
        out[unit_off : unit_off + length] = guest[start : start + length]
    return bytes(out)


def disjoint(spans: list[tuple[int, int]]) -> bool:
    """Whether (start, end) spans do not overlap."""
    ordered = sorted(spans)
    return all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(ordered))


def hidden_extents(header: UnitHeader) -> list[tuple[int, int]]:
    """(offset, length) of every unit range no guest LBA maps to."""
    mapped = sorted((unit_off, length) for _g, length, unit_off in guest_segments(header))
    out, cursor = [], 0
    for start, length in mapped:
        if start > cursor:
            out.append((cursor, start - cursor))
        cursor = start + length
    if cursor < header.unit_size:
        out.append((cursor, header.unit_size - cursor))
    return out


@dataclass
class ViewUnit:
    """A unit in memory: guest bytes zero, every hidden byte HIDDEN_BYTE."""

    header: UnitHeader
    raw: MemoryBackend
    view: GuestView
    hidden: list[tuple[int, int]]

    @classmethod
    def create(cls, mode: Mode, disk: int) -> ViewUnit:
        header = make_header(mode, disk)
        raw = MemoryBackend(header.unit_size)
        hidden = hidden_extents(header)
        for offset, length in hidden:
            raw.write(offset, bytes([HIDDEN_BYTE]) * length)
        return cls(header, raw, GuestView(raw, header), hidden)

    def hidden_intact(self) -> bool:
        return all(
            self.raw.read(offset, length).count(HIDDEN_BYTE) == length
            for offset, length in self.hidden
        )


def thin_options() -> dict[str, object]:
    """Thin provisioning (UNMAP, GET LBA STATUS) when this SCSI layer offers it."""
    if "thin_provisioning" in inspect.signature(LogicalUnit).parameters:
        return {"thin_provisioning": True}
    return {}


def make_nexus() -> Nexus:
    initiator = "iqn.2026-11.org.iscsi-vmtarget.test:vm"
    target = "iqn.2026-11.org.iscsi-vmtarget:vm.t"
    return Nexus(
        initiator_name=initiator,
        initiator_port=f"{initiator},i,0x000000000001",
        target_name=target,
        target_port=f"{target},t,0x0001",
        relative_port=1,
        transport_id=b"\x05" + bytes(3),
    )


def sense_triplet(response: ScsiResponse) -> tuple[int, int, int]:
    """(key, ASC, ASCQ) from fixed or descriptor sense data."""
    return parse_sense(response.sense)


@dataclass
class ScsiOnView:
    """A ScsiTarget with LUN 0 a LogicalUnit over a guest view."""

    unit: ViewUnit
    lu: LogicalUnit
    target: ScsiTarget
    nexus: Nexus

    @classmethod
    def create(cls, mode: Mode, disk: int) -> ScsiOnView:
        unit = ViewUnit.create(mode, disk)
        lu = LogicalUnit(
            unit.view,
            UnitIdentity_for(unit.header),
            block_size=BLOCK,
            **thin_options(),  # type: ignore[arg-type]
        )
        target = ScsiTarget({0: lu})
        nexus = make_nexus()
        target.nexus_added(nexus)
        harness = cls(unit, lu, target, nexus)
        harness.run(bytes(6))  # consume the power-on unit attention
        return harness

    def run(self, cdb: bytes, data: bytes | None = None) -> ScsiResponse:
        return self.target.execute(self.nexus, 0, cdb, None if data is None else memoryview(data))

    def good(self, cdb: bytes, data: bytes | None = None) -> bytes:
        response = self.run(cdb, data)
        assert response.status == Status.GOOD, sense_triplet(response)
        return bytes(response.data_in)


def UnitIdentity_for(header: UnitHeader):
    from iscsi_vmtarget.scsi import UnitIdentity

    return UnitIdentity(naa=header.naa, serial=header.unit_uuid.hex)


def cdb10(opcode: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", opcode, flags, lba & 0xFFFFFFFF, 0, blocks & 0xFFFF, 0)


def cdb12(opcode: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIIBB", opcode, flags, lba & 0xFFFFFFFF, blocks & 0xFFFFFFFF, 0, 0)


def cdb16(opcode: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(
        ">BBQIBB", opcode, flags, lba & 0xFFFFFFFFFFFFFFFF, blocks & 0xFFFFFFFF, 0, 0
    )


def cdb6(opcode: int, lba: int, blocks: int) -> bytes:
    return struct.pack(">BBHBB", opcode, (lba >> 16) & 0x1F, lba & 0xFFFF, blocks & 0xFF, 0)


def run_cli(state: Path, *args: str, crashpoint: str = "") -> subprocess.CompletedProcess[str]:
    """``iscsi-vmtarget ARGS --state-dir STATE`` in a subprocess, SIGKILLing itself at
    ``crashpoint`` if one is named (:mod:`iscsi_vmtarget.vm.faults`)."""
    return subprocess.run(
        [sys.executable, "-m", "iscsi_vmtarget", *args, "--state-dir", str(state)],
        env={**os.environ, ENV: crashpoint} if crashpoint else None,
        capture_output=True,
        text=True,
        timeout=120,  # a hang guard, not a timing
    )


def run_killed(state: Path, crashpoint: str, *args: str) -> subprocess.CompletedProcess[str]:
    """:func:`run_cli` that must die by its own SIGKILL at ``crashpoint``."""
    proc = run_cli(state, *args, crashpoint=crashpoint)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr)
    return proc


def snapshot_images(state: Path, vm: str, snap: str, luns: int = 2) -> list[bytes]:
    """The images of snapshot ``snap`` of VM ``vm``'s first ``luns`` LUNs, read with
    a manager of its own (while a server exports the VM too)."""
    with VmManager(StateDir.at(str(state))) as manager:
        out = []
        for lun in range(luns):
            backend = snaps.open_snapshot(manager, vm, snap, lun)
            try:
                out.append(bytes(backend.read(0, backend.size)))
            finally:
                backend.close()
        return out
