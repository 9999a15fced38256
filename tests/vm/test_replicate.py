"""Replication rounds and promote on the storage layer (the destination LUN is a local
file here; tests/integration/test_replicate_serve.py does the same over iSCSI): what a round
sends, that a destination interrupted anywhere in a round (kill -9 at every crash point)
still promotes to a checkpoint exactly, and that promote checks what it reads."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from iscsi_vmtarget.storage import FileBackend
from iscsi_vmtarget.vm import KeyFileError, StateDir, VmError, VmManager
from iscsi_vmtarget.vm.faults import ENV
from iscsi_vmtarget.vm.format import sealed
from iscsi_vmtarget.vm.format.header import Mode
from iscsi_vmtarget.vm.layers.cow import GRAIN
from iscsi_vmtarget.vm.operations import replicate as replicate_mod
from iscsi_vmtarget.vm.operations import snapshot as snaps
from iscsi_vmtarget.vm.operations.replica import SB_OFFSETS, Superblock
from iscsi_vmtarget.vm.operations.replicate import (
    OfflineCheckpointer,
    changed_grains,
    replicate_round,
)
from tests.vm.replica_site import MIB, URL, Site, superblock

STATE_ONE = bytes(range(256)) * 400
STATE_TWO = b"two!" * 30000


def test_first_round_sends_everything_then_only_changes(site: Site) -> None:
    site.write(0, b"A" * 70000)
    site.write(1 * MIB, b"B" * 512, lun=1)
    site.src.write_state("vm1", io.BytesIO(STATE_ONE), len(STATE_ONE))
    first = site.round()
    assert first.full and first.seq == 1 and first.sealed == ["state", "config"]
    assert first.payload >= 70000 + 512
    site.write(4 * MIB, b"C" * 512)
    second = site.round()
    assert not second.full and second.grains == 1 and second.sealed == []
    assert second.payload < first.payload
    assert second.deleted == [first.checkpoint]  # the older checkpoint merged away
    third = site.round()
    assert third.grains == 0 and third.payload == 0
    names = [s.name for s in snaps.list_snapshots(site.src, "vm1")]
    assert names == [third.checkpoint]
    expected = site.images(site.src)
    report = site.promote()
    assert report.seq == 3 and not report.already
    assert site.images(site.dst) == expected
    assert b"".join(site.dst.read_state("vm1")) == STATE_ONE
    assert site.dst.config("vm1") == site.src.config("vm1")


def test_promoted_vm_keeps_the_source_identities(site: Site) -> None:
    site.round()
    site.promote()
    src, dst = site.src.find("vm1"), site.dst.find("vm1")
    assert [u.header.naa for u in dst.units] == [u.header.naa for u in src.units]
    assert [u.header.unit_uuid for u in dst.units] == [u.header.unit_uuid for u in src.units]
    assert dst.base.header.wrapped_key != src.base.header.wrapped_key  # sealed anew here
    assert [v.name for v in site.dst.discover(repair=False).vms] == ["vm1"]


@pytest.mark.parametrize("mode", [Mode.OFFSET, Mode.ALIGNED])
def test_promote_in_the_other_concealment_modes(tmp_path: Path, mode: Mode) -> None:
    site = Site(tmp_path, mode)
    try:
        site.write(0, b"head" * 128)  # the guest's LBA 0: its partition table in aligned
        site.write(6 * MIB - 512, b"tail" * 128)
        site.write(MIB, b"two!" * 128, lun=1)
        site.round()
        expected = site.images(site.src)
        site.promote()
        vm = site.dst.find("vm1")
        assert vm.base.header.mode is mode and site.images(site.dst) == expected
    finally:
        site.close()


def test_state_sent_only_when_it_changed(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unchanged region generations skip even the decryption that compares plaintexts;
    without them (no record of the last round here) the plaintexts are compared."""
    compared: list[object] = []
    real = replicate_mod._same_plaintext
    monkeypatch.setattr(
        replicate_mod, "_same_plaintext", lambda *a: compared.append(a[-1]) or real(*a)
    )
    site.src.write_state("vm1", io.BytesIO(STATE_ONE), len(STATE_ONE))
    site.round()
    assert site.round().sealed == [] and compared == []
    os.unlink(site.root / "src" / "conf" / "replication" / "vm1.json")
    assert site.round().sealed == [] and len(compared) == 2  # state and config compared
    site.src.write_state("vm1", io.BytesIO(STATE_TWO), len(STATE_TWO))
    assert site.round().sealed == ["state"]
    site.promote()
    assert b"".join(site.dst.read_state("vm1")) == STATE_TWO


