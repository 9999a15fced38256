"""``vm replicate`` / ``vm receive`` / ``vm promote`` between two real target processes on
127.0.0.1 (and to Debian's tgtd for disk data): the guest writes through iSCSI on the
source, rounds push checkpoints (the daemon quiesces the VM for each), a round killed
mid-way leaves the destination on the previous checkpoint, and the promoted VM reads
exactly the checkpointed bytes through iSCSI, with the source volumes' identities."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from iscsi_vmtarget.client.initiator import Initiator, LoginFailed
from iscsi_vmtarget.server.vm_luns import DEFAULT_BASE_IQN
from iscsi_vmtarget.testing.tgtd import Tgtd
from iscsi_vmtarget.vm import StateDir, VmManager
from iscsi_vmtarget.vm.faults import ENV
from iscsi_vmtarget.vm.layers.cow import GRAIN
from iscsi_vmtarget.vm.operations import snapshot as snaps
from iscsi_vmtarget.vm.operations.replicate import replica_layout
from tests.conftest import INITIATOR, RunningTarget, grant_vms, need_tool, start_target

MIB = 1 << 20
VM = "repvm"
VM_IQN = f"{DEFAULT_BASE_IQN}:vm.{VM}"
REPLICA_IQN = f"{DEFAULT_BASE_IQN}:replica.{VM}"
STATE = bytes(range(251)) * 997
SIZES = (8 * MIB, 4 * MIB)
STRANGER = "iqn.2026-11.test:evil"


def ivt(
    state: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "iscsi_vmtarget", *args, "--state-dir", str(state)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def sent(output: str) -> int:
    found = re.search(r"(\d+) bytes sent", output)
    assert found, output
    return int(found.group(1))


def make_vm(state: Path) -> int:
    """The source VM (two disks, a state image); returns the replica size it needs."""
    with VmManager(StateDir.at(str(state))) as manager:
        manager.create(VM, disk=SIZES[0], memory=4 * MIB, secondaries=SIZES[1:])
        manager.write_state(VM, _Bytes(STATE), len(STATE))
        return replica_layout(manager.find(VM)).size_needed


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def read(self, n: int) -> bytes:
        piece = self.data[self.pos : self.pos + n]
        self.pos += len(piece)
        return piece


def login(port: int, iqn: str) -> Initiator:
    ini = Initiator(port=port, initiator_name=INITIATOR, target_name=iqn, timeout=60)
    ini.login()
    return ini


def write(ini: Initiator, lun: int, offset: int, data: bytes) -> None:
    ini.write16(offset // 512, data, 512, lun)


def disk(ini: Initiator, lun: int, size: int = 0) -> bytes:
    """The whole LUN (``size`` bytes; default: its size at creation)."""
    blocks = (size or SIZES[lun]) // 512
    return b"".join(
        ini.read16(lba, min(2048, blocks - lba), 512, lun) for lba in range(0, blocks, 2048)
    )


def naa(ini: Initiator, lun: int) -> bytes:
    page = ini.scsi("INQUIRY", bytes([0x12, 1, 0x83, 2, 0, 0]), lun, read_length=512)
    found = re.search(rb"\x01\x03\x00\x10(.{16})", page, re.S)
    assert found, page
    return found.group(1)


def url(target: RunningTarget) -> str:
    return f"iscsi://127.0.0.1:{target.port}/{REPLICA_IQN}/0"


@dataclass
class Sites:
    """The source serving the VM, the destination receiving its replica."""

    src: Path
    dst: Path
    source: RunningTarget
    destination: RunningTarget


@contextlib.contextmanager
def two_sites(tmp_path: Path, spare: int = 1) -> Iterator[Sites]:
    """``spare``: the replica LUN is that many times the size it needs (room to grow)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    size = make_vm(src) * spare
    grant_vms(src)
    source = start_target(tmp_path / "s", "--state-dir", str(src))
    try:
        grant_vms(dst)
        destination = start_target(tmp_path / "d", "--state-dir", str(dst))
        try:
            assert "exported now" in ok(ivt(dst, "vm", "receive", VM, "--size", str(size)))
            yield Sites(src, dst, source, destination)
        finally:
            destination.stop()
    finally:
        source.stop()


