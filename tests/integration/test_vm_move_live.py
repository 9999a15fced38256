"""``vm move`` of a VM the real server exports, with an initiator writing all along.

The daemon moves the VM live: a writer session keeps writing (FUA) to both LUNs while
the units are copied (a pause point holds the copy until the writer has written
hundreds of grains, so the catch-up provably runs), caught up and switched. Then every
acknowledged write reads back - through the session and from the destination units
offline - the source pool holds nothing, VPD 0x83/0x80 did not change and the writer
never saw an error. kill -9 of the daemon at each step of a live move, then a restart:
the VM is whole in exactly one pool and holds every acknowledged write.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from iscsi_vmtarget.client.initiator import Initiator
from iscsi_vmtarget.server.vm_luns import DEFAULT_BASE_IQN
from iscsi_vmtarget.vm import StateDir, VmManager
from iscsi_vmtarget.vm.faults import ENV, PAUSE_ENV
from iscsi_vmtarget.vm.operations import snapshot as snaps
from tests.conftest import CLIENTS, INITIATOR, RunningTarget, grant_vms, start_target
from tests.integration.test_snapshot_serve import _identity, _iscsi_inq, _read
from tests.vm.helpers import snapshot_images

MIB = 1 << 20
VM = "mover"
IQN = f"{DEFAULT_BASE_IQN}:vm.{VM}"
SIZES = (32 * MIB, 8 * MIB)  # LUN 0, LUN 1
WRITER = "iqn.2026-11.org.iscsi-vmtarget.test:writer"
DURING_PAUSE = 300  # writes while the copy is held at its pause point (> 64 grains)
STRIDE = 131  # blocks between two writes' LBAs: every write lands in another grain
BEFORE = 3 * MIB  # 64 KiB written on each LUN before the move, checked unchanged after it
BEFORE_LBAS = range(BEFORE // 512, (BEFORE + (64 << 10)) // 512)


@dataclass
class Writer:
    """One session writing distinct blocks with FUA until told to stop; remembers
    what was acknowledged (and the one write in flight when the session died)."""

    port: int
    iqn: str = IQN
    sizes: tuple[int, int] = SIZES
    acked: dict[tuple[int, int], bytes] = field(default_factory=dict)
    inflight: tuple[int, int, bytes] | None = None
    errors: list[str] = field(default_factory=list)
    died: BaseException | None = None
    count: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    progress: threading.Condition = field(default_factory=threading.Condition)

    def run(self) -> None:
        ini = Initiator(port=self.port, initiator_name=WRITER, target_name=self.iqn, timeout=120)
        try:
            ini.login()
            for lun in (0, 1):
                ini.command(bytes(6), lun=lun)  # the power-on unit attention
            i = 0
            while not self.stop.is_set():
                lun = i % 2
                lba = (i // 2 * STRIDE) % (self.sizes[lun] // 512)
                if lba in BEFORE_LBAS:  # what the checks expect unchanged
                    i += 1
                    continue
                block = f"lun {lun} lba {lba} write {i} ".encode().ljust(512, b".")
                self.inflight = (lun, lba, block)
                cdb = bytes([0x2A, 0x08]) + lba.to_bytes(4, "big") + b"\x00\x00\x01\x00"
                result = ini.command(cdb, lun=lun, data_out=block)  # WRITE(10), FUA
                if result.status != 0:
                    self.errors.append(f"write {i}: status {result.status} {result.sense!r}")
                    return
                self.acked[(lun, lba)] = block
                self.inflight = None
                i += 1
                with self.progress:
                    self.count = i
                    self.progress.notify_all()
            ini.logout()
        except BaseException as exc:  # the daemon was killed: the session is gone
            self.died = exc
        finally:
            ini.close()
            with self.progress:
                self.stop.set()
                self.progress.notify_all()

    def wait_for(self, count: int) -> None:
        """Until ``count`` writes were acknowledged (a hang guard, not a timing)."""
        with self.progress:
            ok = self.progress.wait_for(lambda: self.count >= count or self.stop.is_set(), 300)
        assert ok and self.count >= count, (self.count, self.errors, self.died)

    def holds(self, read: dict[tuple[int, int], bytes]) -> None:
        """Every acknowledged block reads back (or the one in flight when it died)."""
        for (lun, lba), block in self.acked.items():
            got = read[(lun, lba)]
            if got != block:
                assert self.inflight is not None and self.inflight[:2] == (lun, lba), (lun, lba)
                assert got == self.inflight[2], (lun, lba)


def ivt(state: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "iscsi_vmtarget", *args, "--state-dir", str(state)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert not check or proc.returncode == 0, proc.stderr
    return proc


def _setup(state: Path, snapshot: bool, dest: str = "directory") -> None:
    """VM ``mover`` in pool default and an empty pool p2 of kind ``dest``."""
    with VmManager(StateDir.at(str(state))) as manager:
        if dest == "device":  # a sparse file as the device, as the device-pool tests do
            manager.catalog.create_device("p2", str(state.parent / "p2.img"), size=192 * MIB)
        else:
            manager.catalog.create_directory("p2", None)
        manager.create(VM, disk=SIZES[0], memory=4 * MIB, secondaries=(SIZES[1],))
        for lun in (0, 1):
            backend = snaps.open_live(manager, manager.find(VM), lun)
            backend.write(BEFORE, b"before the move " * 4096)
            backend.flush()
            backend.close()
        if snapshot:  # every LUN is then a copy-on-write chain with a top delta
            snaps.create_snapshot(manager, VM, "s1")


def _snapshot_image(state: Path) -> bytes:
    return snapshot_images(state, VM, "s1", luns=1)[0]


def grant(state: Path, iqn: str, *initiators: str) -> None:
    """``acl add`` each initiator on a VM's target (VM targets deny the ungranted)."""
    for initiator in initiators:
        ivt(state, "acl", "add", iqn, initiator)