def test_changes_across_a_revert_are_found(site: Site) -> None:
    """After a revert the checkpoints share only an older ancestor: the grains changed
    on either branch are sent, so the replica equals the reverted image."""
    site.write(0, b"1" * GRAIN)
    snaps.create_snapshot(site.src, "vm1", "user")
    site.write(GRAIN, b"2" * GRAIN)
    site.round()  # the replica has grains 0 and 1
    snaps.revert(site.src, "vm1", "user")  # grain 1 back to zeros
    site.write(2 * GRAIN, b"3" * GRAIN)
    report = site.round()
    assert not report.full and report.grains == 2  # grain 1 (old branch) and grain 2
    expected = site.images(site.src)
    site.promote()
    assert site.images(site.dst) == expected


def test_changed_grains_is_none_without_a_previous_checkpoint(site: Site) -> None:
    snaps.create_snapshot(site.src, "vm1", "s")
    vm = site.src.find("vm1")
    record = snaps.find_snapshot(site.src, vm, site.src.keyring(), "s")
    layer = dict(record.header.tops)[vm.base.header.naa]
    assert changed_grains(site.src, vm, layer, None) is None
    assert changed_grains(site.src, vm, layer, layer) == []


def test_destination_too_small_is_refused_before_any_checkpoint(site: Site) -> None:
    os.truncate(site.replica, 8 * MIB)
    with pytest.raises(VmError, match=r"needs \d+ bytes .*vm receive vm1 --size"):
        site.round()
    assert snaps.list_snapshots(site.src, "vm1") == []


def test_a_replica_of_another_vm_is_refused(site: Site) -> None:
    site.round()
    other = VmManager(StateDir.at(str(site.root / "other")))
    other.create("vm1", disk=6 * MIB, memory=4 * MIB, secondaries=(3 * MIB,))
    disk = FileBackend(str(site.replica))
    try:
        with pytest.raises(VmError, match=r"holds a replica of VM 'vm1' .*not of this VM"):
            replicate_round(other, "vm1", disk, OfflineCheckpointer(other, "vm1"), url=URL)
    finally:
        disk.close()
        other.close()


#: what is flipped -> (where, in a replica after one round; what promote says)
TAMPERED: dict[str, tuple[Callable[[Superblock], int], str]] = {
    "grain": (lambda sb: sb.volumes[0].image + 100, "grain 0 of the replica does not match"),
    "grain hash": (lambda sb: sb.volumes[1].hashes + 5, "LUN 1: grain 0 of the replica"),
    "state chunk": (
        lambda sb: sb.state.offset + sealed.table_bytes(sb.state.length) + 7,
        "state region of the replica: chunk 0 failed authentication",
    ),
    "superblock": (lambda sb: SB_OFFSETS[sb.generation % 2] + 40, "superblock is damaged"),
}


@pytest.mark.parametrize("what", sorted(TAMPERED))
def test_promote_refuses_a_tampered_replica_and_leaves_nothing(site: Site, what: str) -> None:
    site.write(0, b"A" * GRAIN)
    site.src.write_state("vm1", io.BytesIO(STATE_ONE), len(STATE_ONE))
    site.round()
    where, message = TAMPERED[what]
    with open(site.replica, "r+b") as fh:
        fh.seek(where(superblock(site)))
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 1]))
    with pytest.raises(VmError, match=message):
        site.promote()
    assert site.dst.discover(repair=False).vms == []


