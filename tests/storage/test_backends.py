"""Storage backends: sparse files and raw block devices behind one interface."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from iscsi_vmtarget.storage import (
    Abilities,
    AllocationMap,
    BackendError,
    BlockBackend,
    CryptoErasable,
    FileBackend,
    MemoryBackend,
    Zeroing,
    create_sparse_file,
)


def test_sparse_file_is_created_sparse_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "lun.img"
    create_sparse_file(str(path), 1 << 30)
    st = os.stat(path)
    assert st.st_size == 1 << 30 and st.st_blocks * 512 < 1 << 20
    assert oct(st.st_mode & 0o777) == "0o600"
    with pytest.raises(FileExistsError):
        create_sparse_file(str(path), 4096)
    assert os.stat(path).st_size == 1 << 30


def test_open_missing_or_wrong_kind_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="cannot open backing store"):
        FileBackend(str(tmp_path / "missing.img"))
    with pytest.raises(BackendError, match="Is a directory"):
        FileBackend(str(tmp_path))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(BackendError, match="neither a regular file nor a block device"):
        FileBackend(str(fifo))
    assert not (tmp_path / "missing.img").exists()


def _exercise(b: BlockBackend) -> None:
    assert isinstance(b, BlockBackend)
    data = os.urandom(8192)
    b.write(4096, data)
    b.flush()
    assert bytes(b.read(4096, 8192)) == data
    buf = bytearray(4096)
    b.read_into(8192, memoryview(buf))
    assert bytes(buf) == data[4096:]
    b.unmap(4096, 4096)
    assert bytes(b.read(4096, 4096)) == bytes(4096)
    assert bytes(b.read(8192, 4096)) == data[4096:]
    with pytest.raises(ValueError):
        b.read(b.size - 512, 1024)
    with pytest.raises(ValueError):
        b.write(-512, b"x" * 512)


def test_file_backend_io_and_hole_punching(tmp_path: Path) -> None:
    path = tmp_path / "lun.img"
    create_sparse_file(str(path), 16 << 20)
    b = FileBackend(str(path))
    try:
        _exercise(b)
        b.write(1 << 20, b"\xaa" * 65536)
        ranges = b.allocated_ranges(0, 16 << 20)
        assert any(off <= 1 << 20 < off + n for off, n in ranges)
        assert all(off + n <= 16 << 20 for off, n in ranges)
        b.unmap(1 << 20, 65536)
        assert not any(off <= 1 << 20 < off + n for off, n in b.allocated_ranges(0, 16 << 20))
    finally:
        b.close()


def test_read_only_file_backend_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "ro.img"
    create_sparse_file(str(path), 1 << 20)
    b = FileBackend(str(path), read_only=True)
    with pytest.raises(BackendError, match="read-only"):
        b.write(0, b"x" * 512)
    b.close()


def test_memory_backend() -> None:
    _exercise(MemoryBackend(1 << 20))


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    if shutil.which("losetup") is None:
        pytest.skip("losetup (util-linux) is not installed")
    image = tmp_path / "loop.img"
    create_sparse_file(str(image), 32 << 20)
    proc = subprocess.run(["losetup", "-f", "--show", str(image)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"no loop device on this machine: {proc.stderr.strip()}")
    dev = proc.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_block_device_backend(loop_device: str) -> None:
    b = FileBackend(loop_device)
    try:
        assert b.is_block_device and b.size == 32 << 20
        _exercise(b)
        with pytest.raises(BackendError, match="cannot be resized"):
            b.resize(64 << 20)
    finally:
        b.close()


def test_abilities_are_declared_protocols(tmp_path: Path) -> None:
    """What a LU may ask of its backend beyond BlockBackend, read once: a file can
    zero in place and map its extents; memory cannot change a key; a plain
    BlockBackend-only object offers nothing."""
    path = tmp_path / "lun.img"
    create_sparse_file(str(path), 1 << 20)
    file = FileBackend(str(path))
    try:
        got = Abilities.of(file)
        assert isinstance(file, Zeroing) and isinstance(file, AllocationMap)
        assert got.zero_range is not None and got.written_ranges is not None
        assert got.allocated_ranges is not None and got.crypto_erase is None
    finally:
        file.close()
    assert Abilities.of(MemoryBackend(4096)).written_ranges is None
    assert not isinstance(MemoryBackend(4096), CryptoErasable)
    assert Abilities.of(object()) == Abilities()
