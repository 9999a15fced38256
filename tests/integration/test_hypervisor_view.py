"""The hypervisor view against the real server (issue 14): a host granted
``--view hypervisor`` sees the VM's state and config LUNs beside its disk, plaintext,
with their own identities; guests, raw-view hosts, strangers and snapshot exports never
do (the enumeration attack of :mod:`tests.integration.test_masking_vms`)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest

from iscsi_vmtarget.cli.main import main
from iscsi_vmtarget.client import Initiator
from iscsi_vmtarget.server.hypervisor_view import CONFIG_LUN, STATE_LUN
from iscsi_vmtarget.server.vm_luns import DEFAULT_BASE_IQN
from iscsi_vmtarget.vm import StateDir, VmManager
from tests.conftest import RunningTarget, start_with_config
from tests.integration.test_masking_vms import GOOD, STRANGER, Attack
from tests.integration.test_vm_move_live import ivt

MIB = 1 << 20
HOST_A = "iqn.2026-11.test:host-a"
BACKUP = "iqn.2026-11.test:backup"
OWN = f"{DEFAULT_BASE_IQN}:vm.h"
MARKER = b"STATE-PLAINTEXT-MARKER-7d1e"
LBA_OUT_OF_RANGE = (2, 5, (0x21, 0x00))
CHAP = ("--chap-user", "host-a", "--chap-secret", "sekrit-of-host-a")


@dataclass
class Ran:
    returncode: int
    stdout: bytes
    stderr: bytes


def stream(verb: str, url: str, data: bytes = b"", *extra: str, who: str = HOST_A) -> Ran:
    """``iscsi-vmtarget state|config push|pull URL`` as a hypervisor runs it (in this
    process: a CLI start costs seconds here; the QEMU test runs the real command)."""
    out, err = io.BytesIO(), io.StringIO()
    with (
        mock.patch.object(sys, "stdin", SimpleNamespace(buffer=io.BytesIO(data))),
        mock.patch.object(sys, "stdout", SimpleNamespace(buffer=out)),
        contextlib.redirect_stderr(err),
    ):
        code = main([*verb.split(), url, "--initiator-name", who, *extra])
    return Ran(code, out.getvalue(), err.getvalue().encode())


def vpd_83(ini: Initiator, lun: int) -> bytes:
    return ini.scsi("INQUIRY", bytes([0x12, 1, 0x83, 0, 255, 0]), lun, read_length=255)


def vpd_80(ini: Initiator, lun: int) -> bytes:
    return ini.scsi("INQUIRY", bytes([0x12, 1, 0x80, 0, 255, 0]), lun, read_length=255)


def grant(state: Path, *args: str) -> None:
    """An offline ``acl add`` (in this process: quicker than a CLI start)."""
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*args, "--state-dir", str(state)]) == 0


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, RunningTarget]]:
    """One daemon for the module: VM ``h`` granted to HOST_A (hypervisor view), GOOD
    (guest view) and BACKUP (raw view)."""
    tmp_path = tmp_path_factory.mktemp("hv")
    state = tmp_path / "state"
    with VmManager(StateDir.at(str(state))) as manager:
        manager.create("h", disk=4 * MIB, memory=2 * MIB)
        manager.create("c", disk=4 * MIB, memory=2 * MIB)
        manager.catalog.create_directory("p2", None)
    grant(state, "acl", "add", "--vm", "h", HOST_A, "--view", "hypervisor")
    grant(state, "acl", "add", "--vm", "c", HOST_A, "--view", "hypervisor", *CHAP)
    grant(state, "acl", "add", "--vm", "h", GOOD)
    grant(state, "acl", "add", "--vm", "h", BACKUP, "--view", "raw")
    config = f'state_dir = "{state}"\nexport_vms = true\n'
    target = start_with_config(tmp_path / "serve", config, "--state-dir", str(state))
    yield state, target
    target.stop()


def test_only_the_hypervisor_view_sees_the_region_luns(
    served: tuple[Path, RunningTarget],
) -> None:
    state, target = served
    attack = Attack(target)
    attack.sweep(OWN, {0, STATE_LUN, CONFIG_LUN}, HOST_A)
    attack.sweep(OWN, {0}, GOOD)  # the guest view: its disk only
    attack.sweep(OWN, {0}, BACKUP)  # the raw view: the unit as ciphertext, no regions
    assert attack.listed(STRANGER) == []
    ivt(state, "vm", "snapshot", "h", "s1")
    ivt(state, "vm", "snapshot", "export", "h", "s1")
    attack.sweep(f"{OWN}.snap.s1", {0}, HOST_A)  # a snapshot export: no regions


def test_region_luns_read_plaintext_and_seal_writes(
    served: tuple[Path, RunningTarget],
) -> None:
    state, target = served
    with Attack(target).session(HOST_A, OWN) as ini:
        disk_id = vpd_83(ini, 0)
        ids = {vpd_83(ini, n) for n in (STATE_LUN, CONFIG_LUN)}
        assert len(ids) == 2 and disk_id not in ids  # own designators
        serials = {vpd_80(ini, n) for n in (0, STATE_LUN, CONFIG_LUN)}
        assert len(serials) == 3
        blocks, size = ini.read_capacity16(STATE_LUN)
        assert size == 512 and 2 * MIB < blocks * size < 32 * MIB
        past = bytes([0x88, 0]) + blocks.to_bytes(8, "big") + (1).to_bytes(4, "big") + bytes(2)
        rsp = ini.command(past, lun=STATE_LUN, read_length=512)
        assert (rsp.status, rsp.sense_key, rsp.asc_ascq) == LBA_OUT_OF_RANGE
        ini.write16(3, MARKER.ljust(512, b"\0"), 512, STATE_LUN)  # 512 B anywhere
        ini.write16(200, MARKER * 150 + bytes(4096 - 150 * len(MARKER)), 512, STATE_LUN)
        ini.synchronize_cache16(STATE_LUN)
        assert ini.read16(3, 1, 512, STATE_LUN).startswith(MARKER)
        assert ini.read16(200, 8, 512, STATE_LUN)[: 150 * len(MARKER)] == MARKER * 150
        assert ini.read16(0, 1, 512, STATE_LUN) == bytes(512)
    for path in state.rglob("*"):  # sealed at rest
        if path.is_file():
            assert MARKER not in path.read_bytes(), path
    with Attack(target).session(BACKUP, OWN) as ini:  # the raw view: ciphertext only
        blocks, size = ini.read_capacity16(0)
        whole = b"".join(
            ini.read16(lba, min(2048, blocks - lba), size) for lba in range(0, blocks, 2048)
        )
        assert MARKER not in whole


def test_push_and_pull_return_exactly_the_stream(served: tuple[Path, RunningTarget]) -> None:
    target = served[1]
    url = f"iscsi://127.0.0.1:{target.port}/{OWN}"
    image = os.urandom(3 * MIB + 12345)  # more than the 2 MiB of memory: the headroom
    assert stream("state push", url, image).returncode == 0
    pulled = stream("state pull", url)
    assert pulled.returncode == 0 and pulled.stdout == image
    too_big = stream("state push", url, bytes(64 * MIB))
    assert too_big.returncode == 1
    assert b"larger than the state region" in too_big.stderr
    assert b"previous image is kept" in too_big.stderr
    assert stream("state pull", url).stdout == image  # still readable
    machine = json.dumps({"name": "h", "args": ["-m", "64"]}).encode()
    assert stream("config push", url, machine).returncode == 0
    assert stream("config pull", url).stdout == machine
    assert stream("state pull", url).stdout == image  # a region of its own
    refused = stream("state pull", url, who=GOOD)  # a guest-view host: no such LUN
    assert refused.returncode == 1 and b"has no LUN 254" in refused.stderr


def test_push_and_pull_take_chap_options(served: tuple[Path, RunningTarget]) -> None:
    target = served[1]
    url = f"iscsi://127.0.0.1:{target.port}/{DEFAULT_BASE_IQN}:vm.c"
    assert stream("state push", url, b"suspended", *CHAP).returncode == 0
    assert stream("state pull", url, b"", *CHAP).stdout == b"suspended"
    wrong = stream("state pull", url, b"", "--chap-user", "host-a", "--chap-secret", "x" * 16)
    assert wrong.returncode == 1 and b"authentication failed" in wrong.stderr


def test_region_luns_follow_a_live_move(served: tuple[Path, RunningTarget]) -> None:
    state, target = served
    url = f"iscsi://127.0.0.1:{target.port}/{DEFAULT_BASE_IQN}:vm.c"
    assert stream("state push", url, b"before the move", *CHAP).returncode == 0
    ivt(state, "vm", "move", "c", "--pool", "p2")  # through the daemon, LUNs served
    assert stream("state pull", url, b"", *CHAP).stdout == b"before the move"
    assert stream("state push", url, b"after the move", *CHAP).returncode == 0
    with VmManager(StateDir.at(str(state))) as manager:  # in the moved unit itself
        assert manager.find("c").base.pool == "p2"
        assert b"".join(manager.read_state("c")) == b"after the move"
