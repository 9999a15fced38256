"""kill -9 of a serving daemon in the middle of VM admin operations, then discover and
verify (the "during snapshot, merge, resize and key rotation" half of issue 9).

One VM (a 4 MiB disk on LUN 0, a 2 MiB secondary disk on LUN 1, an encrypted state
image) is served by ``iscsi-vmtarget serve``. Each cycle:

1. start the daemon on the state directory; verify both disks through iSCSI (every
   block holds its last acknowledged write, or a write that was in flight at the kill,
   and a block never written - the grown part of a resized disk included - reads zero;
   READ CAPACITY gives the old or the new size of an unacknowledged resize);
2. a writer thread writes through our own initiator with FUA and with WRITE +
   SYNCHRONIZE CACHE, logging what was sent and what was acknowledged;
3. one admin operation runs against the daemon: ``vm.snapshot``, ``vm.snapshot.delete``
   (the record goes, its layer merges live or at the next repair) or ``vm.resize`` over
   the admin socket, or ``key rotate`` as its own process;
4. SIGKILL lands at a random moment, mostly inside the operation (the delay is drawn
   from the operation's measured duration), sometimes just after it was acknowledged;
   a key rotation process is killed with the daemon (a host crash);
5. ``iscsi-vmtarget discover`` repairs (now and then itself killed at a random moment
   and run again: a crash inside the merge or the resize roll-forward); then, offline:
   nothing damaged, a second discover repairs nothing, every acknowledged snapshot
   exists and every snapshot reads a point-in-time image (each block as acknowledged
   before the snapshot began, or as written while it ran) and, once read, exactly the
   same bytes ever after; a deleted snapshot is gone; the state decrypts to the image
   written at the start and the VM's config is whole; after an acknowledged rotation
   every unit key is wrapped under the new master key.

What this proves and does not: as in :mod:`.crash`, a process kill keeps the page
cache, so it checks the ordering of the metadata commits and that nothing acknowledged
lives only in the daemon's memory, not the fsyncs themselves (the offline tests with
crash points, tests/vm/test_crash.py and test_snapshot_crash.py, cover the commit
points one by one).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..client import Initiator, InitiatorError
from ..client.initiator import DEFAULT_INITIATOR, ScsiCommandError
from ..server.admin import call, call_daemon
from ..server.vm_luns import DEFAULT_BASE_IQN
from ..vm import StateDir, VmError, VmManager
from ..vm.faults import ENV
from ..vm.format.crypto import pending_path
from ..vm.operations import snapshot as snaps
from .crash import BLOCK, content, python_env, read10, start, write10

VM = "crashvm"
TARGET = f"{DEFAULT_BASE_IQN}:vm.{VM}"
MIB = 1 << 20
DISKS = {0: 4 * MIB, 1: 2 * MIB}  # LUN -> disk bytes at creation
MEMORY = MIB
STATE_IMAGE = b"".join(hashlib.sha256(b"state %d" % i).digest() for i in range(9000))
MAX_DISK = 8 * MIB  # resizes grow LUN 0 by 1 MiB up to this, then the state region
MAX_SNAPSHOTS = 3
OPS = ("resize", "snapshot", "rotate", "delete")
ZERO = bytes(BLOCK)
SYNC10 = bytes([0x35]) + bytes(9)

Contents = dict[int, dict[int, set[bytes]]]  # LUN -> LBA -> the contents it may hold


@dataclass
class VmCrashStats:
    cycles: int = 0
    ops: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OPS, 0))
    acknowledged: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OPS, 0))
    killed_inside: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OPS, 0))
    at_crash_point: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OPS, 0))
    repairs_killed: int = 0
    writes_acked: int = 0
    blocks_verified: int = 0
    snapshot_reads: int = 0
    failures: list[str] = field(default_factory=list)

    def summary(self) -> str:
        per_op = ", ".join(
            f"{op} {self.ops[op]} ({self.killed_inside[op]} killed inside, "
            f"{self.at_crash_point[op]} of them at a commit point, "
            f"{self.acknowledged[op]} acknowledged)"
            for op in OPS
        )
        return (
            f"{self.cycles} kill -9 cycles: {per_op}; {self.repairs_killed} repairs killed; "
            f"{self.writes_acked} acknowledged writes, {self.blocks_verified} block checks, "
            f"{self.snapshot_reads} snapshot image reads, {len(self.failures)} failures"
        )


@dataclass
class Snapshot:
    """What one snapshot may read: the contents at its start plus the writes sent
    until it was acknowledged (or the daemon died); its image hashes once read."""

    allowed: Contents
    sizes: dict[int, int]
    sent_from: int
    acked: bool = False
    deleting: bool = False
    hashes: dict[int, str] | None = None


class Model:
    """What the disks and snapshots may hold, fed by the writer and the operations."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sizes = dict(DISKS)  # LUN -> disk bytes as last seen
        self.resize_to: int | None = None  # an unacknowledged resize of LUN 0
        self.memory_resizes = 0
        self.allowed: Contents = {lun: {} for lun in DISKS}
        self.sent: list[tuple[int, int, bytes]] = []
        self.snapshots: dict[str, Snapshot] = {}
        self.rotated = False  # a rotation was acknowledged since the last check
        self.config: dict[str, object] = {}  # the VM config but its sizes, from setup

    def sending(self, lun: int, lba: int, data: bytes) -> None:
        with self.lock:
            self.allowed[lun].setdefault(lba, {ZERO}).add(data)
            self.sent.append((lun, lba, data))

    def acknowledged(self, lun: int, writes: list[tuple[int, bytes]]) -> None:
        with self.lock:
            for lba, data in writes:
                self.allowed[lun][lba] = {data}

    def snapshot_begins(self, name: str) -> Snapshot:
        with self.lock:
            snap = Snapshot(copy.deepcopy(self.allowed), dict(self.sizes), len(self.sent))
        self.snapshots[name] = snap
        return snap

    def snapshot_ends(self, snap: Snapshot) -> None:
        """Writes sent while the snapshot ran may or may not be in it."""
        with self.lock:
            for lun, lba, data in self.sent[snap.sent_from :]:
                snap.allowed[lun].setdefault(lba, {ZERO}).add(data)


