"""Power cuts inside every admin operation: record the operation (a CLI command run
offline on a state directory under :mod:`.fsrecord`), then for each cut point and
choice (:mod:`.powercut`) rebuild what the disk holds, repair it with ``discover`` and
check the invariants of issue 17:

* every unit opens: ``discover`` finds every VM whole (nothing damaged, no orphan
  secondary) and finishes or undoes every half-done operation, so a second discover
  repairs nothing;
* each VM is in its state from before the operation or from after it (its disks byte
  for byte, their sizes, its snapshots and the snapshot image), never a mix; once the
  operation returned (the cut after its last mutation) only the new state is right,
  whatever unflushed data was lost;
* the encrypted state decrypts to its image (the master key and every unit key whole,
  old or new), the VM config and the managed configuration (``acl list``) are the old
  or the new version, never torn;
* no grain of one VM appears in another: every block of every disk is checked, so a
  block of VM ``b`` in ``a`` (a freed copy-on-write grain handed out twice) fails.

The state every operation starts from (:func:`setup`): VM ``a`` (2 MiB disk, a 2 MiB
secondary, encrypted state) with snapshot ``s1`` (full) taken between two generations
of writes and ``s2`` (delta) after them, VM ``b`` with its own blocks and a grant
(``move`` creates its second pool ``p2`` first, unrecorded); for replication
(:mod:`.powercut_replica`): VM ``d`` replicated once into its replica (``vm receive``)
and written since, and the replica of a VM ``e`` deleted here since its round (``vm
promote e`` makes it again).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..cli.main import main as cli_main
from ..server.vm_luns import export_vm
from ..vm import StateDir, VmError, VmManager
from ..vm.operations import snapshot as snaps
from ..vm.operations.replicate import checkpoint_name, destination_tag
from .crash import python_env
from .fsrecord import read_log
from .powercut import Log, Outcome, Tally, materialize, plan
from .powercut_replica import EMPTY, URL, replica_file, replica_worlds, round_into

MIB = 1 << 20
BLOCK = 512
STATE = b"".join(hashlib.sha256(b"state %d" % i).digest() for i in range(3000))
HOST = "iqn.1994-05.com.example:powercut"
NAMES = ("a", "b", "c")  # the VMs read after each cut
REPLICATION = (*NAMES, "d", "e")  # those of the replication scenarios (Scenario.names)

Image = dict[int, tuple[int, dict[int, bytes]]]  # LUN -> (size, LBA -> block)


def block(tag: str, gen: int, lun: int, lba: int) -> bytes:
    """A block that names its VM, generation, LUN and LBA."""
    seed = f"{tag}:{gen}:{lun}:{lba}".encode()
    return b"".join(hashlib.sha256(seed + bytes([i])).digest() for i in range(BLOCK // 32))


def _luns(manager: VmManager, name: str) -> dict[int, object]:
    return export_vm(manager.find(name), manager.catalog, manager.state.root)  # type: ignore[return-value]


def write_blocks(manager: VmManager, name: str, blocks: dict[int, dict[int, bytes]]) -> None:
    luns = _luns(manager, name)
    try:
        for lun, writes in blocks.items():
            backend = luns.guest[lun].backend  # type: ignore[attr-defined]
            for lba, data in writes.items():
                backend.write(lba * BLOCK, data)
            backend.flush()
    finally:
        luns.close()  # type: ignore[attr-defined]


def read_image(manager: VmManager, name: str) -> dict[int, bytes]:
    luns = _luns(manager, name)
    try:
        out = {}
        for lun, lu in sorted(luns.guest.items()):  # type: ignore[attr-defined]
            out[lun] = bytes(lu.backend.read(0, lu.backend.size))
        return out
    finally:
        luns.close()  # type: ignore[attr-defined]


def expand(image: Image) -> dict[int, bytes]:
    out = {}
    for lun, (size, blocks) in image.items():
        buf = bytearray(size)
        for lba, data in blocks.items():
            buf[lba * BLOCK : (lba + 1) * BLOCK] = data
        out[lun] = bytes(buf)
    return out


def pattern(
    tag: str, gen: int, lbas: range, luns: tuple[int, ...] = (0, 1)
) -> dict[int, dict[int, bytes]]:
    return {lun: {lba: block(tag, gen, lun, lba) for lba in lbas} for lun in luns}


GEN1 = pattern("a", 1, range(0, 4096, 97))
GEN2 = pattern("a", 2, range(0, 4096, 131))
B_BLOCKS = pattern("b", 1, range(0, 4096, 89), (0,))


def _merge(*layers: dict[int, dict[int, bytes]]) -> dict[int, dict[int, bytes]]:
    out: dict[int, dict[int, bytes]] = {}
    for layer in layers:
        for lun, blocks in layer.items():
            out.setdefault(lun, {}).update(blocks)
    return out


def image(blocks: dict[int, dict[int, bytes]], sizes: dict[int, int]) -> Image:
    return {lun: (size, blocks.get(lun, {})) for lun, size in sizes.items()}


A_SIZES = {0: 2 * MIB, 1: 2 * MIB}
A_NOW = image(_merge(GEN1, GEN2), A_SIZES)
A_S1 = image(GEN1, A_SIZES)
B_NOW = image(B_BLOCKS, {0: 2 * MIB})
D1 = pattern("d", 1, range(0, 4096, 101), (0,))
D2 = pattern("d", 2, range(0, 4096, 103), (0,))
E_BLOCKS = pattern("e", 1, range(0, 4096, 107), (0,))
CHECKPOINTS = tuple(checkpoint_name(destination_tag(URL), seq) for seq in (1, 2))
RECEIVES = {"f": "4M"}  # the receive the 'receive' scenario runs (and runs again)
REPLICA_SIZE = "64M"  # what a replica of a 2 MiB VM needs, and room


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "iscsi_vmtarget", *args]


def run_cli(state: Path, *args: str) -> str:
    done = subprocess.run(cli(*args, "--state-dir", str(state)), capture_output=True,
                          text=True, env=python_env())  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def setup(state: Path) -> None:
    """The state every operation starts from (module docstring)."""
    run_cli(state, "vm", "create", "a", "--disk", "2M", "--memory", "1M", "--secondary", "2M")
    run_cli(state, "vm", "create", "b", "--disk", "2M", "--memory", "1M")
    run_cli(state, "acl", "add", "--vm", "a", HOST)
    with VmManager(StateDir.at(str(state))) as manager:
        manager.write_state("a", io.BytesIO(STATE), len(STATE))
        manager.write_state("b", io.BytesIO(STATE), len(STATE))
        write_blocks(manager, "a", GEN1)
        write_blocks(manager, "b", B_BLOCKS)
    run_cli(state, "vm", "snapshot", "a", "s1")
    with VmManager(StateDir.at(str(state))) as manager:
        write_blocks(manager, "a", GEN2)
    run_cli(state, "vm", "snapshot", "a", "s2")  # a delta one ('fill' makes it full)
    with VmManager(StateDir.at(str(state))) as manager:  # in this process: quicker
        for name, blocks in (("d", D1), ("e", E_BLOCKS)):
            manager.create(name, disk=2 * MIB, memory=MIB)
            with contextlib.redirect_stdout(io.StringIO()):
                cli_main(["vm", "receive", name, "--size", REPLICA_SIZE, "--state-dir", str(state)])
            write_blocks(manager, name, blocks)
            round_into(manager, name, replica_file(state, name))
        manager.delete("e")
        write_blocks(manager, "d", D2)


@dataclass
class World:
    """What the checked part of a state directory holds (before or after an operation)."""

    vms: dict[str, Image | None]
    snapshots: dict[str, tuple[str, ...]] = field(default_factory=dict)
    acl: str = ""
    configs: dict[str, str] = field(default_factory=dict)
    replicas: dict[str, str] = field(default_factory=dict)  # VM -> what its replica holds


@dataclass
class Scenario:
    """An admin operation: its CLI arguments and the world before and after it."""

    name: str
    args: tuple[str, ...]
    after: Callable[[World], World]
    before: tuple[str, ...] = ()  # a CLI command run first, not recorded ({state})
    module: str = ""  # the program recorded, when not the CLI ({state} in args)
    names: tuple[str, ...] = NAMES  # the VMs it may change (read after a cut)
    between: Callable[[World], World] | None = None  # a state it passes through, whole


def _with(world: World, **changes: object) -> World:
    out = World(dict(world.vms), dict(world.snapshots), world.acl, dict(world.configs),
                dict(world.replicas))  # fmt: skip
    for key, value in changes.items():
        getattr(out, key).update(value) if isinstance(value, dict) else setattr(out, key, value)
    return out


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("create", ("vm", "create", "c", "--disk", "2M", "--memory", "1M"),
                 lambda w: _with(w, vms={"c": image({}, {0: 2 * MIB})}, snapshots={"c": ()})),
        Scenario("snapshot", ("vm", "snapshot", "a", "s3"),
                 lambda w: _with(w, snapshots={"a": ("s1", "s2", "s3")})),
        Scenario("snapshot-full", ("vm", "snapshot", "a", "s3", "--full"),
                 lambda w: _with(w, snapshots={"a": ("s1", "s2", "s3")})),
        Scenario("fill", ("vm", "snapshot", "fill", "a", "s2"), lambda w: w),
        Scenario("revert", ("vm", "revert", "a", "s1"), lambda w: _with(w, vms={"a": A_S1})),
        Scenario("delete-snapshot", ("vm", "snapshot", "delete", "a", "s1"),
                 lambda w: _with(w, snapshots={"a": ("s2",)})),
        Scenario("resize", ("vm", "resize", "a", "--disk", "3M"),
                 lambda w: _with(w, vms={"a": {**A_NOW, 0: (3 * MIB, A_NOW[0][1])}})),
        Scenario("resize-memory", ("vm", "resize", "b", "--memory", "2M"), lambda w: w),
        Scenario("clone", ("vm", "clone", "a", "c"),  # a linked clone rests on a snapshot
                 lambda w: _with(w, vms={"c": A_NOW},
                                 snapshots={"a": ("clone-c", "s1", "s2"), "c": ()})),
        Scenario("clone-full", ("vm", "clone", "a", "c", "--from-snapshot", "s1", "--full"),
                 lambda w: _with(w, vms={"c": A_S1}, snapshots={"c": ()})),
        Scenario("move", ("vm", "move", "b", "--pool", "p2"), lambda w: w,
                 ("pool", "create", "p2", "--path", "{state}/p2")),
        Scenario("delete-vm", ("vm", "delete", "b"),
                 lambda w: _with(w, vms={"b": None}, snapshots={"b": ()})),
        Scenario("key-rotate", ("key", "rotate"), lambda w: w),
        Scenario("acl", ("acl", "add", "--vm", "b", HOST), lambda w: w),
        Scenario("config", ("vm", "config", "set", "a", "cpus=4"), lambda w: w),
        Scenario("state-write", ("vm", "state", "write", "b", "{work}/state.img"), lambda w: w),
        Scenario("receive", ("vm", "receive", "f", "--size", RECEIVES["f"]),
                 lambda w: _with(w, replicas={"f": EMPTY})),
        Scenario("replicate", ("{state}", "d"),
                 lambda w: _with(w, snapshots={"d": CHECKPOINTS[1:]}),
                 module="iscsi_vmtarget.testing.powercut_replica", names=REPLICATION,
                 # the old checkpoint goes once the new one is acknowledged (next round)
                 between=lambda w: _with(w, snapshots={"d": CHECKPOINTS})),
        Scenario("promote", ("vm", "promote", "e"),
                 lambda w: _with(w, vms={"e": image(E_BLOCKS, {0: 2 * MIB})},
                                 snapshots={"e": ()}, replicas={"e": None}),
                 names=REPLICATION),
    )
}  # fmt: skip


def observe(state: Path, names: tuple[str, ...]) -> tuple[World, list[str]]:
    """Repair (discover, twice) and read what the invariants look at; failures found."""
    failures: list[str] = []
    world = World({})
    with VmManager(StateDir.at(str(state))) as manager:
        found = manager.discover()
        # An orphan secondary of a cut 'vm create' is reported, not removed (its base
        # may sit in a pool not attached now); a clone's temporary ones are removed.
        leftovers = [u.ref.location for u in found.orphans if u.header.name.startswith("c-")]
        if found.damaged or leftovers:
            failures.append(f"discover: damaged {found.damaged}, clone leftovers {leftovers}")
        strangers = sorted(vm.name for vm in found.vms if vm.name not in REPLICATION)
        if strangers:  # a temporary VM of a clone or promote cut short
            failures.append(f"discover left VMs half made: {strangers}")
        again = manager.discover()
        if again.repaired or again.damaged:
            failures.append(
                f"a second discover still repaired {again.repaired} or found {again.damaged}"
            )
        present = {vm.name for vm in found.vms}
        for name in names:
            if name not in present:
                world.vms[name] = None
                world.snapshots[name] = ()
                continue
            try:
                world.vms[name] = read_image(manager, name)  # type: ignore[assignment]
                world.snapshots[name] = tuple(
                    sorted(i.name for i in snaps.list_snapshots(manager, name))
                )
                if "s1" in world.snapshots[name] and name == "a":
                    s1 = {}
                    for lun in A_SIZES:
                        backend = snaps.open_snapshot(manager, name, "s1", lun)
                        try:
                            s1[lun] = bytes(backend.read(0, backend.size))
                        finally:
                            backend.close()
                    if s1 != expand(A_S1):
                        failures.append("snapshot s1 of a is no longer its point in time")
                state_image = b"".join(manager.read_state(name))  # old or new: compare()
                world.configs[name + ".state"] = hashlib.sha256(state_image).hexdigest()
                world.configs[name] = json.dumps(manager.config(name), sort_keys=True)
            except VmError as exc:
                failures.append(f"VM {name} does not open: {exc}")
    world.replicas, problems = _receive_again(state)  # may change the configuration
    world.acl = json.dumps(managed_files(state), sort_keys=True)
    return world, failures + problems


def _receive_again(state: Path) -> tuple[dict[str, str], list[str]]:
    """The replicas; a receive cut short is repaired the way a user does it, by
    running it again (``vm receive`` undoes what the cut left and starts afresh)."""
    worlds, half, failures = replica_worlds(state)
    if not half:
        return worlds, failures
    for name, problem in half.items():
        try:
            run_cli(state, "vm", "receive", name, "--size", RECEIVES.get(name, "?"))
        except RuntimeError as exc:
            failures.append(f"half-done receive of {name} ({problem}) not repaired: {exc}")
    worlds, half, more = replica_worlds(state)
    failures += more + [f"receive of {n} still half-done: {p}" for n, p in half.items()]
    return worlds, failures


def compare(got: World, before: World, after: World, finished: bool,
            between: World | None = None) -> list[str]:  # fmt: skip
    """Each VM, its snapshots, its config and the ACLs: old or new (new once finished;
    or, unfinished, as ``between`` where the operation names a state between)."""
    failures = []
    unfinished = [before, after] if between is None else [before, after, between]
    for name in sorted(set(before.vms) | set(after.vms)):
        allowed = [after] if finished else unfinished
        for what, key in (("vms", name), ("snapshots", name), ("configs", name),
                          ("configs", name + ".state")):  # fmt: skip
            seen = getattr(got, what).get(key)
            if all(seen != getattr(w, what).get(key) for w in allowed):
                detail = _diff(seen, [getattr(w, what).get(key) for w in allowed])
                failures.append(f"{what} of {key}: neither {'new' if finished else 'old nor new'}"
                                f" ({detail})")  # fmt: skip
    allowed = [after] if finished else unfinished
    for name in sorted(set(before.replicas) | set(after.replicas) | set(got.replicas)):
        seen = got.replicas.get(name)
        if all(seen != w.replicas.get(name) for w in allowed):
            failures.append(f"the replica of VM {name} holds {seen}, neither "
                            f"{'new' if finished else 'old nor new'}")  # fmt: skip
    if all(got.acl != w.acl for w in ([after] if finished else [before, after])):
        failures.append("the managed configuration or the master key is neither old nor new")
    return failures


def managed_files(state: Path) -> dict[str, str]:
    """The managed configuration (ACLs, grants, targets, APTPL files under conf/) and
    the master key, by content hash; leftover temporaries left out (not torn)."""
    out = {}
    for path in [state / "master.key", *sorted((state / "conf").rglob("*"))]:
        if "pools" in path.parts[-2:-1]:  # pool definitions name absolute paths
            continue
        if path.is_file() and not path.name.startswith(".") and not path.name.endswith(".tmp"):
            # a receiving target names its replica file by absolute path: this tree's
            # (a receive run again here) or the recorded tree's
            data = _REPLICA_DIR.sub(b'"{state}/replicas/', path.read_bytes())
            out[str(path.relative_to(state))] = hashlib.sha256(data).hexdigest()
    return out


_REPLICA_DIR = re.compile(rb'"[^"]*/replicas/')


def _diff(seen: object, allowed: list[object]) -> str:
    if isinstance(seen, dict) and all(isinstance(a, dict) for a in allowed):
        for lun, data in seen.items():
            for a in allowed:
                other = a.get(lun)  # type: ignore[union-attr]
                if other is None or len(other) != len(data):
                    return f"LUN {lun} is {len(data)} bytes"
                for lba in range(len(data) // BLOCK):
                    here = data[lba * BLOCK : (lba + 1) * BLOCK]
                    if here != other[lba * BLOCK : (lba + 1) * BLOCK]:
                        return f"LUN {lun} LBA {lba} differs ({_whose(here)})"
        return "?"
    return f"{str(seen)[:80]} vs {[str(a)[:80] for a in allowed]}"


def _whose(data: bytes) -> str:
    """Which VM's block this is (a grain of one VM in another shows here)."""
    if not any(data):
        return "zeros"
    if not _KNOWN:
        for layer, label in ((GEN1, "VM a gen 1"), (GEN2, "VM a gen 2"), (B_BLOCKS, "VM b")):
            for lun, blocks in layer.items():
                for lba, known in blocks.items():
                    _KNOWN[known] = f"{label} LUN {lun} LBA {lba}"
    return _KNOWN.get(data, "unknown bytes")


