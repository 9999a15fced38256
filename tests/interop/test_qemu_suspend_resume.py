"""Suspend a real QEMU VM into its unit and resume it on another host (issue 14).

VM ``hv`` (8 MiB disk, 128 MiB memory: less is too little for the guest's 21 MB
initramfs) is granted the hypervisor view to two initiator names, ``host A`` and
``host B``; its config region holds the machine description (QEMU arguments as JSON,
pushed with ``config push``). All traffic is on 127.0.0.1;
QEMU runs under TCG and reaches the disk with its own libiscsi driver (``scsi-block``:
the guest's ``sg_vpd`` reaches the target).

1. QEMU A boots the guest from that description. In the guest a shell loop counts
   upward: it writes line ``n`` to sector ``n`` of the disk (a log on the raw disk),
   prints ``@@@COUNT n`` on the console and keeps a marker string in RAM;
2. QMP ``stop``, ``migrate`` to ``exec:iscsi-vmtarget state push`` (as host A), quit;
3. ``vm snapshot hv s1`` (disk and the suspended machine); then a second run from that
   state counts on and is suspended again (the state now holds the later machine), and
   ``vm revert hv s1``;
4. QEMU B is started from the description it pulls (``config pull``, as host B) with
   ``-incoming exec:iscsi-vmtarget state pull``; after ``cont`` the counter goes on
   from the snapshot's value (not from 0, not from the later run's), the disk's log
   holds exactly the lines up to it plus the new ones, and ``sg_vpd -p di`` in the
   guest shows the unit's own designator;
5. the RAM marker is in the pulled stream, but in no file of the state directory, and
   not in the unit read through the raw view (ciphertext).
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest

from iscsi_vmtarget.cli.main import main
from iscsi_vmtarget.client import Initiator
from iscsi_vmtarget.server.vm_luns import DEFAULT_BASE_IQN
from iscsi_vmtarget.vm import StateDir, VmManager
from tests.conftest import RunningTarget, start_with_config
from tests.interop.guestlib import REPO, guest_tools, need, scsi_disks_script

pytestmark = [pytest.mark.interop, pytest.mark.slow]

MIB = 1 << 20
VM = "hv"
IQN = f"{DEFAULT_BASE_IQN}:vm.{VM}"
HOST_A = "iqn.2026-11.test:host-a"
HOST_B = "iqn.2026-11.test:host-b"
BACKUP = "iqn.2026-11.test:backup"
MEMORY = 128 * MIB
TAG = "hvlog"
WAIT = 90.0


def guest_script(marker: str) -> str:
    """The counter: line n to sector n, ``@@@COUNT n`` on the console, and between
    counts one command line from the console (the host's ``step ...``) is run."""
    return scsi_disks_script(1) + (
        f"d0=$(disk_of 0)\nMARK={marker}\n"
        "step vpd-di:boot sg_vpd -p di $d0\n"
        "stty -echo 2>/dev/null\n"
        "n=0\n"
        "while true; do\n"
        "  n=$((n+1))\n"
        f"  printf '{TAG} %06d\\n' $n | dd of=$d0 bs=512 seek=$n conv=notrunc,fsync 2>/dev/null\n"
        '  echo "@@@COUNT $n"\n'
        '  if read -t 1 cmd; then eval "$cmd"; fi\n'
        "done\n"
    )


class Qmp:
    """A minimal QMP client (QEMU Machine Protocol): one command at a time; events
    are skipped."""

    def __init__(self, path: Path, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.file = self.sock.makefile("rwb")
        self._read()  # the greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while True:
            line = self.file.readline()
            if not line:
                raise EOFError("QMP connection closed")
            message: dict[str, Any] = json.loads(line)
            if "event" not in message:
                return message

    def execute(self, command: str, **arguments: Any) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self.file.write(json.dumps(request).encode() + b"\n")
        self.file.flush()
        answer = self._read()
        if "error" in answer:
            raise RuntimeError(f"QMP {command}: {answer['error']}")
        return answer.get("return")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class Machine:
    """One QEMU process: its console (serial on stdio, read by a thread) and QMP."""

    def __init__(self, args: list[str], workdir: Path, name: str) -> None:
        self.name = name
        self.qmp_path = workdir / f"{name}.qmp"
        cmd = [
            "qemu-system-x86_64",
            *args,
            "-nographic",
            "-serial",
            "stdio",
            "-qmp",
            f"unix:{self.qmp_path},server=on,wait=off",
        ]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env,
        )
        self.lines: list[str] = []
        self.counts: list[int] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()
        self.qmp = Qmp(self.qmp_path)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n")
            with self._cond:
                self.lines.append(line)
                found = re.match(r"@@@COUNT (\d+)", line)
                if found:
                    self.counts.append(int(found.group(1)))
                self._cond.notify_all()

    @property
    def console(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for(self, what: str, predicate: Any, timeout: float = WAIT) -> None:
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise AssertionError(f"{self.name}: no {what} in {timeout} s\n{self.console}")

    def wait_count(self, at_least: int) -> int:
        self.wait_for(f"count {at_least}", lambda: self.counts and self.counts[-1] >= at_least)
        return self.counts[-1]

    def step(self, name: str, command: str) -> str:
        """Run ``command`` in the guest as step ``name`` (between two counts)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"step {name} {command}\n".encode())
        self.proc.stdin.flush()
        self.wait_for(
            f"step {name}", lambda: any(x.startswith(f"@@@END {name} ") for x in self.lines)
        )
        return guest_tools.parse_steps(self.console)[name].output

    def wait_migrated(self) -> None:
        """Until this machine's outgoing or incoming migration has completed."""
        deadline = time.monotonic() + WAIT
        while True:
            status = (self.qmp.execute("query-migrate") or {}).get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled") or time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: migration {status}\n{self.console}")
            time.sleep(0.2)

    def quit(self) -> None:
        try:
            self.qmp.execute("quit")
        except (EOFError, OSError):
            pass
        self.qmp.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def cli(*args: str, data: bytes = b"") -> bytes:
    """``iscsi-vmtarget ARGS`` in this process (a CLI start costs seconds here; QEMU
    runs the real command for the state streams); its stdout."""
    out = io.BytesIO()
    text = io.TextIOWrapper(out, write_through=True)
    with (
        mock.patch.object(sys, "stdin", SimpleNamespace(buffer=io.BytesIO(data))),
        mock.patch.object(sys, "stdout", text),
    ):
        code = main(list(args))
    assert code == 0, (args, out.getvalue())
    return out.getvalue()


def stream_command(verb: str, url: str, host: str, done: Path | None = None) -> str:
    """The shell command QEMU runs for ``exec:`` migration (no commas in it)."""
    command = f"{sys.executable} -m iscsi_vmtarget state {verb} {url} --initiator-name {host}"
    return f"{command}; echo $? > {done}" if done else command


def suspend(machine: Machine, url: str, host: str, workdir: Path) -> int:
    """QMP stop, migrate to the push client, wait until it has finished; the last
    count printed before the stop."""
    machine.qmp.execute("stop")
    time.sleep(1.0)  # the console lines already on their way
    last = machine.counts[-1]
    done = workdir / f"{machine.name}.pushed"
    machine.qmp.execute("migrate", uri=f"exec:{stream_command('push', url, host, done)}")
    machine.wait_migrated()
    deadline = time.monotonic() + WAIT
    while not (done.exists() and done.read_text().strip()):
        assert time.monotonic() < deadline, f"the push never finished\n{machine.console}"
        time.sleep(0.1)
    assert done.read_text().strip() == "0", machine.console
    machine.quit()
    return last


def resume(args: list[str], url: str, host: str, workdir: Path, name: str) -> Machine:
    """A QEMU that takes its machine from the pull client, then runs (``cont``)."""
    incoming = ["-S", "-incoming", f"exec:{stream_command('pull', url, host)}"]
    machine = Machine([*args, "-iscsi", f"initiator-name={host}", *incoming], workdir, name)
    machine.wait_migrated()
    machine.qmp.execute("cont")
    return machine


def naa_of(sg_vpd_di: str) -> bytes:
    found = re.search(r"designator type: NAA,\s+code set: Binary\s*\n\s+0x([0-9a-f]+)", sg_vpd_di)
    assert found, sg_vpd_di
    return bytes.fromhex(found.group(1))


def disk_log(target: RunningTarget, who: str) -> dict[int, str]:
    """Sector n -> the line on it, for every sector of LUN 0 holding one."""
    ini = Initiator(port=target.port, initiator_name=who, target_name=IQN)
    ini.login()
    try:
        blocks, size = ini.read_capacity16(0)
        data = b"".join(ini.read16(lba, 2048, size) for lba in range(0, blocks, 2048))
    finally:
        ini.logout()
        ini.close()
    out = {}
    for n in range(blocks):
        sector = data[n * size : (n + 1) * size]
        if sector.startswith(TAG.encode()):
            out[n] = sector.split(b"\n", 1)[0].decode()
    return out


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="hv-", dir="/tmp"))  # short: QMP socket paths
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_suspend_snapshot_revert_resume_on_another_host(guest_dir: Path, workdir: Path) -> None:
    need("qemu-system-x86_64")
    state = workdir / "state"
    with VmManager(StateDir.at(str(state))) as manager:
        manager.create(VM, disk=8 * MIB, memory=MEMORY)
        naa = manager.find(VM).base.header.naa
    for host, view in ((HOST_A, "hypervisor"), (HOST_B, "hypervisor"), (BACKUP, "raw")):
        cli("acl", "add", "--vm", VM, host, "--view", view, "--state-dir", str(state))
    config = f'state_dir = "{state}"\nexport_vms = true\n'
    target = start_with_config(workdir / "serve", config, "--state-dir", str(state))
    url = f"iscsi://127.0.0.1:{target.port}/{IQN}"
    marker = "HVRAM-" + secrets.token_hex(12)
    initrd = workdir / "initrd.cpio"
    initrd.write_bytes(
        (guest_dir / "initrd.cpio").read_bytes() + guest_tools.script_cpio(guest_script(marker))
    )
    machine_args = [  # the machine description the config region holds
        "-accel", "tcg", "-m", f"{MEMORY // MIB}M", "-smp", "1", "-nodefaults", "-no-reboot",
        "-kernel", str(guest_dir / "vmlinuz"), "-initrd", str(initrd),
        "-append", "console=ttyS0 panic=-1 loglevel=1 rdinit=/init",
        "-device", "virtio-scsi-pci,id=s0",
        "-drive", f"file={url}/0,format=raw,if=none,id=d0,cache=none",
        "-device", "scsi-block,drive=d0,bus=s0.0,channel=0,scsi-id=0,lun=0",
    ]  # fmt: skip
    description = json.dumps({"qemu": machine_args}).encode()
    cli("config", "push", url, "--initiator-name", HOST_A, data=description)
    machines: list[Machine] = []
    try:
        # 1-2: boot on host A, count, suspend into the unit
        a = Machine([*machine_args, "-iscsi", f"initiator-name={HOST_A}"], workdir, "a")
        machines.append(a)
        a.wait_count(3)
        at_snapshot = suspend(a, url, HOST_A, workdir)
        # 3: the storage-layer snapshot, a later suspend over it, the revert
        cli("vm", "snapshot", VM, "s1", "--state-dir", str(state))
        later = resume(machine_args, url, HOST_A, workdir, "a2")
        machines.append(later)
        later.wait_count(at_snapshot + 5)  # further than B will get
        at_later = suspend(later, url, HOST_A, workdir)
        assert later.counts[0] == at_snapshot + 1
        cli("vm", "revert", VM, "s1", "--state-dir", str(state))
        # 4: host B, from the description it pulls
        pulled = json.loads(cli("config", "pull", url, "--initiator-name", HOST_B))
        assert pulled == {"qemu": machine_args}
        b = resume(pulled["qemu"], url, HOST_B, workdir, "b")
        machines.append(b)
        b.wait_count(at_snapshot + 2)
        assert b.counts[0] == at_snapshot + 1, (at_snapshot, at_later, b.counts)
        resumed_di = b.step("vpd-di:resumed", "sg_vpd -p di $d0")
        b.wait_count(at_snapshot + 3)
        b.qmp.execute("stop")
        time.sleep(1.0)
        last = b.counts[-1]
        b.quit()
        assert naa_of(resumed_di) == naa  # the unit's own designator, after all this
        log = disk_log(target, HOST_B)
        assert sorted(log) == list(range(1, max(log) + 1))  # no gap
        assert max(log) in (last, last + 1) and max(log) < at_later  # the later run: gone
        assert all(line == f"{TAG} {n:06d}" for n, line in log.items())
        # 5: the machine's RAM is in the stream, sealed at rest, ciphertext in raw view
        stream = cli("state", "pull", url, "--initiator-name", HOST_B)
        assert marker.encode() in stream
        for path in state.rglob("*"):
            if path.is_file():
                assert marker.encode() not in path.read_bytes(), path
        raw = Initiator(port=target.port, initiator_name=BACKUP, target_name=IQN)
        raw.login()
        try:
            blocks, size = raw.read_capacity16(0)
            tail = b""
            for lba in range(0, blocks, 2048):
                piece = tail + raw.read16(lba, min(2048, blocks - lba), size)
                assert marker.encode() not in piece
                tail = piece[-len(marker) :]
        finally:
            raw.logout()
            raw.close()
    finally:
        for machine in machines:
            if machine.proc.poll() is None:
                machine.proc.kill()
        target.stop()