class Writer(threading.Thread):
    """Writes both disks until the connection breaks. Unit attentions (a resize's
    CAPACITY DATA HAS CHANGED) are retried; any other error status is a failure."""

    def __init__(self, port: int, cycle: int, model: Model) -> None:
        super().__init__(daemon=True)
        self.port, self.cycle, self.model = port, cycle, model
        self.acked = 0
        self.error: str | None = None
        self.rng = random.Random(cycle)

    def run(self) -> None:
        try:
            ini = Initiator(port=self.port, target_name=TARGET, timeout=30)
            ini.login()
            for lun in DISKS:
                ini.command(bytes(6), lun=lun)  # the power-on unit attention
            seq = 0
            while True:
                lun = self.rng.choice(list(DISKS))
                fua = self.rng.random() < 0.5
                blocks = DISKS[lun] // BLOCK
                done: list[tuple[int, bytes]] = []
                for lba in [self.rng.randrange(blocks) for _ in range(1 if fua else 3)]:
                    seq += 1
                    data = content(self.cycle, seq, lba + (lun << 32))
                    self.model.sending(lun, lba, data)
                    ini.scsi(f"LUN {lun} WRITE(10)", write10(lba, fua), lun, data)
                    done.append((lba, data))
                if not fua:
                    ini.scsi(f"LUN {lun} SYNCHRONIZE CACHE(10)", SYNC10, lun)
                self.model.acknowledged(lun, done)
                self.acked += len(done)
        except ScsiCommandError as exc:  # a wrong status (unit attentions are retried)
            self.error = f"writer: {exc}"
        except (InitiatorError, OSError):
            return  # the daemon was killed: expected
        except Exception as exc:  # the test fails on it
            self.error = f"writer: {exc}"


