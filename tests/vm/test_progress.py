"""The progress bar of long copies (``vm clone --full``, ``vm unlink``, ``vm move``):
drawn on stderr when it is a terminal or with ``--progress``, silent otherwise."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

from iscsi_vmtarget.cli.progress import progress_bar
from iscsi_vmtarget.vm import StateDir, VmManager

MIB = 1 << 20


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_only_on_a_terminal_or_when_asked() -> None:
    quiet = io.StringIO()
    bar = progress_bar("moving", stream=quiet)
    bar(1, 2)
    bar.close()
    assert quiet.getvalue() == ""
    for stream, forced in ((Tty(), False), (io.StringIO(), True)):
        bar = progress_bar("moving", forced, stream=stream)
        for done in range(0, 3 * MIB + 1, 4096):
            bar(done, 3 * MIB)
        bar.close()
        lines = stream.getvalue().split("\r")[1:]
        assert lines[0].startswith("moving   [------------------------------]   0%")
        assert lines[-1].startswith(
            "moving   [##############################] 100%  3.00MiB / 3.00MiB"
        )
        assert lines[-1].endswith("\n")
        assert len(lines) <= 131  # redrawn at most every 0.1 s, not per piece


def _ivt(state: Path, *args: str) -> tuple[str, str]:
    """(stdout, stderr) of the CLI, stderr kept byte-exact (text mode would turn
    the bar's carriage returns into newlines)."""
    proc = subprocess.run(
        [sys.executable, "-m", "iscsi_vmtarget", *args, "--state-dir", str(state)],
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.decode(), proc.stderr.decode()


def test_clone_and_move_show_progress_when_asked(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with VmManager(StateDir.at(str(state))) as manager:
        manager.create("vm1", disk=8 * MIB, memory=MIB)
        manager.catalog.create_directory("p2", None)
    assert _ivt(state, "vm", "clone", "vm1", "quiet", "--full")[1] == ""  # not a tty
    shown = _ivt(state, "vm", "clone", "vm1", "loud", "--full", "--progress")[1]
    assert (
        shown.startswith("\rcloning  [") and "100%  8.00MiB / 8.00MiB" in shown.rpartition("\r")[2]
    )
    assert shown.endswith("\n")
    out, err = _ivt(state, "vm", "move", "vm1", "--pool", "p2", "--progress")
    last = err.rpartition("\r")[2]  # the bar as it was left
    assert err.startswith("\rmoving   [") and last.startswith("moving   [" + "#" * 30 + "] 100%")
    assert "moved VM vm1 to pool p2" in out
