"""One owner per unit: the state-directory lock of ``serve`` and the on-disk unit
leases of device pools (README "Ownership and leases")."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from iscsi_vmtarget.cli.main import main
from iscsi_vmtarget.client.initiator import Initiator, InitiatorError, LoginFailed
from iscsi_vmtarget.server.admin import AdminServer, Manager
from iscsi_vmtarget.server.persist import ConfigStore
from iscsi_vmtarget.server.vm_luns import DEFAULT_BASE_IQN
from iscsi_vmtarget.vm import StateDir, VmManager
from iscsi_vmtarget.vm.units.device_lease import DirectBlockIO, lease_offset
from iscsi_vmtarget.vm.units.device_pool import DevicePool
from iscsi_vmtarget.vm.units.lease import LeaseRecord, decode_record
from iscsi_vmtarget.vm.units.unit_pools import UnitRef
from tests.conftest import INITIATOR, RunningTarget, grant_vms, start_target
from tests.integration.test_snapshot_export_live import _send_targets
from tests.integration.test_snapshot_serve import _read, ivt


def test_second_serve_on_a_served_state_dir_exits_at_once(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = start_target(tmp_path / "first", "--state-dir", str(state))
    try:
        sock = state / "admin.sock"
        assert sock.exists()
        # "at once": it does not wait for the first to let go (that would run into the
        # timeout); no wall-clock bound, which a loaded machine breaks
        second = subprocess.run(
            [sys.executable, "-m", "iscsi_vmtarget", "serve", "--state-dir", str(state),
             "--portal", "127.0.0.1:0", "--nop-interval", "0"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert second.returncode != 0, second.stdout
        assert f"served by PID {first.proc.pid}" in second.stderr, second.stderr
        assert "ready" not in second.stdout
        # the first daemon is still fully manageable
        assert sock.exists()
        status = json.loads(ivt(state, "status", "--json"))
        assert status["portals"] == [f"127.0.0.1:{first.port},1"]
        out = ivt(state, "vm", "snapshot", "demo", "s1")
        assert "s1" in out
        assert first.proc.poll() is None
        # a daemon whose socket is gone is still a daemon: no silent offline work
        sock.unlink()
        refused = _ivt_fails(state, "target", "list")
        assert f"served by PID {first.proc.pid}" in refused and "does not answer" in refused
    finally:
        assert first.stop() == 0


def test_admin_server_never_removes_a_socket_it_did_not_bind(tmp_path: Path) -> None:
    """A socket that replaced ours at the path (another daemon's) outlives our stop."""

    async def scenario() -> None:
        admin = AdminServer(Manager(ConfigStore(str(tmp_path))), str(tmp_path))
        await admin.start()
        os.unlink(admin.path)
        other = await asyncio.start_unix_server(lambda r, w: None, admin.path)
        await admin.stop()
        assert os.path.exists(admin.path)
        other.close()
        await other.wait_closed()

    asyncio.run(scenario())


LEASE = 3.0  # seconds: renewed every 0.75 s, a settle of 0.3 s
VM = "web"
VM_IQN = f"{DEFAULT_BASE_IQN}:vm.{VM}"


def _lease_block(device: Path, unit_uuid: uuid.UUID) -> LeaseRecord | None:
    pool = DevicePool("shared", str(device))
    try:
        extent = pool.extent(UnitRef("shared", str(unit_uuid)))
    finally:
        pool.close()
    io = DirectBlockIO(str(device), lease_offset(*extent))
    try:
        return decode_record(io.read())
    finally:
        io.close()


def _writer(port: int, acked: dict[int, bytes], pending: dict[int, bytes]) -> None:
    """Rewrite 256 blocks round and round until the target dies; a block counts
    (``acked``) once its WRITE with FUA, or a later SYNCHRONIZE CACHE, was
    acknowledged; ``pending`` holds the write in flight when it died."""
    ini = Initiator(port=port, initiator_name=INITIATOR, target_name=VM_IQN)
    try:
        ini.login()
        ini.command(bytes(6))  # the power-on unit attention
        for n in itertools.count():
            lba = n % 256
            block = (f"write {n} at {lba} ".encode() * 32)[:512]
            fua = 0x08 if n % 2 else 0  # odd writes FUA, even ones flushed after
            cdb = bytes([0x2A, fua]) + lba.to_bytes(4, "big") + b"\x00\x00\x01\x00"
            pending[lba] = block
            if ini.command(cdb, data_out=block).status != 0:
                break
            if not fua and ini.command(bytes([0x35]) + bytes(9)).status != 0:
                break
            acked[lba] = block
            del pending[lba]
    except (InitiatorError, OSError):
        pass  # the target was killed: what was acknowledged is in ``acked``
    finally:
        ini.close()


def _shared_pool(tmp_path: Path) -> tuple[Path, Path, Path, uuid.UUID]:
    """Two state directories (two hosts) defining one device pool on one pool file,
    holding VM web; returns (device, A's state, B's state, web's unit UUID)."""
    device = tmp_path / "san" / "shared.img"
    a_state, b_state = tmp_path / "a", tmp_path / "b"
    with VmManager(StateDir.at(str(a_state))) as manager:
        manager.catalog.create_device("shared", str(device), 64 << 20)
        vm = manager.create(VM, disk=8 << 20, memory=4 << 20, pool="shared")
        unit_uuid = vm.base.header.unit_uuid
    with VmManager(StateDir.at(str(b_state))) as manager:
        manager.catalog.create_device("shared", str(device))  # adopts the table
    shutil.copy(a_state / "master.key", b_state / "master.key")  # the hosts share keys
    for state in (a_state, b_state):  # granted on both hosts: only the lease keeps B off
        grant_vms(state, INITIATOR)
    return device, a_state, b_state, unit_uuid


def _serve(tmp_path: Path, state: Path) -> RunningTarget:
    return start_target(
        tmp_path / f"run-{state.name}", "--state-dir", str(state), "--lease-seconds", str(LEASE)
    )


def _wait_served(t: RunningTarget, limit: float) -> float:
    """Seconds until ``t`` lists the VM in SendTargets (fails after ``limit``)."""
    began = time.monotonic()
    while VM_IQN not in _send_targets(t.port):
        assert time.monotonic() - began < limit, t.log()
        time.sleep(0.05)
    return time.monotonic() - began


def test_lease_takeover_after_expiry_only(tmp_path: Path) -> None:
    device, a_state, b_state, unit_uuid = _shared_pool(tmp_path)
    a = _serve(tmp_path, a_state)
    b = None
    try:
        assert VM_IQN in a.targets
        a_owner = json.loads((a_state / "conf" / "owner.json").read_text())["owner_id"]
        ivt(a_state, "acl", "add", VM_IQN, INITIATOR)  # grants: against the serving daemon
        record = _lease_block(device, unit_uuid)
        assert record is not None and record.held and str(record.owner.owner_id) == a_owner
        acked: dict[int, bytes] = {}
        pending: dict[int, bytes] = {}
        writer = threading.Thread(target=_writer, args=(a.port, acked, pending))
        writer.start()

        b = _serve(tmp_path, b_state)
        assert VM_IQN not in b.targets and f"{DEFAULT_BASE_IQN}:vm.demo" in b.targets
        assert VM_IQN not in _send_targets(b.port)
        with pytest.raises(LoginFailed):
            Initiator(port=b.port, initiator_name=INITIATOR, target_name=VM_IQN).login()
        log = b.log()
        assert f"unit {unit_uuid} of VM '{VM}' is leased by owner {a_owner}" in log, log
        assert f"PID {a.proc.pid}" in log and "expires at" in log
        # B's status says why, and offline writes on B refuse, naming the owner
        status = json.loads(ivt(b_state, "status", "--json"))
        waiting = [x for x in status["leases"] if x["vm"] == VM]
        assert waiting[0]["state"] == "waiting" and a_owner in waiting[0]["reason"]
        for command in (
            ["vm", "snapshot", VM, "s1"],
            ["vm", "move", VM, "--pool", "default"],
            ["vm", "delete", VM, "--force"],  # --force overrides local locks, not a lease
        ):
            refused = _ivt_fails(b_state, *command)
            assert f"is leased by owner {a_owner}" in refused, command
        time.sleep(LEASE)  # A renews all along: B keeps off
        assert VM_IQN not in _send_targets(b.port)
        assert len(acked) == 256  # every block written at least once

        a.proc.kill()  # kill -9: no release, the lease must expire
        a.proc.wait()
        killed = time.time()
        writer.join(timeout=30)
        last = _lease_block(device, unit_uuid)
        assert last is not None and str(last.owner.owner_id) == a_owner
        expires = last.wall_ns / 1e9 + LEASE  # A's last renewal + the duration
        while True:
            before = time.time()
            served = VM_IQN in _send_targets(b.port)
            if served:
                break
            assert before - killed < 10 * LEASE, b.log()
            time.sleep(0.05)
        assert before >= expires, (before, expires)  # never before the lease expired
        taken = _lease_block(device, unit_uuid)
        assert taken is not None and str(taken.owner.owner_id) != a_owner

        ivt(b_state, "acl", "add", VM_IQN, INITIATOR)
        ini = Initiator(port=b.port, initiator_name=INITIATOR, target_name=VM_IQN)
        ini.login()
        ini.command(bytes(6))
        for lba, block in acked.items():  # the write in flight may or may not be there
            assert _read(ini, lba) in (block, pending.get(lba)), lba
        ini.logout()
        ini.close()
    finally:
        a.stop()
        if b is not None:
            assert b.stop() == 0
    released = _lease_block(device, unit_uuid)
    assert released is not None and not released.held  # B's clean stop released it


def _ivt_fails(state: Path, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "iscsi_vmtarget", *args, "--state-dir", str(state)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0, proc.stdout
    return proc.stderr


def test_restart_takes_its_lease_back_and_clean_stop_hands_over_at_once(tmp_path: Path) -> None:
    _device, a_state, b_state, _unit = _shared_pool(tmp_path)
    a = _serve(tmp_path, a_state)
    a.proc.kill()  # kill -9: the lease stays on the device, unreleased
    a.proc.wait()
    a = _serve(tmp_path, a_state)  # same state directory, same owner id: no waiting
    b = None
    try:
        assert VM_IQN in a.targets
        b = _serve(tmp_path, b_state)
        assert VM_IQN not in b.targets
        assert a.stop() == 0  # releases the lease
        assert _wait_served(b, 10 * LEASE) < LEASE  # not one lease duration: at once
    finally:
        a.stop()
        if b is not None:
            b.stop()


@pytest.mark.parametrize("value", ["0", "0.1", "-3", "soon", "7200"])
def test_lease_seconds_out_of_range_is_a_usage_error(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--lease-seconds", value])
    assert exc.value.code == 2
    assert "--lease-seconds" in capsys.readouterr().err
