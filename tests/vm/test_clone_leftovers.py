"""What an interrupted ``vm clone`` leaves - its ``c-<hex>`` temporary VM and the
snapshot a linked clone of live disks takes - is removed by the next ``discover``
(kill -9 at each crash point), or at once when the clone fails with an error; the
clone can then simply be run again. A clone in progress is never rolled back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from iscsi_vmtarget.vm import StateDir, VmError, VmManager
from iscsi_vmtarget.vm.faults import PAUSE_ENV
from iscsi_vmtarget.vm.operations import clone as cloning
from iscsi_vmtarget.vm.operations import snapshot as snaps
from tests.vm.helpers import run_cli

MIB = 1 << 20


def _setup(state: Path) -> bytes:
    with VmManager(StateDir.at(str(state))) as manager:
        manager.create("vm1", disk=4 * MIB, memory=MIB, secondaries=(2 * MIB,))
        backend = snaps.open_live(manager, manager.find("vm1"), 0)
        backend.write(12345, b"source bytes" * 1000)
        backend.flush()
        image = bytes(backend.read(0, backend.size))
        backend.close()
        snaps.create_snapshot(manager, "vm1", "s1")
        return image


def _state(state: Path) -> tuple[list[str], list[str]]:
    """(VM names, vm1's snapshot names), without repairing anything."""
    with VmManager(StateDir.at(str(state))) as manager:
        found = manager.discover(repair=False)
        return (
            sorted(v.name for v in found.vms),
            sorted(
                i.name
                for i in snaps.snapshots(manager, manager.find("vm1", found), manager.keyring())
            ),
        )


@pytest.mark.parametrize(
    ("point", "how"),
    [
        ("clone.copying", ["--full"]),
        ("clone.copied", ["--full"]),
        ("clone.linking", []),  # a linked clone of the live disks: snapshot clone-copy
        ("clone.copied", []),
        ("clone.linking", ["--from-snapshot", "s1"]),
    ],
)
def test_killed_clone_is_rolled_back_by_discover(
    tmp_path: Path, point: str, how: list[str]
) -> None:
    state = tmp_path / "state"
    image = _setup(state)
    killed = run_cli(state, "vm", "clone", "vm1", "copy", *how, crashpoint=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    names, snapshots = _state(state)
    assert len(names) == 2 and names[0].startswith("c-")  # what the crash left
    if not how:
        assert snapshots == ["clone-copy", "s1"]
    report = json.loads(run_cli(state, "discover", "--json").stdout)
    actions = " ".join(r["action"] for r in report["repaired"])
    assert f"unfinished clone {names[0]} of VM vm1 removed" in actions
    assert _state(state) == (["vm1"], ["s1"])  # the temporary VM and clone-copy are gone
    assert not os.listdir(state / "conf" / "clones")
    again = run_cli(state, "vm", "clone", "vm1", "copy", *how)  # and it can just run again
    assert again.returncode == 0, again.stderr
    with VmManager(StateDir.at(str(state))) as manager:
        backend = snaps.open_live(manager, manager.find("copy"))
        try:
            assert backend.read(0, backend.size) == image
        finally:
            backend.close()
        assert not manager.discover().repaired


def test_failed_clone_is_rolled_back_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    _setup(state)

    def broken(*_args: object) -> None:
        raise VmError("state region unreadable")

    monkeypatch.setattr(cloning, "copy_sealed", broken)
    with VmManager(StateDir.at(str(state))) as manager:
        with pytest.raises(VmError, match="unreadable"):
            cloning.clone(manager, "vm1", "copy", full=False)
    assert _state(state) == (["vm1"], ["s1"])
    assert not os.listdir(state / "conf" / "clones")
    assert not [n for n in os.listdir(state / "locks") if n.startswith("clone.")]


def test_a_clone_in_progress_is_left_alone(tmp_path: Path) -> None:
    state = tmp_path / "state"
    _setup(state)
    pause = tmp_path / "pause"
    pause.mkdir()
    cloner = subprocess.Popen(
        [sys.executable, "-m", "iscsi_vmtarget", "vm", "clone", "vm1", "copy", "--full"]
        + ["--state-dir", str(state)],
        env={**os.environ, PAUSE_ENV: f"clone.created:{pause}"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120  # a hang guard, not a timing
        while not (pause / "clone.created.reached").exists():
            assert cloner.poll() is None and time.monotonic() < deadline, cloner.returncode
            time.sleep(0.01)
        report = json.loads(run_cli(state, "discover", "--json").stdout)  # a repair meanwhile
        assert not report["repaired"]
        names = _state(state)[0]
        assert len(names) == 2 and names[0].startswith("c-")  # its temporary VM survived
    finally:
        (pause / "clone.created.go").touch()
        _out, err = cloner.communicate(timeout=120)
    assert cloner.returncode == 0, err
    assert _state(state)[0] == ["copy", "vm1"]
    assert not os.listdir(state / "conf" / "clones")
    assert not [n for n in os.listdir(state / "locks") if n.startswith("clone.")]
