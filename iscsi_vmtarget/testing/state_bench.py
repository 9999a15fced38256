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
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..cli.main import main as cli
from ..client.region_stream import pull, push
from ..client.remote import LunUrl, open_lun
from ..client.window import DEPTH
from ..server.hypervisor_view import STATE_LUN
from ..server.vm_luns import DEFAULT_BASE_IQN
from ..vm import StateDir, VmManager
from .crash import start
from .process import cpu_seconds

MIB = 1 << 20
HOST = "iqn.2026-11.org.iscsi-vmtarget:bench-hypervisor"
PLAIN_IQN = "iqn.2026-11.org.iscsi-vmtarget:bench-plain"


@dataclass
class StateRow:
    """Medians over the rounds: MB/s (10^6 bytes) of each transfer, the ratio of each
    round (the state transfer against the plain one next to it) and CPU seconds
    (target, client) of each transfer."""

    size: int
    push: float
    pull: float
    plain_write: float
    plain_read: float
    push_ratios: list[float] = field(default_factory=list)
    pull_ratios: list[float] = field(default_factory=list)
    cpu: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def push_ratio(self) -> float:
        return statistics.median(self.push_ratios)

    @property
    def pull_ratio(self) -> float:
        return statistics.median(self.pull_ratios)

    def table(self) -> str:
        mib = self.size // MIB

        def line(name: str, rate: float, plain: float, ratios: list[float], cpu: str) -> str:
            spread = f"{min(ratios):.2f}-{max(ratios):.2f}"
            tcpu, ccpu = self.cpu.get(cpu, (0.0, 0.0))
            return (
                f"  {name}   {rate:9,.1f}   {plain:9,.1f}   {statistics.median(ratios):5.2f}"
                f"  {spread:9}   {tcpu:5.2f} / {ccpu:4.2f}"
            )

        return "\n".join([
            f"state stream ({mib} MiB, 1 MiB x QD{DEPTH}; plain QD1), medians of "
            f"{len(self.push_ratios)} rounds",
            "                           MB/s   plain MB/s   ratio  (rounds)    CPU s target/client",
            line("state push (sealed)", self.push, self.plain_write, self.push_ratios, "push"),
            line("state pull (opened)", self.pull, self.plain_read, self.pull_ratios, "pull"),
            f"  CPU s of the plain LUN: write {self._cpu('write')}, read {self._cpu('read')}",
        ])  # fmt: skip

    def _cpu(self, phase: str) -> str:
        tcpu, ccpu = self.cpu.get(phase, (0.0, 0.0))
        return f"{tcpu:.2f} / {ccpu:.2f}"


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


def run(workdir: Path, size: int = 256 * MIB, rounds: int = 3) -> StateRow:
    """Measure one row in ``workdir`` (a VM with ``size`` bytes of memory, a plain LUN
    of ``size`` bytes): ``rounds`` times push, plain write, pull, plain read (every
    other round each pair the other way round); the caller removes the folder. The
    first push fills an empty region, the next ones rewrite it (as a later suspend)."""
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
    view = memoryview(image)
    seconds: dict[str, list[float]] = {}
    cpu: dict[str, list[tuple[float, float]]] = {}

    def timed(phase: str, work: Callable[[], object]) -> None:
        target, client, t0 = cpu_seconds(proc.pid), time.process_time(), time.monotonic()
        work()
        seconds.setdefault(phase, []).append(time.monotonic() - t0)
        used = (cpu_seconds(proc.pid) - target, time.process_time() - client)
        cpu.setdefault(phase, []).append(used)

    def pulled() -> None:
        out = _Check(image)
        pull(lun, out)  # type: ignore[arg-type]
        if not out.same or out.pos != len(image):
            raise RuntimeError("the pulled state differs from the pushed one")

    def plain_write() -> None:
        for pos in range(0, size, MIB):
            plain.write(pos, view[pos : pos + MIB])
        plain.flush()

    def plain_read() -> None:
        for pos in range(0, size, MIB):
            plain.read(pos, MIB)

    try:
        vm_iqn = f"{DEFAULT_BASE_IQN}:vm.bench"
        lun = open_lun(LunUrl("127.0.0.1", port, vm_iqn, STATE_LUN), initiator_name=HOST)
        plain = open_lun(LunUrl("127.0.0.1", port, PLAIN_IQN, 0), initiator_name=HOST)
        try:
            for round_ in range(rounds):  # each pair side by side, in turns first
                writes = [("push", lambda: push(lun, io.BytesIO(image))), ("write", plain_write)]
                reads = [("pull", pulled), ("read", plain_read)]
                for phase, work in (
                    (writes + reads) if round_ % 2 == 0 else (writes[::-1] + reads[::-1])
                ):
                    timed(phase, work)
        finally:
            lun.close()
            plain.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    rate = {phase: statistics.median(size / t / 1e6 for t in ts) for phase, ts in seconds.items()}
    return StateRow(
        size,
        rate["push"],
        rate["pull"],
        rate["write"],
        rate["read"],
        [w / p for p, w in zip(seconds["push"], seconds["write"], strict=True)],
        [r / p for p, r in zip(seconds["pull"], seconds["read"], strict=True)],
        {
            phase: (
                statistics.median(t for t, _ in used),
                statistics.median(c for _, c in used),
            )
            for phase, used in cpu.items()
        },
    )
