"""EXTENDED COPY resolves target descriptors only among the LUNs the requesting
initiator can see (SPC-4 §6.4; :mod:`iscsi_vmtarget.scsi.xcopy`), over the wire:

* two units on one target, initiator A mapped to unit X only: a copy from A naming
  unit Y's NAA designator, in either direction, ends in COPY ABORTED, UNREACHABLE COPY
  TARGET (0Ah/08h/04h) and no byte of X or Y changes; the same copy from an initiator
  that sees both works (so the designator was right), and A's copy within X works;
* a served VM reverted to a snapshot, whose guest view answers with the original
  volume's designator: a copy naming that designator works inside the disk, a copy
  reaching past the disk is COPY TARGET DEVICE NOT REACHABLE (0Ah/0Dh/02h), a copy
  naming another VM's designator is UNREACHABLE; the other VM's disk and this VM's
  encrypted state are untouched.
"""

from __future__ import annotations

import hashlib
import io
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from iscsi_vmtarget.client import Initiator
from iscsi_vmtarget.client.initiator import ScsiResult
from iscsi_vmtarget.server.admin import call_daemon
from iscsi_vmtarget.server.vm_luns import DEFAULT_BASE_IQN
from iscsi_vmtarget.vm import StateDir, VmManager
from tests.conftest import RunningTarget, grant_vms, start_target, start_with_config
from tests.scsi.test_scsi_xcopy import parameters, segment, xcopy

T = "iqn.2026-11.org.iscsi-vmtarget:xcopy"
A = "iqn.2026-11.org.example:only-x"
BOTH = "iqn.2026-11.org.example:backup-host"
BLOCK = 512
BLOCKS = 2048  # 1 MiB units
VM_BLOCKS = 4096  # 2 MiB VM disks (the smallest a VM may have)
UNREACHABLE = (0xA, 0x08, 0x04)
NOT_REACHABLE = (0xA, 0x0D, 0x02)
CONFIG = """
[[target]]
name = "{t}"
[[target.lun]]
number = 0
path = "{d}/x.img"
size = "1M"
[[target.lun]]
number = 1
path = "{d}/y.img"
size = "1M"
[[target.acl]]
initiator = "{a}"
luns = [0]
[[target.acl]]
initiator = "{both}"
luns = [0, 1]
"""


def naa_descriptor(naa: bytes) -> bytes:
    """Identification descriptor target descriptor (SPC-4 §6.4.5.2) naming ``naa``."""
    designator = struct.pack(">BBBB", 0x01, 0x03, 0, len(naa)) + naa  # binary, LU, NAA
    designator += bytes(24 - len(designator))
    return struct.pack(">BBH", 0xE4, 0, 0) + designator + struct.pack(">B3s", 0, b"\0\2\0")


def designator(ini: Initiator, lun: int) -> bytes:
    """The NAA designator of VPD 0x83 (SPC-4 §7.8.6), as an initiator reads it."""
    page = bytes(ini.command(bytes([0x12, 1, 0x83, 2, 0, 0]), lun=lun, read_length=512).data)
    found = re.search(rb"\x01\x03\x00\x10(.{16})", page, re.S)
    assert found, page
    return found.group(1)


def copy(ini: Initiator, naas: list[bytes], seg: bytes, lun: int = 0) -> ScsiResult:
    data = parameters([naa_descriptor(n) for n in naas], [seg], usage=0b11, list_id=0)
    return ini.command(xcopy(data), lun=lun, data_out=data)


def sense(result: ScsiResult) -> tuple[int, int, int]:
    assert result.status == 2, result
    return (result.sense_key, *result.asc_ascq)


def read_all(ini: Initiator, lun: int, blocks: int = BLOCKS) -> bytes:
    cdb = bytes([0x28, 0, 0, 0, 0, 0, 0]) + blocks.to_bytes(2, "big") + b"\0"
    result = ini.command(cdb, lun=lun, read_length=blocks * BLOCK)
    assert result.status == 0, result
    return bytes(result.data)


def write(ini: Initiator, lun: int, lba: int, data: bytes) -> None:
    blocks = len(data) // BLOCK
    cdb = bytes([0x2A, 0]) + lba.to_bytes(4, "big") + b"\0" + blocks.to_bytes(2, "big") + b"\0"
    assert ini.command(cdb, lun=lun, data_out=data).status == 0


def login(port: int, name: str, target: str, luns: tuple[int, ...]) -> Initiator:
    ini = Initiator(port=port, initiator_name=name, target_name=target)
    ini.login()
    for lun in luns:
        ini.command(bytes(6), lun=lun)  # the power-on unit attention
    return ini


def pattern(tag: bytes, blocks: int) -> bytes:
    return b"".join(hashlib.sha256(tag + i.to_bytes(4, "big")).digest() * 16 for i in range(blocks))