class Operation(threading.Thread):
    """One admin operation, over the admin socket or as a ``key rotate`` process;
    ``acked`` once its success reached us (a reply proves the operation finished)."""

    def __init__(
        self, state: Path, kind: str, args: dict[str, object], env: dict[str, str]
    ) -> None:
        super().__init__(daemon=True)
        self.state, self.kind, self.args, self.env = state, kind, args, env
        self.acked = False
        self.error: str | None = None
        self.proc: subprocess.Popen[str] | None = None
        self.started = self.finished = 0.0

    def run(self) -> None:
        self.started = time.monotonic()
        try:
            if self.kind == "rotate":
                self.proc = subprocess.Popen(
                    _cli("key", "rotate", "--state-dir", str(self.state)),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env={**python_env(), **self.env},
                )
                out, err = self.proc.communicate()
                if self.proc.returncode == 0:
                    self.acked = True
                elif self.proc.returncode != -signal.SIGKILL:
                    self.error = f"key rotate exited {self.proc.returncode}: {err or out}"
            else:
                call_daemon(str(self.state), self.kind, self.args, timeout=60)
                self.acked = True
        except Exception as exc:  # a refusal, or the daemon died under the call
            self.error = f"{self.kind}: {exc}"
        self.finished = time.monotonic()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()

    @property
    def killed_itself(self) -> bool:
        """A ``key rotate`` that died of SIGKILL before we killed anything."""
        return self.proc is not None and self.proc.poll() == -signal.SIGKILL


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "iscsi_vmtarget", *args]


def setup(workdir: Path) -> tuple[Path, Path]:
    """The state directory with the VM and its state image, and the serve config."""
    state = workdir / "state"
    with VmManager(StateDir.at(str(state))) as manager:
        manager.create(VM, disk=DISKS[0], memory=MEMORY, secondaries=(DISKS[1],))
        manager.write_state(VM, io.BytesIO(STATE_IMAGE), len(STATE_IMAGE))
    call(str(state), "acl.default.add", {"initiator": DEFAULT_INITIATOR})  # the writer's
    conf = workdir / "vm-crash.toml"
    conf.write_text(
        f'state_dir = "{state}"\nnop_interval = 0\nexport_vms = true\n'
        '[[portal]]\nlisten = "127.0.0.1:0"\n'
    )
    return state, conf


#: Commit points (:mod:`iscsi_vmtarget.vm.faults`) inside each operation, for the
#: cycles that kill there instead of at a random moment.
CRASH_POINTS = {
    "snapshot": ("snapshot.deltas", "snapshot.record", "snapshot.committed", "header.torn"),
    "delete": ("snapshot.deleted", "merge.copying", "merge.copied"),  # merges live, or not
    "resize": (
        "resize.extended",
        "resize.journaled",
        "resize.moving",
        "resize.moved",
        "resize.scrubbed",
        "region.written",  # the config rewrite after the growth
        "region.staged",
        "region.unstaged",
        "header.torn",
        "header.committed",
    ),
    "rotate": ("key.written", "header.torn", "header.committed"),
}
#: ... and inside the repair that follows (the merge of a deleted snapshot's layer).
REPAIR_POINTS = ("merge.copying", "merge.copied", "header.torn", "header.committed")


