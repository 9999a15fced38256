"""``conf/iscsi-vmtarget.service``: ``systemd-analyze verify`` accepts it, and the
daemon does what it promises systemd: ``READY=1`` over ``$NOTIFY_SOCKET`` once its
portals listen, and on ``SIGHUP`` (``ExecReload``) ``RELOADING=1``, the
configuration re-read from disk and applied, ``READY=1`` - with the sessions kept."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from iscsi_vmtarget.client.initiator import Initiator
from iscsi_vmtarget.server.admin import call_daemon
from iscsi_vmtarget.server.model import TargetSpec
from iscsi_vmtarget.server.persist import ConfigStore
from iscsi_vmtarget.server.vm_luns import DEFAULT_BASE_IQN
from tests.conftest import INITIATOR, start_target
from tests.integration.test_snapshot_serve import _read

UNIT = Path(__file__).resolve().parents[2] / "conf" / "iscsi-vmtarget.service"
ADDED = "iqn.2026-11.org.example:added-by-hand"


def test_unit_file_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is not installed (tools/install-deps --test installs it)")
    text = UNIT.read_text()
    for wanted in (
        "Type=notify",
        "ExecReload=",
        "ProtectSystem=",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
    ):
        assert wanted in text
    # verify checks that ExecStart exists: point it at the script pip installed
    script = shutil.which("iscsi-vmtarget")
    assert script is not None, "the iscsi-vmtarget script is not installed (pip install -e .)"
    unit = tmp_path / "iscsi-vmtarget.service"
    unit.write_text(text.replace("/usr/local/bin/iscsi-vmtarget", script))
    proc = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


def _next(sock: socket.socket) -> set[str]:
    return set(sock.recv(4096).decode().split("\n"))


def test_notify_ready_and_reload_keeps_sessions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(30)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    state = tmp_path / "state"
    target = start_target(tmp_path, "--state-dir", str(state))
    try:
        assert "READY=1" in _next(sock)
        with socket.create_connection(("127.0.0.1", target.port), timeout=5):
            pass  # the portal listened by then
        ini = Initiator(
            port=target.port, initiator_name=INITIATOR, target_name=f"{DEFAULT_BASE_IQN}:demo"
        )
        ini.login()
        ini.command(bytes(6))
        before = _read(ini, 1)

        store = ConfigStore(str(state))  # an edit by hand, behind the daemon's back
        with store.locked():
            store.save(store.load().with_target(TargetSpec(ADDED, allow_all=True)))
        target.proc.send_signal(signal.SIGHUP)
        assert "RELOADING=1" in _next(sock)
        assert "READY=1" in _next(sock)
        names = [t["name"] for t in call_daemon(str(state), "target.list", {})["targets"]]
        assert ADDED in names
        assert _read(ini, 1) == before  # the same session, still serving
        assert ini.logout() == 0
        ini.close()
        assert f"config: + target {ADDED}" in target.log()  # applied as any change
        assert target.stop() == 0
        assert "STOPPING=1" in _next(sock)
    finally:
        target.stop()
        sock.close()