_KNOWN: dict[bytes, str] = {}


class Run(Tally):
    """One operation under power cuts: counts and failures."""


@contextlib.contextmanager
def _tmp(parent: Path, prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)




def copy_tree(src: Path, dst: Path) -> None:
    """Copy a state directory keeping its files sparse (units are mostly holes)."""
    dst.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-a", "--sparse=always", f"{src}/.", str(dst)], check=True)


def prepare(workdir: Path, names: tuple[str, ...] = NAMES) -> tuple[Path, World]:
    """The starting state, once per work directory, and its world."""
    base = workdir / "base"
    if not base.exists():
        build = workdir / "base.tmp"
        shutil.rmtree(build, ignore_errors=True)
        setup(build)
        build.rename(base)
    with _tmp(workdir, "observe-") as copy:
        copy_tree(base, copy)
        world, failures = observe(copy, names)
    if failures:
        raise RuntimeError(f"the starting state is already wrong: {failures}")
    return base, world


def record(scenario: Scenario, base: Path, before: World, workdir: Path) -> tuple[Log, World]:
    """Run the operation on a copy of ``base`` under the recorder; its log and the
    world it leaves (read from a copy, so the recorded tree is not touched)."""
    state = workdir / f"rec-{scenario.name}"
    shutil.rmtree(state, ignore_errors=True)
    copy_tree(base, state)
    if scenario.before:  # a pool path is absolute: made in the copy, not in base
        run_cli(state, *(a.replace("{state}", str(state)) for a in scenario.before))
    logfile = workdir / f"{scenario.name}.log"
    logfile.unlink(missing_ok=True)
    (workdir / "state.img").write_bytes(STATE[::-1])  # what 'state-write' stores
    args = [a.replace("{work}", str(workdir)).replace("{state}", str(state))
            for a in scenario.args]  # fmt: skip
    program = ["--module", scenario.module] if scenario.module else []
    if not scenario.module:
        args += ["--state-dir", str(state)]
    done = subprocess.run(
        [sys.executable, "-m", "iscsi_vmtarget.testing.fsrecord", str(logfile), str(state),
         *program, "--", *args],
        capture_output=True, env=python_env(),
    )  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"{scenario.name}: {done.stderr.decode()[-2000:]}")
    log = Log.parse(read_log(str(logfile)))
    with _tmp(workdir, "after-") as copy:
        copy_tree(state, copy)
        after, failures = observe(copy, scenario.names)
    expected = scenario.after(before)
    for name in scenario.names:
        want = expected.vms.get(name)
        if want is not None and isinstance(next(iter(want.values())), tuple):
            want = expand(want)  # a hand-written image (the rest are read ones)
        if after.vms.get(name) != want or after.snapshots.get(name) != expected.snapshots.get(name):
            failures.append(
                f"VM {name} is not as the operation promises "
                f"(snapshots {after.snapshots.get(name)})"
            )
    if failures:
        raise RuntimeError(f"{scenario.name} without a cut already fails: {failures}")
    return log, after


