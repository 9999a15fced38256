"""``vm snapshot export`` while the daemon runs takes effect at once: the snapshot's
read-only target appears in SendTargets, its LUNs read the snapshot's bytes, report
the snapshot's own designator and serial (VPD 0x83/0x80, not the live volume's: the
two may be seen side by side) and refuse writes with DATA PROTECT / WRITE PROTECTED
(SBC-3 §4.12); ``--stop`` removes it and logs its sessions out, as ``target delete``
does; the export is kept for later starts of ``serve``."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from iscsi_vmtarget.client.initiator import Initiator, InitiatorError, LoginFailed
from iscsi_vmtarget.server.vm_luns import DEFAULT_BASE_IQN
from iscsi_vmtarget.vm import StateDir, VmManager
from iscsi_vmtarget.vm.operations import snapshot as snaps
from tests.conftest import INITIATOR, grant_vms, start_target
from tests.integration.test_snapshot_serve import _identity, _iscsi_inq, _login, _read, ivt

MIB = 1 << 20
VM = "exported"
IQN = f"{DEFAULT_BASE_IQN}:vm.{VM}"
SNAP_IQN = f"{IQN}.snap.s1"
ONE, TWO = b"ONE-" * 128, b"TWO-" * 128


def _send_targets(port: int) -> list[str]:
    with contextlib.closing(Initiator(port=port, initiator_name=INITIATOR)) as discovery:
        discovery.login()
        names = [v for k, v in discovery.send_targets("All") if k == "TargetName"]
        discovery.logout()
    return names


def _setup(state: Path) -> None:
    """ONE at LBA 5 of both LUNs in snapshot s1, TWO there on the live disks."""
    with VmManager(StateDir.at(str(state))) as manager:
        manager.create(VM, disk=16 * MIB, memory=4 * MIB, secondaries=(8 * MIB,))
        for data, then in ((ONE, "s1"), (TWO, "")):
            for lun in (0, 1):
                backend = snaps.open_live(manager, manager.find(VM), lun)
                backend.write(5 * 512, data)
                backend.flush()
                backend.close()
            if then:
                snaps.create_snapshot(manager, VM, then)


def test_live_snapshot_export_and_stop(tmp_path: Path) -> None:
    state = tmp_path / "state"
    _setup(state)
    grant_vms(state)
    target = start_target(tmp_path / "serve", "--state-dir", str(state))
    try:
        assert SNAP_IQN not in _send_targets(target.port)
        live = _login(target.port, IQN)
        originals = [_identity(live, lun) for lun in (0, 1)]
        out = ivt(state, "vm", "snapshot", "export", VM, "s1")
        assert f"exported read-only as {SNAP_IQN}" in out and "at once" in out
        assert SNAP_IQN in _send_targets(target.port)
        ini = _login(target.port, SNAP_IQN)
        for lun in (0, 1):
            assert _read(ini, 5, lun) == ONE  # the snapshot's bytes
            assert _read(live, 5, lun) == TWO  # the live disk is untouched
            own = _identity(ini, lun)
            assert own[0] != originals[lun][0] and own[1] != originals[lun][1]
            write = bytes([0x2A, 0]) + (5).to_bytes(4, "big") + b"\x00\x00\x01\x00"
            result = ini.command(write, lun=lun, data_out=TWO)
            assert (result.status, result.sense_key, result.asc_ascq) == (2, 7, (0x27, 0))
        inq = _iscsi_inq(f"iscsi://127.0.0.1:{target.port}/{SNAP_IQN}/0")
        # as libiscsi sees it too: not the live volume's identity
        assert inq != _iscsi_inq(f"iscsi://127.0.0.1:{target.port}/{IQN}/0")
        out = ivt(state, "vm", "snapshot", "export", VM, "s1", "--stop")
        assert "no longer exported" in out and "at once" in out
        with pytest.raises((InitiatorError, OSError)):  # its session was logged out
            ini.nop(b"gone?")
        ini.close()
        assert SNAP_IQN not in _send_targets(target.port)
        with pytest.raises(LoginFailed) as refused:
            _login(target.port, SNAP_IQN)
        assert (refused.value.status_class, refused.value.status_detail) == (2, 3)  # not found
        assert _read(live, 5) == TWO and live.nop(b"still") == b"still"  # undisturbed
        live.logout()
        live.close()
        ivt(state, "vm", "snapshot", "export", VM, "s1")  # once more, for the restart
    finally:
        target.stop()
    grant_vms(state)
    target = start_target(tmp_path / "again", "--state-dir", str(state))
    try:
        assert SNAP_IQN in target.targets  # kept for every later start
        ini = _login(target.port, SNAP_IQN)
        assert _read(ini, 5, 1) == ONE
        ini.logout()
        ini.close()
    finally:
        target.stop()
