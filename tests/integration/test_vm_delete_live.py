"""``vm delete --force`` of a VM the running daemon serves (issue 17's soak: the
daemon kept every deleted clone's units open, their space held until it restarted).
The daemon deletes it: the sessions are logged out, the units closed, then deleted."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from iscsi_vmtarget.client.initiator import Initiator, InitiatorError
from iscsi_vmtarget.server.vm_luns import vm_target_name
from tests.conftest import INITIATOR, grant_vms, start_target
from tests.vm.test_cli import Cli, cli  # noqa: F401 - the fixture

CYCLES = 3


def open_files(pid: int) -> list[str]:
    """The files (not sockets, pipes or event fds: an admin connection the CLI just
    closed may still be open for a moment) ``pid`` holds open."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/"):
            out.append(target)
    return out


def deleted_files_open(pid: int) -> list[str]:
    """Files ``pid`` holds open that were deleted (their space is not given back)."""
    return [f for f in open_files(pid) if f.endswith(" (deleted)")]


@pytest.mark.slow
def test_deleting_served_vms_closes_their_units(tmp_path: Path, cli: Cli) -> None:  # noqa: F811
    assert cli("vm", "create", "keep", "--disk", "4M", "--memory", "1M")[0] == 0
    grant_vms(cli.state, INITIATOR)
    target = start_target(tmp_path / "serve", "--state-dir", str(cli.state))
    pid = target.proc.pid
    try:
        counts = []
        for n in range(CYCLES):
            name = f"gone{n}"
            assert cli("vm", "create", name, "--disk", "4M", "--memory", "1M")[0] == 0
            ini = Initiator(port=target.port, initiator_name=INITIATOR,
                            target_name=vm_target_name(name))  # fmt: skip
            ini.login()
            ini.write16(0, b"d" * 4096, 512)
            code, out, err = cli("vm", "delete", "--force", name)
            assert code == 0 and f"deleted VM {name}" in out, err
            with pytest.raises((InitiatorError, OSError)):
                ini.read16(0, 8, 512)  # logged out by the daemon, not reading a deleted unit
            ini.close()
            counts.append(len(open_files(pid)))
            assert deleted_files_open(pid) == []
        assert counts == [counts[0]] * CYCLES, counts
        assert "gone" not in cli("vm", "list")[1]
    finally:
        target.stop()