def run_cycles(
    workdir: Path,
    cycles: int,
    seed: int = 1,
    progress: Callable[[str], None] | None = None,
) -> VmCrashStats:
    workdir.mkdir(parents=True, exist_ok=True)
    state, conf = setup(workdir)
    log = workdir / "target.log"
    rng = random.Random(seed)
    model = Model()
    with VmManager(StateDir.at(str(state))) as manager:
        model.config = {k: v for k, v in manager.config(VM).items() if k not in ("disks", "memory")}
    stats = VmCrashStats()
    durations = {"resize": 0.03, "snapshot": 0.05, "delete": 0.03, "rotate": 0.4}
    for cycle in range(cycles):
        short = _choose(cycle, rng, model)
        point = rng.choice(CRASH_POINTS[short]) if rng.random() < 0.4 else None
        armed = {ENV: point} if point else {}
        proc, port = start(conf, log, armed if short != "rotate" else None)
        try:
            stats.failures += _verify_live(port, model, cycle, stats)
            writer = Writer(port, cycle, model)
            writer.start()
            time.sleep(rng.uniform(0.05, 0.4))  # writes under way before the operation
            if short == "delete" and not _snapshot_names(model):
                try:
                    _snapshot_now(state, model, f"d{cycle}")  # something to delete
                except Exception as exc:  # the daemon alive and unharmed must take it
                    stats.failures.append(f"cycle {cycle}: snapshot before delete: {exc}")
                    short = "rotate"
            kind, args = _arguments(short, cycle, rng, model)
            snap = model.snapshot_begins(str(args["snapshot"])) if short == "snapshot" else None
            op = Operation(state, kind, args, armed if short == "rotate" else {})
            op.start()
            if point:  # the daemon (or the rotation) kills itself at the commit point
                op.join(30)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    if not op.acked:  # its sockets close a moment before it can be reaped
                        proc.wait(timeout=5)
            else:
                time.sleep(rng.uniform(0, 2 * durations[short]))  # inside, or just after
            died = proc.poll() is not None or op.killed_itself  # at the armed commit point
            inside = op.is_alive() or (died and not op.acked)
        finally:
            proc.kill()  # SIGKILL: no shutdown code runs
            op.kill()  # a key rotation dies with the daemon (a host crash)
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        writer.join(60)
        op.join(60)
        stats.ops[short] += 1
        stats.killed_inside[short] += inside
        stats.at_crash_point[short] += died and not op.acked
        stats.acknowledged[short] += op.acked
        stats.writes_acked += writer.acked
        if op.acked:
            durations[short] = 0.5 * durations[short] + 0.5 * (op.finished - op.started)
        elif op.error and not inside:
            stats.failures.append(f"cycle {cycle}: {op.error} (the daemon was still alive)")
        if writer.error:
            stats.failures.append(f"cycle {cycle}: {writer.error}")
        _record(model, kind, args, op.acked, snap)
        model.sent.clear()  # no snapshot spans cycles
        stats.failures += _repair(state, rng, stats, cycle)
        stats.failures += _verify_offline(state, model, cycle, stats)
        stats.cycles += 1
        if progress:
            how = f"at {point}" if point else "at a random moment"
            progress(
                f"cycle {cycle + 1}/{cycles}: {short} killed {how}: "
                f"{'acknowledged' if op.acked else 'cut'}{' inside' if inside else ''}, "
                f"{writer.acked} writes acked, {len(stats.failures)} failures"
            )
    # last: an uninterrupted rotation finishes any interrupted one; check all again
    done = subprocess.run(
        _cli("key", "rotate", "--state-dir", str(state)),
        capture_output=True,
        text=True,
        env=python_env(),
    )
    if done.returncode:
        stats.failures.append(f"final key rotate: {done.stderr}")
    model.rotated = done.returncode == 0
    stats.failures += _repair(state, rng, stats, cycles, may_kill=False)
    stats.failures += _verify_offline(state, model, cycles, stats)
    proc, port = start(conf, log)
    try:
        stats.failures += _verify_live(port, model, cycles, stats)
    finally:
        proc.kill()
        proc.wait()
    return stats


def _choose(cycle: int, rng: random.Random, model: Model) -> str:
    """The operation of this cycle: the next of OPS that applies now, else a random
    one that does."""
    names = _snapshot_names(model)
    usable = {
        "resize": True,  # with snapshots too: the disk grows by a new top layer
        "snapshot": len(names) < MAX_SNAPSHOTS,
        "delete": True,  # with no snapshot, one is taken first
        "rotate": True,
    }
    wanted = OPS[cycle % len(OPS)]
    return wanted if usable[wanted] else rng.choice([k for k, ok in usable.items() if ok])


def _snapshot_now(state: Path, model: Model, name: str) -> None:
    """An uninterrupted snapshot (the victim of a delete cycle), modelled like any."""
    snap = model.snapshot_begins(name)
    call_daemon(str(state), "vm.snapshot", {"name": VM, "snapshot": name}, timeout=60)
    model.snapshot_ends(snap)
    snap.acked = True