def test_rounds_kill_and_promote(tmp_path: Path) -> None:
    with two_sites(tmp_path) as sites:
        src, dst, destination = sites.src, sites.dst, sites.destination
        ini = login(sites.source.port, VM_IQN)
        identity = [naa(ini, 0), naa(ini, 1)]
        write(ini, 0, 0, os.urandom(3 * MIB))
        write(ini, 1, MIB, os.urandom(MIB))
        run = ivt(src, "vm", "replicate", VM, "--to", url(destination), "--progress")
        first = ok(run)
        assert "round 1" in first and "(full)" in first and "state and config sent" in first
        assert "replicating" in run.stderr and "100%" in run.stderr  # the progress bar
        write(ini, 0, 5 * MIB, b"second round" * 128)
        write(ini, 1, 0, bytes(512))  # zeros over zeros: a grain, still
        expected = [disk(ini, 0), disk(ini, 1)]
        second = ok(ivt(src, "vm", "replicate", VM, "--to", url(destination)))
        assert "round 2" in second and "(incremental)" in second
        assert sent(second) < sent(first) // 10
        write(ini, 0, 0, b"never replicated" * 4096)
        killed = ivt(
            src, "vm", "replicate", VM, "--to", url(destination),
            env={**os.environ, ENV: "replica.staging"},
        )  # fmt: skip
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        ini.logout()
        dr_host = "iqn.2026-11.test:dr-host"
        promote = ("vm", "promote", VM, "--source-key", str(src / "master.key"), "--grant", dr_host)
        promoted = ok(ivt(dst, *promote))
        assert "from checkpoint 2" in promoted and "uncommitted journal of checkpoint 3" in promoted
        assert f"VM {VM} granted to {dr_host}" in promoted  # and nobody else of its own
        grants = json.loads(ok(ivt(dst, "acl", "list", "--json")))["vms"]
        assert [(v["vm"], [g["initiator"] for g in v["grants"]]) for v in grants] == [
            (VM, [dr_host])
        ]
        assert VM in ok(ivt(dst, "vm", "list"))
    grant_vms(dst)
    again = start_target(tmp_path / "d2", "--state-dir", str(dst))
    try:
        assert again.targets[VM_IQN] == {0: SIZES[0], 1: SIZES[1]}
        with pytest.raises(LoginFailed):  # granted to dr-host and the defaults only
            Initiator(port=again.port, initiator_name=STRANGER, target_name=VM_IQN).login()
        ini = login(again.port, VM_IQN)
        assert [disk(ini, 0), disk(ini, 1)] == expected  # checkpoint 2, exactly
        assert [naa(ini, 0), naa(ini, 1)] == identity  # the ORIGINAL volumes' designators
        ini.logout()
    finally:
        again.stop()
    out = tmp_path / "state.out"
    ok(ivt(dst, "vm", "state", "read", VM, str(out)))
    assert out.read_bytes() == STATE
    assert not (dst / "replicas" / f"{VM}.replica").exists()


def test_a_disk_grown_live_is_replicated_whole(tmp_path: Path) -> None:
    """A served disk grown through the daemon between rounds (a new top layer: the last
    checkpoint is a snapshot) into a replica made with room: the next round sends the
    grown part, and the promoted VM has the grown size and reads the checkpoint's bytes,
    those written past the old end too."""
    grown = 12 * MIB + 1536
    with two_sites(tmp_path, spare=2) as sites:
        src, destination = sites.src, sites.destination
        ini = login(sites.source.port, VM_IQN)
        write(ini, 0, 0, os.urandom(MIB))
        assert "(full)" in ok(ivt(src, "vm", "replicate", VM, "--to", url(destination)))
        assert "live" in ok(ivt(src, "vm", "resize", VM, "--disk", str(grown)))
        write(ini, 0, SIZES[0] - 512, os.urandom(4096))  # across the old end
        write(ini, 0, grown - 512, os.urandom(512))  # the new last block
        expected = disk(ini, 0, grown)
        second = ok(ivt(src, "vm", "replicate", VM, "--to", url(destination)))
        assert "round 2" in second and "(incremental)" in second
        ini.logout()
        ok(ivt(sites.dst, "vm", "promote", VM, "--source-key", str(src / "master.key")))
    grant_vms(sites.dst)
    again = start_target(tmp_path / "d2", "--state-dir", str(sites.dst))
    try:
        assert again.targets[VM_IQN] == {0: grown, 1: SIZES[1]}
        ini = login(again.port, VM_IQN)
        assert disk(ini, 0, grown) == expected
        ini.logout()
    finally:
        again.stop()


