"""``vm clone`` and ``vm unlink`` of VMs the real server exports, initiators writing all
along (issue 13: live operations must not refuse a running VM).

``vm clone web web2`` of a served VM: the daemon snapshots web (its LUNs quiesced, as
``vm snapshot`` does), makes web2 a linked clone of that snapshot and serves it at
once. web keeps serving with its VPD 0x83/0x80 unchanged, web2 has identities of its
own and reads web as it was at the snapshot. Then ``vm unlink web2`` while both serve
and both are written: web2 copies what it shares into its own units; afterwards the
snapshot it came from can be deleted and web itself too, web2 keeps its data. kill -9
of the daemon at each step of a live clone or unlink, then a restart: a valid state
(the clone whole or absent, no leftovers), every acknowledged write on web readable.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import pytest

from iscsi_vmtarget.client.initiator import Initiator
from iscsi_vmtarget.server.vm_luns import vm_target_name
from iscsi_vmtarget.vm import StateDir, VmManager
from iscsi_vmtarget.vm.faults import ENV
from iscsi_vmtarget.vm.operations import snapshot as snaps
from iscsi_vmtarget.vm.operations.clone import clone
from tests.conftest import INITIATOR, start_target
from tests.integration.test_snapshot_serve import _identity
from tests.integration.test_vm_move_live import (
    DURING_PAUSE,
    MIB,
    WRITER,
    Writer,
    _start,
    grant,
    ivt,
    run_paused,
)
from tests.vm.helpers import snapshot_images

SRC, DST = "web", "web2"
SIZES = (8 * MIB, 4 * MIB)  # LUN 0, LUN 1
BEFORE = b"written before the clone " * 20  # at 1 MiB of each LUN


def _setup(state: Path) -> None:
    with VmManager(StateDir.at(str(state))) as manager:
        manager.create(SRC, disk=SIZES[0], memory=4 * MIB, secondaries=(SIZES[1],))
        for lun in (0, 1):
            backend = snaps.open_live(manager, manager.find(SRC), lun)
            backend.write(MIB, BEFORE)
            backend.flush()
            backend.close()


def _session(port: int, vm: str) -> Initiator:
    ini = Initiator(port=port, initiator_name=INITIATOR, target_name=vm_target_name(vm))
    ini.login()
    for lun in (0, 1):
        ini.command(bytes(6), lun=lun)  # the power-on unit attention
    return ini


def _image(ini: Initiator, lun: int) -> bytes:
    """The whole LUN, read through the session."""
    blocks, size = ini.read_capacity16(lun)
    step = 128  # 64 KiB a command
    return b"".join(
        ini.read16(lba, min(step, blocks - lba), size, lun) for lba in range(0, blocks, step)
    )


def _snapshot_images(state: Path, snap: str) -> list[bytes]:
    return snapshot_images(state, SRC, snap)


def _with_writes(images: list[bytes], writer: Writer) -> list[bytes]:
    """``images`` with every write ``writer`` had acknowledged."""
    out = [bytearray(image) for image in images]
    for (lun, lba), block in writer.acked.items():
        out[lun][lba * 512 : lba * 512 + 512] = block
    return [bytes(image) for image in out]


def _writing(port: int, vm: str) -> tuple[Writer, threading.Thread]:
    writer = Writer(port, iqn=vm_target_name(vm), sizes=SIZES)
    thread = threading.Thread(target=writer.run, daemon=True)
    thread.start()
    writer.wait_for(20)
    return writer, thread


def _stop(writer: Writer, thread: threading.Thread) -> None:
    writer.stop.set()
    thread.join(timeout=300)
    assert not writer.errors and writer.died is None, (writer.errors, writer.died)


def test_live_clone_then_unlink_while_both_serve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    _setup(state)
    target = _start(tmp_path, state, monkeypatch, "unlink.copying", vm_target_name(SRC))
    try:
        watcher = _session(target.port, SRC)
        before = [_identity(watcher, lun) for lun in (0, 1)]
        writer, thread = _writing(target.port, SRC)

        acked = dict(writer.acked)  # acknowledged before the clone was asked for
        proc = ivt(state, "vm", "clone", SRC, DST, "--progress")
        assert "snapshot clone-web2 of web taken" in proc.stdout, proc.stdout
        assert f"served by the running daemon as {vm_target_name(DST)}" in proc.stdout
        writer.wait_for(writer.count + 50)  # web went on serving
        again = ivt(state, "vm", "clone", SRC, DST, check=False)
        assert again.returncode == 1 and "a VM named 'web2' already exists" in again.stderr
        grant(state, vm_target_name(DST), WRITER, INITIATOR)
        kid = _session(target.port, DST)
        assert [_identity(watcher, lun) for lun in (0, 1)] == before  # web's VPD 0x83/0x80
        mine = [_identity(kid, lun) for lun in (0, 1)]
        assert not {n for n, _s in mine} & {n for n, _s in before}  # designators of its own
        snapped = _snapshot_images(state, "clone-web2")
        assert [_image(kid, lun) for lun in (0, 1)] == snapped  # web at the snapshot
        for (lun, lba), block in acked.items():
            assert snapped[lun][lba * 512 : lba * 512 + 512] == block
        assert snapped[1][MIB : MIB + len(BEFORE)] == BEFORE

        # unlink web2 while both are written (the copy pauses while web2's writer writes)
        writer2, thread2 = _writing(target.port, DST)
        unlink = ("vm", "unlink", DST, "--progress", "--state-dir", str(state))
        out, err = run_paused(tmp_path, writer2, "unlink.copying", *unlink).communicate()
        assert "VM web2 is independent" in out and "] 100%" in err, (out, err)
        writer2.wait_for(writer2.count + 50)
        ivt(state, "vm", "snapshot", "delete", SRC, "clone-web2")  # by the daemon
        writer2.wait_for(writer2.count + 50)
        _stop(writer2, thread2)
        _stop(writer, thread)
        assert len(writer2.acked) > DURING_PAUSE // 2
        expected = _with_writes(snapped, writer2)
        assert [_image(kid, lun) for lun in (0, 1)] == expected
        assert [_identity(kid, lun) for lun in (0, 1)] == mine
        writer.holds({k: _block(watcher, *k) for k in writer.acked})
        assert [_identity(watcher, lun) for lun in (0, 1)] == before
        for ini in (kid, watcher):
            ini.logout()
            ini.close()
    finally:
        target.stop()
    ivt(state, "vm", "delete", SRC)  # refused while web2 rested on it
    with VmManager(StateDir.at(str(state))) as manager:
        assert SRC not in [v.name for v in manager.discover().vms]
        for lun in (0, 1):
            backend = snaps.open_live(manager, manager.find(DST), lun)
            try:
                assert backend.read(0, backend.size) == expected[lun]
            finally:
                backend.close()


def _block(ini: Initiator, lun: int, lba: int) -> bytes:
    return ini.read16(lba, 1, 512, lun)


def _holds(port: int, writer: Writer) -> None:
    """Every write ``writer`` had acknowledged on web reads back."""
    ini = _session(port, SRC)
    writer.holds({k: _block(ini, *k) for k in writer.acked})
    ini.logout()
    ini.close()


def _kill_at(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, state: Path, point: str, *args: str
) -> Writer:
    """Start the daemon armed to die at ``point``, run ``iscsi-vmtarget ARGS`` while a
    writer writes web; returns the writer once the daemon died."""
    target = _start(tmp_path, state, monkeypatch, iqn=vm_target_name(SRC), **{ENV: point})
    try:
        writer, thread = _writing(target.port, SRC)
        proc = ivt(state, *args, check=False)
        assert proc.returncode != 0 and "closed" in proc.stderr, proc.stderr
        assert target.proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        target.stop()
    thread.join(timeout=300)
    assert not writer.errors, writer.errors  # it died with the daemon, never an error
    return writer


@pytest.mark.parametrize(
    ("point", "made"),
    [
        ("snapshot.committed", False),  # web's snapshot taken, the clone not begun
        ("clone.copied", False),
        ("clone.committed", True),  # renamed: the clone stays, its snapshot too
    ],
)
def test_kill_during_live_clone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str, made: bool
) -> None:
    state = tmp_path / "state"
    _setup(state)
    writer = _kill_at(tmp_path, monkeypatch, state, point, "vm", "clone", SRC, DST)
    again = start_target(tmp_path / "again", "--state-dir", str(state))  # repairs first
    try:
        _holds(again.port, writer)
        names = sorted(again.targets)
        assert (vm_target_name(DST) in names) is made, names
        if made:
            grant(state, vm_target_name(DST), INITIATOR)
            kid = _session(again.port, DST)
            assert [_image(kid, lun) for lun in (0, 1)] == _snapshot_images(state, "clone-web2")
            kid.logout()
            kid.close()
    finally:
        again.stop()
    with VmManager(StateDir.at(str(state))) as manager:
        found = manager.discover()
        names = [vm.name for vm in found.vms if vm.name != "demo"]
        assert names == ([SRC, DST] if made else [SRC])  # no temporary c-... VM
        assert not found.damaged and not found.orphans
        taken = [info.name for info in snaps.list_snapshots(manager, SRC)]
        assert taken == (["clone-web2"] if made else [])


def test_kill_after_live_unlink_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kill -9 of the daemon right after a live unlink committed its first LUN (held
    meanwhile): restarted, the clone reads what it did, and unlink finishes."""
    state = tmp_path / "state"
    _setup(state)
    with VmManager(StateDir.at(str(state))) as manager:
        assert clone(manager, SRC, DST, full=False) == "clone-web2"
    image = _snapshot_images(state, "clone-web2")
    writer = _kill_at(tmp_path, monkeypatch, state, "unlink.committed", "vm", "unlink", DST)
    again = start_target(tmp_path / "again", "--state-dir", str(state))
    try:
        _holds(again.port, writer)
        grant(state, vm_target_name(DST), INITIATOR)
        kid = _session(again.port, DST)
        assert [_image(kid, lun) for lun in (0, 1)] == image
        # LUN 0 was unlinked when the daemon died, LUN 1 not yet: running it again
        # finishes (live, both LUNs still reading the same bytes), then it is done
        assert "is independent (unlinked live" in ivt(state, "vm", "unlink", DST).stdout
        assert [_image(kid, lun) for lun in (0, 1)] == image
        assert "(it already was)" in ivt(state, "vm", "unlink", DST).stdout
        kid.logout()
        kid.close()
    finally:
        again.stop()