def _snapshot_names(model: Model) -> list[str]:
    return sorted(n for n, s in model.snapshots.items() if s.acked and not s.deleting)


def _arguments(
    short: str, cycle: int, rng: random.Random, model: Model
) -> tuple[str, dict[str, object]]:
    """The admin request for the operation (after the live check settled the sizes)."""
    if short == "resize":
        if model.sizes[0] < MAX_DISK:
            model.resize_to = model.sizes[0] + MIB
            return "vm.resize", {"name": VM, "disk": model.resize_to}
        model.memory_resizes += 1  # each asks for 1 MiB more than any before
        return "vm.resize", {"name": VM, "memory": MEMORY + MIB * model.memory_resizes}
    if short == "snapshot":
        return "vm.snapshot", {"name": VM, "snapshot": f"s{cycle}"}
    if short == "delete":
        victim = rng.choice(_snapshot_names(model))
        model.snapshots[victim].deleting = True
        return "vm.snapshot.delete", {"name": VM, "snapshot": victim}
    return "rotate", {}


def _record(
    model: Model, kind: str, args: dict[str, object], acked: bool, snap: Snapshot | None
) -> None:
    """What the cycle's operation leaves certain."""
    if snap is not None:
        model.snapshot_ends(snap)
        snap.acked = acked
    if kind == "vm.snapshot.delete" and acked:
        del model.snapshots[str(args["snapshot"])]
    if kind == "vm.resize" and acked and model.resize_to is not None:
        model.sizes[0], model.resize_to = model.resize_to, None
    if kind == "rotate" and acked:
        model.rotated = True


def _repair(
    state: Path, rng: random.Random, stats: VmCrashStats, cycle: int, may_kill: bool = True
) -> list[str]:
    """``discover`` (repairs, merges), sometimes first killed: at a commit point of the
    merge or the resize roll-forward, or at a random moment; then run again."""
    argv = _cli("discover", "--json", "--state-dir", str(state))
    if may_kill and rng.random() < 0.4:
        point = rng.choice(REPAIR_POINTS) if rng.random() < 0.5 else None
        env = {**python_env(), **({ENV: point} if point else {})}
        victim = subprocess.Popen(argv, stdout=subprocess.DEVNULL, env=env)
        try:
            victim.wait(timeout=30 if point else rng.uniform(0.1, 0.6))
        except subprocess.TimeoutExpired:
            victim.kill()
        victim.wait()
        stats.repairs_killed += victim.returncode == -signal.SIGKILL
    run = subprocess.run(argv, capture_output=True, text=True, env=python_env())
    if run.returncode:
        return [f"cycle {cycle}: discover failed: {run.stderr.strip()}"]
    try:
        found = json.loads(run.stdout)
    except ValueError:
        return [f"cycle {cycle}: discover printed no JSON: {run.stdout[:200]!r} {run.stderr[:500]}"]
    bad = {k: found[k] for k in ("damaged", "orphan_secondaries") if found[k]}
    if bad or VM not in {v["name"] for v in found["vms"]}:
        return [f"cycle {cycle}: discover found {bad or 'no VM'}"]
    return []


def _verify_offline(state: Path, model: Model, cycle: int, stats: VmCrashStats) -> list[str]:
    """Snapshots, state and keys, read with the daemon down."""
    failures: list[str] = []
    with VmManager(StateDir.at(str(state))) as manager:
        again = manager.discover()
        if again.repaired or again.damaged:
            failures.append(f"cycle {cycle}: a second discover still repaired {again.repaired}")
        present = {i.name for i in snaps.list_snapshots(manager, VM)}
        for name, snap in list(model.snapshots.items()):
            if name not in present:
                if snap.acked and not snap.deleting:
                    failures.append(f"cycle {cycle}: acknowledged snapshot {name} is gone")
                del model.snapshots[name]
                continue
            snap.acked, snap.deleting = True, False  # it exists: from now on it stays
            failures += _check_snapshot(manager, name, snap, cycle)
            stats.snapshot_reads += 1
        for name in present - model.snapshots.keys():
            failures.append(f"cycle {cycle}: snapshot {name} appeared from nowhere")
        if b"".join(manager.read_state(VM)) != STATE_IMAGE:
            failures.append(f"cycle {cycle}: the state image changed")
        try:  # the config: whole, only its sizes may have changed
            config = {k: v for k, v in manager.config(VM).items() if k not in ("disks", "memory")}
            if config != model.config:
                failures.append(f"cycle {cycle}: the VM config changed: {config}")
        except VmError as exc:
            failures.append(f"cycle {cycle}: the VM config is lost: {exc}")
        if model.rotated:
            failures += _check_keys(manager, cycle)
            model.rotated = False
    return failures


