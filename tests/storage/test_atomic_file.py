"""The one crash-atomic file writer (storage/atomic_file.py): whole or untouched."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from iscsi_vmtarget.storage import atomic_file


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_file_replaces_whole_with_exact_mode(tmp_path: Path) -> None:
    path = tmp_path / "state.pr"
    atomic_file.write_file(str(path), b"old", tmp=f"{path}.tmp", mode=0o600)
    atomic_file.write_file(str(path), b"new", tmp=f"{path}.tmp", mode=0o600)
    assert path.read_bytes() == b"new" and _mode(path) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pr"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    atomic_file.write_file(str(path), b"old", mode=0o600)  # a fresh hidden temporary

    def crash() -> None:
        raise RuntimeError("killed between fsync and rename")

    with pytest.raises(RuntimeError):
        atomic_file.write_file(str(path), b"new", before_rename=crash)
    with pytest.raises(ValueError), atomic_file.writing(str(path), tmp=f"{path}.part") as fh:
        fh.write(b"half")
        raise ValueError("the source failed")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_create_file_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    tmp = str(tmp_path / ".master.key.tmp-1")
    atomic_file.create_file(str(path), b"first", tmp=tmp)
    with pytest.raises(FileExistsError):
        atomic_file.create_file(str(path), b"second", tmp=tmp)
    assert path.read_bytes() == b"first" and _mode(path) == 0o600
    assert not os.path.exists(tmp)


def test_write_json_makes_the_directory_and_remove_is_durable(tmp_path: Path) -> None:
    path = tmp_path / "intents" / "move.json"
    atomic_file.write_json(str(path), {"a": 1})
    assert path.read_text() == '{"a": 1}'
    assert atomic_file.remove(str(path)) is True
    assert atomic_file.remove(str(path), missing_ok=True) is False
