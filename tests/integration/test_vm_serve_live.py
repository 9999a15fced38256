"""A VM made while the daemon runs (``vm create``, ``vm clone --from-snapshot``;
``vm promote`` goes the same way) is served at once through the daemon's ``vm.serve``
action: SendTargets lists its target and its LUNs answer, without restarting
``serve``."""

from __future__ import annotations

from pathlib import Path

from iscsi_vmtarget.client.initiator import Initiator
from iscsi_vmtarget.server.admin import call_daemon
from iscsi_vmtarget.server.vm_luns import DEFAULT_BASE_IQN
from tests.conftest import INITIATOR, grant_vms, start_target
from tests.integration.test_snapshot_export_live import _send_targets
from tests.integration.test_snapshot_serve import _read, ivt

PATTERN = b"made-live-" * 51 + b"xx"  # one 512-byte block


def _session(port: int, vm: str) -> Initiator:
    ini = Initiator(port=port, initiator_name=INITIATOR, target_name=f"{DEFAULT_BASE_IQN}:vm.{vm}")
    ini.login()
    ini.command(bytes(6))  # the power-on unit attention
    return ini


def test_created_and_cloned_vms_are_served_at_once(tmp_path: Path) -> None:
    state = tmp_path / "state"
    grant_vms(state)
    target = start_target(tmp_path / "serve", "--state-dir", str(state))
    try:
        assert f"{DEFAULT_BASE_IQN}:vm.fresh" not in _send_targets(target.port)
        out = ivt(state, "vm", "create", "fresh", "--disk", "16M", "--memory", "4M")
        assert f"served by the running daemon as {DEFAULT_BASE_IQN}:vm.fresh" in out
        assert f"{DEFAULT_BASE_IQN}:vm.fresh" in _send_targets(target.port)
        ini = _session(target.port, "fresh")
        assert _read(ini, 7) == bytes(512)
        write = bytes([0x2A, 0x08]) + (7).to_bytes(4, "big") + b"\x00\x00\x01\x00"  # FUA
        assert ini.command(write, data_out=PATTERN).status == 0
        assert _read(ini, 7) == PATTERN
        ini.logout()
        ini.close()
        # asking again changes nothing: the daemon serves it already
        again = call_daemon(str(state), "vm.serve", {"name": "fresh"}, timeout=60)
        assert again["was_served"] is True

        ivt(state, "vm", "snapshot", "fresh", "s1")  # through the daemon (it serves fresh)
        out = ivt(state, "vm", "clone", "fresh", "copy", "--from-snapshot", "s1")
        assert f"served by the running daemon as {DEFAULT_BASE_IQN}:vm.copy" in out
        copy = _session(target.port, "copy")
        assert _read(copy, 7) == PATTERN  # the clone's own LUN, with the source's bytes
        copy.logout()
        copy.close()
    finally:
        target.stop()
