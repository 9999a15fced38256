"""No traceback escapes the CLI: every failure is one line on stderr
(``iscsi-vmtarget: ...``, naming the path where one is involved), a non-zero exit status,
and nothing left behind. Run in-process through ``main(argv)``: no daemon, no subprocess."""

from __future__ import annotations

import argparse
import contextlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from iscsi_vmtarget import __version__
from iscsi_vmtarget.cli import serve as serve_cli
from iscsi_vmtarget.cli.main import build_parser, main

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


# -- every verb, with bad arguments ---------------------------------------------------------
#
# The argparse tree is walked, so a new verb is covered without touching this file. Each
# case keeps the other required arguments valid (BASELINE) and makes one argument bad:
# missing, malformed, out of range, a path that cannot be used, a name that does not exist.

TARGET = "iqn.2026-11.test:errors"
INITIATOR = "iqn.2026-11.test:initiator"

#: A valid value for each required argument, by dest (overridden per verb below).
BASELINE: dict[str, str | list[str]] = {
    "name": "a",
    "disk": "2M",
    "memory": "1M",
    "size": "1M",
    "snapshot": "s1",
    "src": "a",
    "dst": "b",
    # port 9 (discard): nothing listens, the connection is refused at once
    "to": f"iscsi://127.0.0.1:9/{TARGET}/0",
    "assignments": ["cpus=2"],
    "words": ["list", "a"],
    "target": TARGET,
    "number": "3",
    "names": [TARGET, INITIATOR],
    "initiator": INITIATOR,
    "listen": "127.0.0.1:3261",
    "pool": "default",
}
NEW_NAME = {("vm", "create"), ("vm", "receive"), ("pool", "create"), ("target", "create")}

#: Bad values by the argument's type (argparse ``type``): malformed, then out of range.
BAD_BY_TYPE: dict[str, list[str]] = {
    "size_arg": ["x", "-1M", "0", "1000000P"],
    "parse_size": ["x", "-1M", "0", "1000000P"],
    "_lun_size": ["x", "1=x", "999=1M", "0=0"],
    "int": ["x", "-1", "99999999999"],
    "float": ["x", "-1", "nan", "inf"],
    "_nop_seconds": ["x", "-1", "nan", "inf"],
    "_portal": ["x", "127.0.0.1:70000", "127.0.0.1:-1", "[::1"],
    "_portal_arg": ["x", "127.0.0.1:70000", "127.0.0.1:-1", "[::1"],
    "_luns": ["x", "-1", "99999", "0,0"],
    "_lease_seconds": ["x", "0", "1e9"],
    "lun_number": ["x", "-1", "16384"],
    "tpgt": ["x", "-1", "65536"],
}
#: Untyped arguments by dest: paths that cannot be used, names that do not exist.
DIR_DESTS = {"state_dir"}
FILE_DESTS = {"key_file", "config", "file", "path", "output", "replica", "source_key", "device"}
NAME_DESTS = {"name", "snapshot", "src", "pool", "target", "from_snapshot", "vm", "words"}


def leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[Leaf]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield Leaf(path, parser)
        return
    for name, child in subs[0].choices.items():
        yield from leaves(child, (*path, name))


@dataclass(frozen=True)
class Leaf:
    path: tuple[str, ...]
    parser: argparse.ArgumentParser

    def actions(self) -> list[argparse.Action]:
        return [a for a in self.parser._actions if a.dest != "help" and a.nargs != 0]

    def value(self, action: argparse.Action, tmp: Path) -> list[str]:
        if self.path in NEW_NAME and action.dest == "name":
            return [TARGET + "x" if self.path[0] == "target" else "fresh"]
        if action.dest == "file":  # vm state write reads it, vm state read writes it
            return [str(tmp / "in.bin")]
        if action.dest == "path":
            return [str(tmp / "lun.img")]
        value = BASELINE.get(action.dest, "x")
        return value if isinstance(value, list) else [value]

    def argv(self, tmp: Path, state: Path, bad: argparse.Action | None, value: str) -> list[str]:
        """The verb with every required argument valid, ``bad`` given ``value``."""
        argv = list(self.path)
        for action in self.actions():
            if action is bad:
                words = [value]
            elif action.required or not action.option_strings:
                if action.nargs == "?":
                    continue
                words = self.value(action, tmp)
                if action.dest == "names" and bad is not None and bad.dest == "vm":
                    words = [INITIATOR]  # --vm NAME INITIATOR: the VM's target is implied
            else:
                continue
            argv += [action.option_strings[0], *words] if action.option_strings else words
        if bad is None or bad.dest != "state_dir":
            argv += ["--state-dir", str(state)]
        if self.path == ("serve",) and (bad is None or bad.dest != "portal"):
            argv += ["--portal", "127.0.0.1:0"]  # never the default 0.0.0.0-style portal
        return argv