def test_promote_without_the_source_key_says_so(site: Site) -> None:
    site.src.write_state("vm1", io.BytesIO(STATE_ONE), len(STATE_ONE))
    site.round()
    with pytest.raises(KeyFileError, match=r"sealed by the source's master key .* --source-key"):
        site.promote(source_key=False)
    assert site.dst.discover(repair=False).vms == []


def test_promote_of_an_empty_replica_is_refused(site: Site) -> None:
    with pytest.raises(VmError, match="holds no replica"):
        site.promote()


# -- kill -9 in the middle of a round ------------------------------------------------------

_ROUND = """
import sys
from iscsi_vmtarget.storage import FileBackend
from iscsi_vmtarget.vm import StateDir, VmManager
from iscsi_vmtarget.vm.operations.replicate import OfflineCheckpointer, replicate_round
with VmManager(StateDir.at(sys.argv[1])) as m:
    disk = FileBackend(sys.argv[2])
    replicate_round(m, "vm1", disk, OfflineCheckpointer(m, "vm1"), url=sys.argv[3])
"""

#: crash point -> the checkpoint promote must yield (1: the previous, 2: the new one)
CRASHES = {
    "replicate.checkpoint": 1,  # checkpoint taken, nothing sent
    "replica.staging": 1,  # part of the journal staged
    "replicate.staged": 1,  # journal staged and flushed, no commit record
    "replica.torn": 1,  # the commit record's slot torn
    "replicate.committed": 2,  # committed, nothing applied
    "replicate.applying": 2,  # part of the journal applied
}


@pytest.mark.parametrize("crashpoint", sorted(CRASHES))
def test_killed_round_promotes_to_a_checkpoint_exactly(site: Site, crashpoint: str) -> None:
    site.write(0, b"A" * 3 * GRAIN)
    site.write(GRAIN, b"a" * 512, lun=1)
    site.src.write_state("vm1", io.BytesIO(STATE_ONE), len(STATE_ONE))
    site.round()
    one = site.images(site.src)
    site.write(GRAIN, b"B" * 2 * GRAIN)  # overwrites grains the replica holds
    site.write(5 * MIB, b"C" * 4096)
    site.write(0, bytes(GRAIN), lun=1)  # a grain back to zeros
    site.src.write_state("vm1", io.BytesIO(STATE_TWO), len(STATE_TWO))
    two = site.images(site.src)
    proc = subprocess.run(
        [sys.executable, "-c", _ROUND, str(site.root / "src"), str(site.replica), URL],
        env={**os.environ, ENV: crashpoint},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    report = site.promote()
    want = CRASHES[crashpoint]
    assert report.seq == want
    if want == 2:
        assert "replayed" in report.journal
    elif crashpoint != "replicate.checkpoint":
        assert "discarded" in report.journal
    assert site.images(site.dst) == (one if want == 1 else two)
    state = b"".join(site.dst.read_state("vm1"))
    assert state == (STATE_ONE if want == 1 else STATE_TWO)


def test_the_next_round_finishes_an_interrupted_one(site: Site) -> None:
    site.write(0, b"A" * GRAIN)
    site.round()
    site.write(GRAIN, b"B" * GRAIN)
    proc = subprocess.run(
        [sys.executable, "-c", _ROUND, str(site.root / "src"), str(site.replica), URL],
        env={**os.environ, ENV: "replicate.committed"},
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL
    site.write(2 * GRAIN, b"C" * GRAIN)
    report = site.round()
    assert report.replayed > 0 and report.seq == 3
    expected = site.images(site.src)
    assert len(snaps.list_snapshots(site.src, "vm1")) == 1
    site.promote()
    assert site.images(site.dst) == expected