def _start(
    tmp_path: Path,
    state: Path,
    monkeypatch: pytest.MonkeyPatch,
    pause: str = "move.copying",
    iqn: str = IQN,
    **env: str,
) -> RunningTarget:
    """The daemon on ``state``, its work pausing at ``pause`` (:func:`run_paused`),
    the writer and the watcher granted on the VM of target ``iqn``."""
    pausedir = tmp_path / "pause"
    pausedir.mkdir(exist_ok=True)
    monkeypatch.setenv(PAUSE_ENV, f"{pause}:{pausedir}")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    try:
        grant_vms(state, *CLIENTS, WRITER)
        running = start_target(tmp_path / "serve", "--state-dir", str(state))
    finally:
        monkeypatch.delenv(PAUSE_ENV)
        for key in env:
            monkeypatch.delenv(key)
    grant(state, iqn, WRITER, INITIATOR)
    return running


def run_paused(tmp_path: Path, writer: Writer, point: str, *args: str) -> subprocess.Popen[str]:
    """Start ``iscsi-vmtarget ARGS`` (the daemon's work pauses at ``point``), let the
    writer write DURING_PAUSE blocks, release it; returns the running CLI."""
    pausedir = tmp_path / "pause"
    cli = subprocess.Popen(
        [sys.executable, "-m", "iscsi_vmtarget", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    reached = pausedir / f"{point}.reached"
    writer.wait_for(1)
    with writer.progress:  # the writer's notifications pace this wait
        assert writer.progress.wait_for(lambda: reached.exists() or cli.poll() is not None, 300)
    assert reached.exists(), cli.communicate()
    writer.wait_for(writer.count + DURING_PAUSE)
    (pausedir / f"{point}.go").touch()
    return cli


def _move_while_writing(tmp_path: Path, state: Path, writer: Writer) -> subprocess.Popen[str]:
    """Start ``vm move`` (it pauses in the copy), let the writer write DURING_PAUSE
    blocks, release the copy; returns the running CLI."""
    return run_paused(
        tmp_path,
        writer,
        "move.copying",
        *("vm", "move", VM, "--pool", "p2", "--json", "--progress", "--state-dir", str(state)),
    )


def _read_all(port: int, blocks: set[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
    ini = Initiator(port=port, initiator_name=INITIATOR, target_name=IQN)
    ini.login()
    try:
        for lun in (0, 1):
            ini.command(bytes(6), lun=lun)
        return {(lun, lba): _read(ini, lba, lun) for lun, lba in blocks}
    finally:
        ini.logout()
        ini.close()


def _placement(state: Path) -> tuple[set[str], set[str]]:
    """After a repair: the pools holding the VM's units (layers and records too), and
    those units' file names."""
    ivt(state, "discover")  # what an operator runs: finishes or rolls back the move
    with VmManager(StateDir.at(str(state))) as manager:
        found = manager.discover()
        assert not found.damaged and not found.orphans, found.to_json()
        vm = manager.find(VM, found)
        return {u.pool for u in vm.all_units}, {f"{u.header.unit_uuid}.unit" for u in vm.all_units}


def _leftovers(state: Path, pool: str, names: set[str]) -> list[str]:
    """The VM's units (file names) in ``pool``, or its temporaries: files named with a
    dot in a directory pool; in a device pool, data of the VM in its free space (a
    staged copy that was not scrubbed)."""
    with VmManager(StateDir.at(str(state))) as manager:
        where = manager.catalog.get(pool)
        if where.kind == "directory":
            found = (p.name for p in Path(where.path).iterdir())
            return sorted(n for n in found if n in names or n[0] == ".")
        units = sorted(f"{r.key}.unit" for r in where.candidates() if f"{r.key}.unit" in names)
    free = b"before the move" in Path(where.path).read_bytes() and not units
    return [*units, *(["free space"] if free else [])]


@pytest.mark.parametrize(
    ("snapshot", "dest"),
    [(False, "directory"), (True, "directory"), (True, "device")],
    ids=["plain", "with-snapshot", "device-pool"],
)
def test_live_move_keeps_every_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, snapshot: bool, dest: str
) -> None:
    state = tmp_path / "state"
    _setup(state, snapshot, dest)
    image_s1 = _snapshot_image(state) if snapshot else b""
    target = _start(tmp_path, state, monkeypatch)
    try:
        urls = [f"iscsi://127.0.0.1:{target.port}/{IQN}/{lun}" for lun in (0, 1)]
        inq_before = [_iscsi_inq(url) for url in urls]
        watcher = Initiator(port=target.port, initiator_name=INITIATOR, target_name=IQN)
        watcher.login()
        for lun in (0, 1):
            watcher.command(bytes(6), lun=lun)
        before = [_identity(watcher, 0), _identity(watcher, 1)]
        writer = Writer(target.port)
        thread = threading.Thread(target=writer.run, daemon=True)
        thread.start()
        cli = _move_while_writing(tmp_path, state, writer)
        out, err = cli.communicate(timeout=600)
        assert cli.returncode == 0, err
        report = json.loads(out)
        assert "moving" in err and "] 100%" in err  # the daemon's progress lines, drawn
        assert report["live"] and report["units"] == (5 if snapshot else 2)
        assert report["passes"] >= 1 and report["recopied"] > 0, report  # it caught up
        writer.wait_for(writer.count + 100)  # and the writer goes on, on the new units
        writer.stop.set()
        thread.join(timeout=300)
        assert not writer.errors and writer.died is None, (writer.errors, writer.died)
        assert [_identity(watcher, 0), _identity(watcher, 1)] == before  # VPD 0x83, 0x80
        assert [_iscsi_inq(url) for url in urls] == inq_before
        watcher.logout()
        watcher.close()
        writer.holds(_read_all(target.port, set(writer.acked)))
        if dest == "device":  # its units now sit where other hosts may see them: leased
            status = json.loads(ivt(state, "status", "--json").stdout)
            with VmManager(StateDir.at(str(state))) as manager:
                units = {str(u.header.unit_uuid) for u in manager.find(VM).lun_map().values()}
            held = {x["unit"] for x in status["leases"] if x["state"] == "held"}
            assert units <= held, (units, status["leases"])
    finally:
        target.stop()
    pools, names = _placement(state)
    assert pools == {"p2"}
    assert not _leftovers(state, "default", names)  # the source holds nothing
    assert dest == "device" or not _leftovers(state, "p2", set())  # no temporaries
    with VmManager(StateDir.at(str(state))) as manager:  # the destination units, offline
        vm = manager.find(VM)
        read: dict[tuple[int, int], bytes] = {}
        for lun in (0, 1):
            backend = snaps.open_live(manager, vm, lun)
            try:
                for key in [k for k in writer.acked if k[0] == lun]:
                    read[key] = bytes(backend.read(key[1] * 512, 512))
                assert backend.read(BEFORE, 16) == b"before the move "
            finally:
                backend.close()
    writer.holds(read)
    if snapshot:
        assert _snapshot_image(state) == image_s1


@pytest.mark.parametrize(
    ("point", "dest", "expected"),
    [
        ("move.copying", "directory", "default"),
        ("move.catchup", "directory", "default"),
        ("move.committed", "directory", "p2"),  # the intent names every copy: forward
        ("move.switched", "directory", "p2"),
        ("move.committed", "device", "default"),  # the table commit is the commit point
        ("move.published", "device", "p2"),
    ],
)
def test_kill_during_live_move(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str, dest: str, expected: str
) -> None:
    state = tmp_path / "state"
    _setup(state, snapshot=True, dest=dest)
    image_s1 = _snapshot_image(state)
    target = _start(tmp_path, state, monkeypatch, **{ENV: point})
    writer = Writer(target.port)
    thread = threading.Thread(target=writer.run, daemon=True)
    thread.start()
    try:
        cli = _move_while_writing(tmp_path, state, writer)
        _out, err = cli.communicate(timeout=600)
        assert cli.returncode != 0 and "closed" in err, err
        assert target.proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        target.stop()
    thread.join(timeout=300)
    assert not writer.errors, writer.errors  # it died with the daemon, never an error
    assert len(writer.acked) > DURING_PAUSE // 2
    grant_vms(state, *CLIENTS, WRITER)
    again = start_target(tmp_path / "again", "--state-dir", str(state))
    try:
        writer.holds(_read_all(again.port, set(writer.acked)))
    finally:
        again.stop()
    pools, names = _placement(state)
    assert pools == {expected}  # exactly one pool
    other = "p2" if expected == "default" else "default"
    assert not _leftovers(state, other, names)
    assert _snapshot_image(state) == image_s1