def _check_snapshot(manager: VmManager, name: str, snap: Snapshot, cycle: int) -> list[str]:
    hashes: dict[int, str] = {}
    for lun in DISKS:
        backend = snaps.open_snapshot(manager, VM, name, lun)
        try:
            image = bytes(backend.read(0, backend.size))
        finally:
            backend.close()
        hashes[lun] = hashlib.sha256(image).hexdigest()
        if snap.hashes is not None:
            continue
        if len(image) != snap.sizes[lun]:
            return [f"cycle {cycle}: snapshot {name} LUN {lun} is {len(image)} bytes"]
        for lba in range(len(image) // BLOCK):
            got = image[lba * BLOCK : (lba + 1) * BLOCK]
            if got not in snap.allowed[lun].get(lba, {ZERO}):
                return [f"cycle {cycle}: snapshot {name} LUN {lun} LBA {lba} is no point in time"]
    if snap.hashes is not None and hashes != snap.hashes:
        return [f"cycle {cycle}: snapshot {name} reads other bytes than before"]
    snap.hashes, snap.allowed = hashes, {}
    return []


def _check_keys(manager: VmManager, cycle: int) -> list[str]:
    """After an acknowledged rotation: one master key, every unit key wrapped by it."""
    keys = manager.keyring().keys
    if len(keys) != 1 or os.path.exists(pending_path(manager.state.key_file)):
        return [f"cycle {cycle}: an acknowledged rotation left {len(keys)} keys"]
    vm = manager.find(VM)
    stale = [
        u.ref.location
        for u in vm.all_units
        if u.header.wrapped_key and u.header.key_id != keys[0].key_id
    ]
    return [f"cycle {cycle}: unit keys not re-wrapped: {stale}"] if stale else []


def _verify_live(port: int, model: Model, cycle: int, stats: VmCrashStats) -> list[str]:
    """Both disks through iSCSI: sizes, acknowledged writes, zeros where never written."""
    failures: list[str] = []
    ini = Initiator(port=port, target_name=TARGET, timeout=30)
    ini.login()
    for lun in DISKS:
        blocks, _ = ini.read_capacity16(lun)  # past the power-on unit attention
        size = blocks * BLOCK
        expected = {model.sizes[lun]}
        if lun == 0 and model.resize_to:
            expected.add(model.resize_to)  # an unacknowledged resize: old or new
        if size not in expected:
            failures.append(f"cycle {cycle}: LUN {lun} is {size} bytes, not {sorted(expected)}")
            continue
        model.sizes[lun] = size
        blocks, step = size // BLOCK, 2048
        for first in range(0, blocks, step):
            n = min(step, blocks - first)
            rsp = ini.command(read10(first, n), lun=lun, read_length=n * BLOCK)
            if rsp.status:
                return failures + [f"cycle {cycle}: LUN {lun} read status {rsp.status}"]
            for lba in range(first, first + n):
                got = bytes(rsp.data[(lba - first) * BLOCK : (lba - first + 1) * BLOCK])
                allowed = model.allowed[lun].get(lba, {ZERO})
                if got not in allowed:
                    failures.append(f"cycle {cycle}: LUN {lun} LBA {lba} lost its write")
                elif lba in model.allowed[lun]:
                    model.allowed[lun][lba] = {got}  # what survived is now the state
                    stats.blocks_verified += 1
    model.resize_to = None
    ini.logout()
    return failures