@pytest.fixture
def units(tmp_path: Path) -> Iterator[RunningTarget]:
    t = start_with_config(tmp_path, CONFIG.format(t=T, a=A, both=BOTH, d=tmp_path))
    yield t
    t.stop()


def test_a_copy_reaches_only_the_initiators_own_luns(units: RunningTarget) -> None:
    both = login(units.port, BOTH, T, (0, 1))
    a = login(units.port, A, T, (0,))
    x_naa, y_naa = designator(both, 0), designator(both, 1)
    assert designator(a, 0) == x_naa
    write(both, 0, 0, pattern(b"X", 16))
    write(both, 1, 0, pattern(b"Y", 16))
    x_before, y_before = read_all(both, 0), read_all(both, 1)

    attacks = [
        ([y_naa, x_naa], segment(0, 1, 8, 0, 100)),  # read Y into X
        ([x_naa, y_naa], segment(0, 1, 8, 0, 100)),  # write X over Y
        ([y_naa], segment(0, 0, 8, 0, 100)),  # move within Y
        ([x_naa, y_naa], segment(1, 0, 8, 0, 100)),  # Y is the source, second descriptor
    ]
    for naas, seg in attacks:
        assert sense(copy(a, naas, seg)) == UNREACHABLE
    assert read_all(both, 0) == x_before and read_all(both, 1) == y_before  # no byte moved

    # the designators were right: the initiator that sees both copies Y into X
    assert copy(both, [y_naa, x_naa], segment(0, 1, 8, 0, 100)).status == 0
    assert read_all(both, 0)[100 * BLOCK : 108 * BLOCK] == y_before[: 8 * BLOCK]
    # and A's copy within its own view works
    assert copy(a, [x_naa], segment(0, 0, 4, 0, 200)).status == 0
    assert read_all(a, 0)[200 * BLOCK : 204 * BLOCK] == x_before[: 4 * BLOCK]
    assert read_all(both, 1) == y_before
    a.logout()
    both.logout()


def test_a_reverted_guest_view_copies_only_within_its_disk(tmp_path: Path) -> None:
    state = tmp_path / "state"
    memory = pattern(b"state", 600)  # several sealed chunks of hidden state
    with VmManager(StateDir.at(str(state))) as manager:
        for name in ("vm1", "vm2"):
            manager.create(name, disk=VM_BLOCKS * BLOCK, memory=1 << 20)
        manager.write_state("vm1", io.BytesIO(memory), len(memory))
    grant_vms(state, A)
    t = start_target(tmp_path / "run", "--state-dir", str(state))
    try:
        vm1 = login(t.port, A, f"{DEFAULT_BASE_IQN}:vm.vm1", (0,))
        vm2 = login(t.port, A, f"{DEFAULT_BASE_IQN}:vm.vm2", (0,))
        original = designator(vm1, 0)
        write(vm1, 0, 0, pattern(b"one", 8))
        call_daemon(str(state), "vm.snapshot", {"name": "vm1", "snapshot": "s1"})
        write(vm1, 0, 0, pattern(b"two", 8))
        call_daemon(str(state), "vm.revert", {"name": "vm1", "snapshot": "s1"})
        vm1.command(bytes(6))  # the unit attention the revert raised, if any
        assert designator(vm1, 0) == original  # the guest runs on s1 and does not notice
        disk2, vm2_naa = read_all(vm2, 0, VM_BLOCKS), designator(vm2, 0)
        assert read_all(vm1, 0, 8) == pattern(b"one", 8)

        assert copy(vm1, [original], segment(0, 0, 8, 0, 1000)).status == 0
        assert read_all(vm1, 0, 1008)[1000 * BLOCK :] == pattern(b"one", 8)
        for seg in (
            segment(0, 0, 1, VM_BLOCKS, 0),  # the first block past the disk
            segment(0, 0, 2, VM_BLOCKS - 1, 0),  # straddling the end
            segment(0, 0, 1, 0, VM_BLOCKS),  # writing past the disk
            segment(0, 0, 1, 2**63, 0),
        ):
            assert sense(copy(vm1, [original], seg)) == NOT_REACHABLE
        for naas, seg in (
            ([vm2_naa, original], segment(0, 1, 8, 0, 0)),
            ([original, vm2_naa], segment(0, 1, 8, 0, 0)),
        ):
            assert sense(copy(vm1, naas, seg)) == UNREACHABLE
        assert read_all(vm2, 0, VM_BLOCKS) == disk2
        vm1.logout()
        vm2.logout()
    finally:
        t.stop()
    with VmManager(StateDir.at(str(state))) as manager:
        assert b"".join(manager.read_state("vm1")) == memory  # decrypts, authenticated
