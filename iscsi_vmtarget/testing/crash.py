"""kill -9 cycles: write through our own initiator, kill the target, restart, verify.

Each cycle starts ``iscsi-vmtarget serve`` on the same state, writes blocks with
WRITE(10) FUA=1 or with WRITE(10) + SYNCHRONIZE CACHE(10) from a thread, logs what was
acknowledged, SIGKILLs the target at a random moment, restarts it and reads every
block back. A block must hold its last acknowledged content, or the content of a write
to it that was in flight (sent, not acknowledged) when the target died.

What this proves, honestly: an acknowledged write reached the kernel (page cache or
disk) before its GOOD status, and the target's restart finds it; the target keeps no
acknowledged data in its own memory. A process kill does not drop the page cache, so it
does not prove the fdatasync itself - tests/integration/test_crash_consistency.py
checks at the code level that FUA and SYNCHRONIZE CACHE flush the backend before status.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..client import Initiator

TARGET = "iqn.2026-11.org.iscsi-vmtarget:crash"
BLOCK = 512


@dataclass
class CrashStats:
    cycles: int = 0
    writes_acked: int = 0
    blocks_verified: int = 0
    kills_mid_write: int = 0
    failures: list[str] = field(default_factory=list)


def write_config(workdir: Path, lun_bytes: int) -> Path:
    conf = workdir / "crash.toml"
    conf.write_text(
        f'state_dir = "{workdir / "state"}"\n'
        "nop_interval = 0\n"
        "[[portal]]\n"
        'listen = "127.0.0.1:0"\n'
        "[[target]]\n"
        f'name = "{TARGET}"\n'
        "[[target.lun]]\n"
        "number = 0\n"
        f'path = "{workdir / "lun0.img"}"\n'
        f'size = "{lun_bytes}"\n'
    )
    return conf


def python_env() -> dict[str, str]:
    """The environment for ``python -m iscsi_vmtarget`` children: this package is
    importable from wherever the caller runs (tools/ scripts run from anywhere)."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def start(
    conf: Path, log: Path, env: dict[str, str] | None = None, module: list[str] | None = None
) -> tuple[subprocess.Popen[str], int]:
    """Start the target (``env`` added to its environment, e.g. a crash point; ``module``
    the ``-m`` arguments that run the CLI, e.g. under a recorder); return it and its port
    once it says ``ready``."""
    proc = subprocess.Popen(
        [sys.executable, "-m", *(module or ["iscsi_vmtarget"]), "serve", "--config", str(conf)],
        stdout=subprocess.PIPE,
        stderr=open(log, "a"),
        text=True,
        env={**python_env(), **(env or {})},
    )
    assert proc.stdout is not None
    port = 0
    for line in proc.stdout:
        if line.startswith("listening on "):
            port = int(line.split()[-1].rpartition(":")[2])
        elif line.startswith("ready"):
            return proc, port
    raise RuntimeError(f"target did not start: {log.read_text()[-2000:]}")


