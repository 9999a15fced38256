"""No traceback escapes the CLI: every failure is one line on stderr
(``iscsi-vmtarget: ...``, naming the path where one is involved), a non-zero exit status,
and nothing left behind. Run in-process through ``main(argv)``: no daemon, no subprocess."""

from __future__ import annotations

from pathlib import Path

import pytest

from iscsi_vmtarget import __version__
from iscsi_vmtarget.cli.main import main

TOOL = "iscsi-vmtarget"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse: usage errors (2), --help and --version (0)
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def files_under(root: Path) -> set[str]:
    """Every file and directory below ``root``, lock files aside (an flock file is
    created once and kept on purpose: removing it would race with another locker)."""
    if not root.exists():
        return set()
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if not (p.parent.name == "locks" and p.suffix == ".lock")
    }


def assert_one_line_failure(code: int, err: str, *, usage: bool = False) -> None:
    assert code != 0
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    if usage:  # argparse's own format: usage lines, then "<prog>: error: ..."
        assert code == 2 and ": error: " in lines[-1], err
    else:
        assert len(lines) == 1 and lines[0].startswith(f"{TOOL}: "), err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"{TOOL} {__version__}"


def test_serve_on_an_impossible_state_dir(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "serve", "--state-dir", "/proc/x", "--portal", "127.0.0.1:0")
    assert_one_line_failure(code, err)
    assert "/proc/x" in err


def test_a_unit_the_file_system_cannot_hold_leaves_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    assert run(capsys, "vm", "create", "a", "--disk", "2M", "--memory", "1M",
               "--state-dir", str(state))[0] == 0  # fmt: skip
    before = files_under(state)
    code, _, err = run(capsys, "vm", "create", "x", "--disk", "100T", "--memory", "1M",
                       "--state-dir", str(state))  # fmt: skip
    assert_one_line_failure(code, err)
    assert "File too large" in err and str(state / "pools" / "default") in err
    assert files_under(state) == before  # no .<uuid>.unit.tmp