def run_scenario(
    scenario: Scenario,
    workdir: Path,
    limit: int | None = None,
    seeds: int = 2,
    spread: int | None = None,
    select: Callable[[Log], set[int]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Run:
    """Every cut point of the first ``limit`` mutations (or ``spread`` cut points evenly
    spread over the operation, and the one after it), each under every choice; states
    already checked (same names and kept data) skipped."""
    base, before = prepare(workdir, scenario.names)
    log, after = record(scenario, base, before, workdir)
    run = Run(scenario.name, mutations=len(log.ops))
    seen: set[str] = set()
    cuts = set()
    total = len(log.ops)
    points = {total * (i + 1) // (spread + 1) for i in range(spread)} if spread else None
    if select is not None:
        points = select(log)
    for n, choice, seed in plan(log, limit, seeds):
        if points is not None and n not in points and n != total:
            continue
        with _tmp(workdir, "cut-") as state:
            outcome = materialize(log, n, choice, seed, str(state))
            _relocate(state, workdir / f"rec-{scenario.name}")
            cuts.add(n)
            key = f"{outcome.digest}:{n == total}"  # once finished, only 'new' is right
            if key in seen:
                run.duplicates += 1
                continue
            seen.add(key)
            run.checked += 1
            failures = check(state, before, after, outcome, len(log.ops), scenario)
        for failure in failures:
            run.failures.append(
                f"{scenario.name} cut {n}/{len(log.ops)} {choice}/{seed}: {failure}"
            )
        if progress and failures:
            progress(run.failures[-1])
    run.cut_points = len(cuts)
    return run


def _relocate(state: Path, recorded: Path) -> None:
    """Pool definitions name their directory by absolute path: point the ones made in
    the recorded tree (``move``'s ``p2``) at the rebuilt tree instead."""
    for definition in (state / "conf" / "pools").glob("*.toml"):
        text = definition.read_text()
        if str(recorded) in text:
            definition.write_text(text.replace(str(recorded), str(state)))


def check(state: Path, before: World, after: World, outcome: Outcome, total: int,
          scenario: Scenario) -> list[str]:  # fmt: skip
    try:
        got, failures = observe(state, scenario.names)
    except Exception as exc:  # any crash of the repair or the readers is a failure
        return [f"{type(exc).__name__}: {exc}"]
    between = scenario.between(before) if scenario.between is not None else None
    return failures + compare(got, before, after, outcome.n == total, between)