def content(cycle: int, seq: int, lba: int) -> bytes:
    """A block that names its write: cycle, sequence number and LBA, hashed to 512 bytes."""
    seed = f"{cycle}:{seq}:{lba}".encode()
    return b"".join(hashlib.sha256(seed + bytes([i])).digest() for i in range(BLOCK // 32))


def write10(lba: int, fua: bool) -> bytes:
    return bytes([0x2A, 0x08 if fua else 0]) + lba.to_bytes(4, "big") + b"\x00\x00\x01\x00"


def read10(lba: int, blocks: int) -> bytes:
    return bytes([0x28, 0]) + lba.to_bytes(4, "big") + b"\x00" + blocks.to_bytes(2, "big") + b"\0"


class Writer(threading.Thread):
    """Writes until the connection breaks; ``allowed`` holds each LBA's possible contents."""

    def __init__(self, port: int, cycle: int, blocks: int, allowed: dict[int, set[bytes]]):
        super().__init__(daemon=True)
        self.port, self.cycle, self.blocks, self.allowed = port, cycle, blocks, allowed
        self.acked = 0
        self.in_flight = False
        self.rng = random.Random(cycle)

    def run(self) -> None:
        try:
            ini = Initiator(port=self.port, target_name=TARGET, timeout=20)
            ini.login()
            ini.command(bytes(6))  # POWER ON unit attention
            seq = 0
            while True:
                fua = self.rng.random() < 0.5
                batch = [self.rng.randrange(self.blocks) for _ in range(1 if fua else 4)]
                pending: list[tuple[int, bytes]] = []
                self.in_flight = True
                for lba in batch:
                    seq += 1
                    data = content(self.cycle, seq, lba)
                    self.allowed.setdefault(lba, {bytes(BLOCK)}).add(data)  # maybe
                    rsp = ini.command(write10(lba, fua), data_out=data)
                    if rsp.status:
                        raise RuntimeError(f"write status {rsp.status}")
                    pending.append((lba, data))
                if not fua:
                    rsp = ini.command(bytes([0x35]) + bytes(9))  # SYNCHRONIZE CACHE(10)
                    if rsp.status:
                        raise RuntimeError(f"sync status {rsp.status}")
                # Acknowledged: from now on only this content (or a later write) is right.
                for lba, data in pending:
                    self.allowed[lba] = {data}
                    self.acked += 1
                self.in_flight = False
        except Exception:
            return  # the target was killed: expected


def run_cycles(
    workdir: Path,
    cycles: int,
    lun_bytes: int = 4 << 20,
    max_run: float = 1.0,
    seed: int = 1,
    progress: bool = False,
) -> CrashStats:
    workdir.mkdir(parents=True, exist_ok=True)
    conf = write_config(workdir, lun_bytes)
    log = workdir / "target.log"
    blocks = lun_bytes // BLOCK
    allowed: dict[int, set[bytes]] = {}
    stats = CrashStats()
    rng = random.Random(seed)
    for cycle in range(cycles):
        proc, port = start(conf, log)
        try:
            stats.failures += verify(port, blocks, allowed, cycle)
            stats.blocks_verified += sum(1 for v in allowed.values() if len(v) == 1)
            writer = Writer(port, cycle, blocks, allowed)
            writer.start()
            time.sleep(rng.uniform(0.05, max_run))
            stats.kills_mid_write += writer.in_flight
        finally:
            proc.kill()  # SIGKILL: no shutdown code runs
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        writer.join(30)
        stats.writes_acked += writer.acked
        stats.cycles += 1
        if progress:
            print(
                f"cycle {cycle + 1}/{cycles}: {writer.acked} writes acked, "
                f"{stats.blocks_verified} block checks so far, {len(stats.failures)} failures",
                flush=True,
            )
    proc, port = start(conf, log)
    try:
        stats.failures += verify(port, blocks, allowed, cycles)
        stats.blocks_verified += sum(1 for v in allowed.values() if len(v) == 1)
    finally:
        proc.kill()
        proc.wait()
    return stats


def verify(port: int, blocks: int, allowed: dict[int, set[bytes]], cycle: int) -> list[str]:
    """Read the whole LUN; every written block must hold one of its allowed contents."""
    ini = Initiator(port=port, target_name=TARGET, timeout=20)
    ini.login()
    ini.command(bytes(6))
    failures = []
    step = 2048
    for first in range(0, blocks, step):
        n = min(step, blocks - first)
        rsp = ini.command(read10(first, n), read_length=n * BLOCK)
        if rsp.status:
            return [f"cycle {cycle}: read status {rsp.status}"]
        for lba in range(first, first + n):
            if lba in allowed:
                got = rsp.data[(lba - first) * BLOCK : (lba - first + 1) * BLOCK]
                if got not in allowed[lba]:
                    failures.append(f"cycle {cycle}: LBA {lba} lost its acknowledged write")
                else:
                    allowed[lba] = {got}  # what survived is now the state
    ini.logout()
    return failures