def bad_values(leaf: Leaf, action: argparse.Action, tmp: Path) -> list[str]:
    kind = getattr(action.type, "__name__", "")
    if leaf.path in NEW_NAME and action.dest == "name":
        return ["bad/name", ""]  # a name that cannot be made
    if leaf.path == ("pool", "create") and action.dest == "path":
        return ["/proc/x/y", str(tmp / "a-file")]  # a pool's path is a directory
    if action.choices is not None and not isinstance(action.choices, dict):
        return ["bogus"]
    if kind in BAD_BY_TYPE:
        return BAD_BY_TYPE[kind]
    if action.dest in DIR_DESTS:
        return ["/proc/x", str(tmp / "a-file")]  # nothing can be made there; not a directory
    if action.dest in FILE_DESTS:
        return ["/proc/x/y", str(tmp)]  # no such place; a directory where a file is expected
    if action.dest in NAME_DESTS:
        return ["no-such-thing"]
    return []


def cases() -> list[Any]:
    out = []
    for leaf in leaves(build_parser()):
        verb = " ".join(leaf.path)
        if any(a.required or (not a.option_strings and a.nargs != "?") for a in leaf.actions()):
            out.append(pytest.param(leaf, None, "", id=f"{verb}:missing"))
        for action in leaf.actions():
            for value in bad_values(leaf, action, Path("TMP")):
                out.append(pytest.param(leaf, action, value, id=f"{verb}:{action.dest}={value}"))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A state directory with a VM ``a`` (snapshot ``s1``) and a target with LUN 0."""
    tmp = tmp_path_factory.mktemp("cli-errors")
    state = tmp / "state"
    (tmp / "a-file").write_text("a file where a directory is expected\n")
    (tmp / "in.bin").write_bytes(bytes(512))
    with contextlib.redirect_stdout(io.StringIO()):
        for argv in (
            ["vm", "create", "a", "--disk", "2M", "--memory", "1M"],
            ["vm", "snapshot", "a", "s1"],
            ["target", "create", TARGET],
            ["lun", "map", TARGET, "0", str(tmp / "lun0.img"), "--size", "1M"],
        ):
            assert main([*argv, "--state-dir", str(state)]) == 0, argv
    return tmp, state


@pytest.mark.parametrize(("leaf", "bad", "value"), cases())
def test_bad_arguments_fail_in_one_line(
    world: tuple[Path, Path],
    leaf: Leaf,
    bad: argparse.Action | None,
    value: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tmp, state = world
    monkeypatch.chdir(tmp)  # a default ./var/... would land in tmp, never in the checkout

    def would_serve(*args: object) -> int:
        raise AssertionError("serve accepted bad arguments and started serving")

    monkeypatch.setattr(serve_cli, "_run_loop", would_serve)
    # the state-directory lock is held until the process exits: in-process, a serve
    # case that got that far would lock every later case out of the state directory
    monkeypatch.setattr(serve_cli, "hold_state_dir", lambda path: None)
    value = value.replace("TMP", str(tmp))
    before = files_under(tmp)
    argv = leaf.argv(tmp, state, bad, value)
    if bad is None:  # missing: the verb alone
        argv = [*leaf.path, "--state-dir", str(state)]
    code, _, err = run(capsys, *argv)
    assert files_under(tmp) == before, argv
    if code == 0 and unused_if_irrelevant(bad, value):
        return  # an option this verb did not use, and nothing changed
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert_one_line_failure(code, err, usage=code == 2 and ": error: " in last)


def unused_if_irrelevant(action: argparse.Action | None, value: str) -> bool:
    """An optional path or name (``--key-file``, ``--output``...) matters to some runs of
    a verb only: given where it is not used it may be ignored. Required arguments and
    typed values (sizes, numbers, portals) are always checked. A --state-dir that does
    not exist is a fresh one: a verb that only reads lists it empty (``pool list``
    shows the default pool), one that writes must fail to create it."""
    if action is not None and action.dest == "state_dir":
        return not Path(value).exists()
    return (
        action is not None
        and bool(action.option_strings)
        and not action.required
        and getattr(action.type, "__name__", "") not in BAD_BY_TYPE
        and action.choices is None
    )
