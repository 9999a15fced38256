"""One owner per unit: the state-directory lock of ``serve`` and the on-disk unit
leases of device pools (README "Ownership and leases")."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from iscsi_vmtarget.server.admin import AdminServer, Manager
from iscsi_vmtarget.server.persist import ConfigStore
from tests.conftest import start_target
from tests.integration.test_snapshot_serve import ivt


def test_second_serve_on_a_served_state_dir_exits_at_once(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = start_target(tmp_path / "first", "--state-dir", str(state))
    try:
        sock = state / "admin.sock"
        assert sock.exists()
        began = time.monotonic()
        second = subprocess.run(
            [sys.executable, "-m", "iscsi_vmtarget", "serve", "--state-dir", str(state),
             "--portal", "127.0.0.1:0", "--nop-interval", "0"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        took = time.monotonic() - began
        assert second.returncode != 0, second.stdout
        assert f"served by PID {first.proc.pid}" in second.stderr, second.stderr
        assert "ready" not in second.stdout
        assert took < 10
        # the first daemon is still fully manageable
        assert sock.exists()
        status = json.loads(ivt(state, "status", "--json"))
        assert status["portals"] == [f"127.0.0.1:{first.port},1"]
        out = ivt(state, "vm", "snapshot", "demo", "s1")
        assert "s1" in out
        assert first.proc.poll() is None
    finally:
        assert first.stop() == 0
    assert not (state / "admin.sock").exists()  # the first removes the socket it made


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