def test_continuous_rounds_until_interrupted(tmp_path: Path) -> None:
    with two_sites(tmp_path) as sites:
        src, destination = sites.src, sites.destination
        ini = login(sites.source.port, VM_IQN)
        model = bytearray(SIZES[0])  # what LUN 0 must read, whatever merged meanwhile
        model[MIB : 3 * MIB] = os.urandom(2 * MIB)
        write(ini, 0, MIB, model[MIB : 3 * MIB])
        proc = subprocess.Popen(
            [sys.executable, "-m", "iscsi_vmtarget", "vm", "replicate", VM, "--to",
             url(destination), "--continuous", "--interval", "0.2", "--state-dir", str(src)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert proc.stdout is not None
        rounds = []
        deadline = time.monotonic() + 120
        while len(rounds) < 3 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("round "):
                rounds.append(line)
                at = len(rounds) * 3 * GRAIN + 512  # a change per round, some in the pattern
                model[at : at + 512] = os.urandom(512)
                write(ini, 0, at, model[at : at + 512])
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
        assert len(rounds) >= 3, err
        assert proc.returncode == 0 and "stopped" in err
        assert all("(incremental)" in r for r in rounds[1:])
        assert disk(ini, 0) == model  # the daemon's live merges kept every byte
        ini.logout()
        with VmManager(StateDir.at(str(src))) as manager:
            vm = manager.find(VM)
            names = [s.name for s in snaps.list_snapshots(manager, VM)]
            assert len([n for n in names if n.startswith("replica.")]) == 1
            assert len(vm.layers) <= 2 * len(vm.units)  # merged while served: bounded


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_cli_errors(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_vm(src)
    bad = ivt(src, "vm", "replicate", VM, "--to", "http://127.0.0.1/x")
    assert bad.returncode == 2 and "bad destination URL 'http://127.0.0.1/x'" in bad.stderr
    bad = ivt(src, "vm", "replicate", VM, "--to", "iscsi://127.0.0.1/not-an-iqn")
    assert bad.returncode == 2 and "is not a target name" in bad.stderr
    port = _closed_port()
    gone = ivt(src, "vm", "replicate", VM, "--to", f"iscsi://127.0.0.1:{port}/{REPLICA_IQN}/0")
    assert gone.returncode == 1
    assert f"cannot reach the destination 127.0.0.1:{port}" in gone.stderr
    grant_vms(dst)
    destination = start_target(tmp_path / "d", "--state-dir", str(dst))
    try:
        ok(ivt(dst, "vm", "receive", VM, "--size", "8M"))
        small = ivt(src, "vm", "replicate", VM, "--to", url(destination))
        assert small.returncode == 1
        assert re.search(
            r"holds 8388608 bytes; a replica of VM 'repvm' needs \d+ bytes", small.stderr
        )
        assert f"vm receive {VM} --size" in small.stderr
        with VmManager(StateDir.at(str(src))) as manager:  # refused before any checkpoint
            assert snaps.list_snapshots(manager, VM) == []
        nolun = ivt(src, "vm", "replicate", VM, "--to", url(destination)[:-1] + "7")
        assert nolun.returncode == 1 and f"{REPLICA_IQN} at 127.0.0.1" in nolun.stderr
        assert "has no LUN 7" in nolun.stderr
        stranger = ivt(
            src, "vm", "replicate", VM, "--to", url(destination),
            "--initiator-name", "iqn.2026-11.org.example:stranger",
        )  # fmt: skip
        assert stranger.returncode == 1 and "is not authorized" in stranger.stderr
        other = f"{DEFAULT_BASE_IQN}:replica.chapvm"
        ok(ivt(dst, "vm", "receive", "chapvm", "--size", "8M",
               "--chap-user", "repl", "--chap-secret", "right-secret-1234"))  # fmt: skip
        refused = ivt(
            src, "vm", "replicate", VM, "--to", f"iscsi://127.0.0.1:{destination.port}/{other}/0",
            "--chap-user", "repl", "--chap-secret", "wrong-secret-1234",
        )  # fmt: skip
        assert refused.returncode == 1
        assert "refused the login" in refused.stderr and "authentication failed" in refused.stderr
        nothing = ivt(dst, "vm", "promote", "chapvm")
        assert nothing.returncode == 1 and "holds no replica" in nothing.stderr
    finally:
        destination.stop()
    missing = ivt(dst, "vm", "promote", "nosuch")
    assert missing.returncode == 1 and "no replica of VM 'nosuch' here" in missing.stderr


def test_disk_only_to_tgtd(tmp_path: Path) -> None:
    """tgtd as the destination of disk data: its backing file ends up byte-identical
    to the checkpointed guest disk, after a full and after an incremental round."""
    need_tool("tgtd")
    src = tmp_path / "src"
    make_vm(src)
    backing = tmp_path / "tgtd.img"
    backing.write_bytes(b"\xee" * SIZES[0])  # not zeros: the first round must zero too
    tgtd = Tgtd(tmp_path / "tgtd", backing).start()
    try:
        with VmManager(StateDir.at(str(src))) as manager:
            for offset, data in ((0, os.urandom(MIB)), (6 * MIB, b"tail" * 1000)):
                live = snaps.open_live(manager, manager.find(VM))
                live.write(offset, data)
                live.flush()
                live.close()
        for expect in ("(full)", "(incremental)"):
            out = ok(ivt(src, "vm", "replicate", VM, "--disk-only", "--to", tgtd.url))
            assert expect in out
            snap = re.search(r"checkpoint (\S+)", out)
            assert snap
            with VmManager(StateDir.at(str(src))) as manager:
                image = snaps.open_snapshot(manager, VM, snap.group(1))
                checkpointed = bytes(image.read(0, image.size))
                image.close()
                live = snaps.open_live(manager, manager.find(VM))
                live.write(3 * MIB, os.urandom(4096))  # a change for the next round
                live.flush()
                live.close()
            assert backing.read_bytes() == checkpointed
    finally:
        tgtd.stop()
