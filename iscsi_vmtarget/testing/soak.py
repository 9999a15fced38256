"""A soak with admin churn (issue 17, ``tools/soak``): many verifying sessions on served
VMs while a loop runs admin operations through the CLI (which goes through the running
daemon), for a set time.

* ``vms`` VMs are served (``export_vms``); ``sessions`` sessions spread over the first
  ``vms - 2`` of them, each writing 4 KiB blocks to its own LBA range of LUN 0 and
  reading every one back at once (a unit attention - a resize's CAPACITY DATA HAS
  CHANGED - is retried by the initiator);
* the churn loop, every ``interval`` seconds, takes the next of: a snapshot of a written
  VM, deleting its oldest snapshot (a merge under writes), growing its disk by 1 MiB,
  moving it to the other pool and back, rotating the master key; and on the last two
  VMs (nobody writes them, so their content may change under nobody): a snapshot, a
  revert to it and its deletion; a linked clone (served at once), the clone's deletion
  and the deletion of the snapshot it came from. The soak keeps nothing it makes
  beyond the written VMs' snapshots (one taken, the oldest deleted, in turn), so the
  target's descriptors must be flat after warm-up;
* every 5 s the target's RSS and open descriptors are sampled (the curve is returned).

At the end: every session's errors (0 expected), the churn's failed commands, and an
offline ``discover`` on the stopped daemon's state (no damaged unit, no orphan, nothing
left to repair: no unit in a half state).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..client import Initiator
from ..server.vm_luns import vm_target_name
from .crash import python_env, start
from .process import open_fds, rss_bytes

INITIATOR = "iqn.2026-11.org.iscsi-vmtarget.test:soak"
BLOCK = 512
SPAN = 64  # 4 KiB places per session


@dataclass
class SoakStats:
    seconds: float = 0.0
    writes: int = 0
    errors: list[str] = field(default_factory=list)
    churn: dict[str, int] = field(default_factory=dict)
    churn_failures: list[str] = field(default_factory=list)
    curve: list[tuple[float, int, int]] = field(default_factory=list)  # s, RSS, fds
    leftovers: list[str] = field(default_factory=list)

    def summary(self) -> str:
        rss = [r >> 20 for _, r, _ in self.curve] or [0]
        fds = [f for _, _, f in self.curve] or [0]
        return (f"{self.seconds:.0f} s: {self.writes} verified writes, {len(self.errors)} "
                f"errors; churn {self.churn} with {len(self.churn_failures)} failures; RSS "
                f"{rss[0]} -> {max(rss)} -> {rss[-1]} MiB, fds {fds[0]} -> {max(fds)} -> "
                f"{fds[-1]}; after: {len(self.leftovers)} units in a half state")  # fmt: skip


def cli(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "iscsi_vmtarget", *args, "--state-dir", str(state)]
    return subprocess.run(argv, capture_output=True, text=True, env=python_env())


def setup(workdir: Path, vms: int) -> tuple[Path, Path]:
    state = workdir / "state"
    for i in range(vms):
        done = cli(state, "vm", "create", f"soak{i}", "--disk", "4M", "--memory", "1M")
        if done.returncode:
            raise RuntimeError(done.stderr)
    cli(state, "pool", "create", "other", "--path", str(workdir / "other"))
    for i in range(vms):
        cli(state, "acl", "add", "--vm", f"soak{i}", INITIATOR)
    conf = workdir / "soak.toml"
    conf.write_text(f'state_dir = "{state}"\nnop_interval = 0\nexport_vms = true\n'
                    '[[portal]]\nlisten = "127.0.0.1:0"\n')  # fmt: skip
    return state, conf


def _writer(port: int, vm: str, slot: int, stop: threading.Event, stats: SoakStats) -> None:
    rng = random.Random(f"{vm}:{slot}")
    try:
        ini = Initiator(port=port, target_name=vm_target_name(vm), initiator_name=INITIATOR,
                        isid=bytes.fromhex("40000137") + slot.to_bytes(2, "big"),
                        timeout=60)  # fmt: skip
        ini.login()
        base = slot * SPAN * 8
        while not stop.is_set():
            lba = base + rng.randrange(SPAN) * 8
            data = rng.randbytes(4096)
            ini.write16(lba, data, BLOCK)
            if ini.read16(lba, 8, BLOCK) != data:
                stats.errors.append(f"{vm} slot {slot}: LBA {lba} read back other data")
                return
            stats.writes += 1
        ini.logout()
    except Exception as exc:
        stats.errors.append(f"{vm} slot {slot}: {type(exc).__name__}: {exc}")


def _churn(state: Path, vms: int, interval: float, stop: threading.Event,
           stats: SoakStats) -> None:  # fmt: skip
    written = [f"soak{i}" for i in range(vms - 2)]
    idle = [f"soak{vms - 2}", f"soak{vms - 1}"]
    snaps: dict[str, list[str]] = {vm: [] for vm in written + idle}
    sizes = dict.fromkeys(written, 4)
    steps = ["snapshot", "delete", "resize", "move", "rotate", "revert", "clone"]
    n = 0
    while not stop.wait(interval):
        step = steps[n % len(steps)]
        vm = written[n % len(written)]
        n += 1
        if step == "snapshot":
            args: tuple[str, ...] = ("vm", "snapshot", vm, f"s{n}")
            snaps[vm].append(f"s{n}")
        elif step == "delete":
            victim = next((v for v in written if snaps[v]), None)
            if victim is None:
                continue
            args = ("vm", "snapshot", "delete", victim, snaps[victim].pop(0))
        elif step == "resize":
            if sizes[vm] >= 12:
                continue
            sizes[vm] += 1
            args = ("vm", "resize", vm, "--disk", f"{sizes[vm]}M")
        elif step == "move":
            pool = "other" if n % 2 else "default"
            args = ("vm", "move", vm, "--pool", pool)
        elif step == "rotate":
            args = ("key", "rotate")
        elif step == "revert":  # snapshot, revert to it, delete it: nothing kept
            target = idle[n % 2]
            _steps(state, stats, step, [
                ("vm", "snapshot", target, f"r{n}"),
                ("vm", "revert", target, f"r{n}"),
                ("vm", "snapshot", "delete", target, f"r{n}"),
            ])  # fmt: skip
            continue
        else:  # a linked clone, served at once; deleted, then the snapshot it came from
            source, clone = idle[n % 2], f"clone{n}"
            _steps(state, stats, step, [
                ("vm", "clone", source, clone),
                ("vm", "delete", "--force", clone),
                ("vm", "snapshot", "delete", source, f"clone-{clone}"),
            ])  # fmt: skip
            continue
        _steps(state, stats, step, [args])


def _steps(state: Path, stats: SoakStats, step: str, commands: list[tuple[str, ...]]) -> None:
    """Run one churn step's commands in order, stopping at the first that fails
    (counted in ``churn_failures``)."""
    stats.churn[step] = stats.churn.get(step, 0) + 1
    for args in commands:
        done = cli(state, *args)
        if done.returncode:
            stats.churn_failures.append(f"{' '.join(args)}: {done.stderr.strip()[:200]}")
            return


def run_soak(workdir: Path, seconds: float, vms: int = 16, sessions: int = 64,
             interval: float = 3.0, progress: bool = False) -> SoakStats:  # fmt: skip
    workdir.mkdir(parents=True, exist_ok=True)
    state, conf = setup(workdir, vms)
    proc, port = start(conf, workdir / "target.log")
    stats = SoakStats()
    stop = threading.Event()
    try:
        written = vms - 2
        threads = [threading.Thread(target=_writer, daemon=True,
                                    args=(port, f"soak{i % written}", i // written, stop, stats))
                   for i in range(sessions)]  # fmt: skip
        threads.append(threading.Thread(target=_churn, args=(state, vms, interval, stop, stats),
                                        daemon=True))  # fmt: skip
        started = time.monotonic()
        for t in threads:
            t.start()
        while time.monotonic() - started < seconds:
            time.sleep(5)
            stats.curve.append((time.monotonic() - started, rss_bytes(proc.pid),
                                open_fds(proc.pid)))  # fmt: skip
            if progress:
                print(f"{stats.curve[-1][0]:.0f} s: {stats.writes} writes, RSS "
                      f"{stats.curve[-1][1] >> 20} MiB, fds {stats.curve[-1][2]}, "
                      f"{len(stats.errors)} errors", flush=True)  # fmt: skip
        stop.set()
        for t in threads:
            t.join(120)
        stats.seconds = time.monotonic() - started
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    found = cli(state, "discover", "--json")
    doc = json.loads(found.stdout) if found.returncode == 0 else {}
    stats.leftovers = [json.dumps(x) for k in ("damaged", "orphan_secondaries")
                       for x in doc.get(k, [])]  # fmt: skip
    again = json.loads(cli(state, "discover", "--json").stdout or "{}")
    stats.leftovers += [json.dumps(x) for x in again.get("repaired", [])]
    return stats


__all__ = ["SoakStats", "run_soak"]
