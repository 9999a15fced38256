"""The state-stream row of ``tools/bench`` (issue 14): a state image pushed into and
pulled out of a VM's state LUN (hypervisor view: every chunk sealed with AES-256-GCM on
the way in, opened on the way out) beside a plain file LUN written and read
sequentially in 1 MiB commands by the same client, in the same run, on one target.

Both sides use the project's initiator (:mod:`iscsi_vmtarget.client`) with 1 MiB
commands: ``state push`` and ``state pull`` as they are (:data:`.window.DEPTH` commands
in flight), the plain LUN one command at a time (QD1, the row's yardstick).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..cli.main import main as cli
from ..client.region_stream import pull, push
from ..client.remote import LunUrl, open_lun
from ..client.window import DEPTH
from ..server.hypervisor_view import STATE_LUN
from ..server.vm_luns import DEFAULT_BASE_IQN
from ..vm import StateDir, VmManager
from .crash import start

MIB = 1 << 20
HOST = "iqn.2026-11.org.iscsi-vmtarget:bench-hypervisor"
PLAIN_IQN = "iqn.2026-11.org.iscsi-vmtarget:bench-plain"


@dataclass
class StateRow:
    """MB/s (10^6 bytes) of each transfer."""

    size: int
    push: float
    pull: float
    plain_write: float
    plain_read: float

    @property
    def push_ratio(self) -> float:
        return self.push / self.plain_write

    @property
    def pull_ratio(self) -> float:
        return self.pull / self.plain_read

    def table(self) -> str:
        mib = self.size // MIB
        return (
            f"state stream ({mib} MiB, 1 MiB x QD{DEPTH})      MB/s   plain QD1   ratio\n"
            f"  state push (sealed)   {self.push:14,.1f}   {self.plain_write:9,.1f}   "
            f"{self.push_ratio:5.2f}\n"
            f"  state pull (opened)   {self.pull:14,.1f}   {self.plain_read:9,.1f}   "
            f"{self.pull_ratio:5.2f}"
        )


def _serve(workdir: Path, state: Path, plain: Path, size: int) -> tuple[subprocess.Popen[str], int]:
    config = workdir / "target.toml"
    config.write_text(
        f'state_dir = "{state}"\nexport_vms = true\nnop_interval = 0\n'
        '[[portal]]\nlisten = "127.0.0.1:0"\n\n'
        f'[[target]]\nname = "{PLAIN_IQN}"\nallow_all = true\n\n'
        f'[[target.lun]]\nnumber = 0\npath = "{plain}"\nsize = "{size // MIB}M"\n'
    )
    return start(config, workdir / "target.log")


class _Check:
    """Where ``pull`` writes in the bench: each piece is compared with the image as it
    comes (about what a pipe to QEMU costs: one copy), nothing is kept."""

    def __init__(self, image: bytes) -> None:
        self.image, self.pos, self.same = image, 0, True

    def write(self, data: bytes | memoryview) -> int:
        n = len(data)
        self.same = self.same and self.image[self.pos : self.pos + n] == data
        self.pos += n
        return n

    def flush(self) -> None:
        pass


def _rate(size: int, seconds: float) -> float:
    return size / seconds / 1e6


def run(workdir: Path, size: int = 256 * MIB) -> StateRow:
    """Measure one row in ``workdir`` (a VM with ``size`` bytes of memory, a plain LUN
    of ``size`` bytes); the caller removes the folder."""
    state = workdir / "state"
    with VmManager(StateDir.at(str(state))) as manager:
        manager.create("bench", disk=4 * MIB, memory=size)
    with open(os.devnull, "w") as quiet:
        sys_stdout, sys.stdout = sys.stdout, quiet
        try:
            cli(["acl", "add", "--vm", "bench", HOST, "--view", "hypervisor",
                 "--state-dir", str(state)])  # fmt: skip
        finally:
            sys.stdout = sys_stdout
    proc, port = _serve(workdir, state, workdir / "plain.lun", size)
    image = os.urandom(size)
    try:
        vm_iqn = f"{DEFAULT_BASE_IQN}:vm.bench"
        lun = open_lun(LunUrl("127.0.0.1", port, vm_iqn, STATE_LUN), initiator_name=HOST)
        try:
            t0 = time.monotonic()
            push(lun, io.BytesIO(image))
            t1 = time.monotonic()
            out = _Check(image)
            pull(lun, out)  # type: ignore[arg-type]
            t2 = time.monotonic()
        finally:
            lun.close()
        if not out.same or out.pos != len(image):
            raise RuntimeError("the pulled state differs from the pushed one")
        plain = open_lun(LunUrl("127.0.0.1", port, PLAIN_IQN, 0), initiator_name=HOST)
        try:
            t3 = time.monotonic()
            view = memoryview(image)
            for pos in range(0, size, MIB):
                plain.write(pos, view[pos : pos + MIB])
            plain.flush()
            t4 = time.monotonic()
            for pos in range(0, size, MIB):
                plain.read(pos, MIB)
            t5 = time.monotonic()
        finally:
            plain.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return StateRow(
        size, _rate(size, t1 - t0), _rate(size, t2 - t1), _rate(size, t4 - t3), _rate(size, t5 - t4)
    )
