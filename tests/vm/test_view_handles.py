"""Unit handles of a guest view across live resizes (issue 17's soak: one descriptor
kept per resize): a replaced handle is closed once no I/O uses it, and no I/O ever
runs on a closed one."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from iscsi_vmtarget.storage import BackendError, FileBackend
from iscsi_vmtarget.storage.file import create_sparse_file
from iscsi_vmtarget.vm.format.header import MIB, Mode, UnitHeader
from iscsi_vmtarget.vm.format.layout import plan_growth
from iscsi_vmtarget.vm.layers.view import GuestView
from tests.vm.helpers import make_header

RESIZES = 40


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def grown(header: UnitHeader, path: Path) -> UnitHeader:
    """``header`` with 1 MiB more disk, its unit file extended to match (the hidden
    regions are not copied: these tests use only guest data past the first MiB,
    which a growth never moves)."""
    plan = plan_growth(header, header.disk_size + MIB)
    os.truncate(path, plan.unit_size)
    return replace(header, regions=plan.regions, unit_size=plan.unit_size)


def file_view(tmp_path: Path, mode: Mode) -> tuple[GuestView, UnitHeader, Path]:
    header = make_header(mode, 4 * MIB)
    path = tmp_path / "unit"
    create_sparse_file(str(path), header.unit_size)
    return GuestView(FileBackend(str(path)), header), header, path


@pytest.mark.parametrize("mode", [Mode.TRUNCATE, Mode.OFFSET, Mode.ALIGNED])
def test_live_resizes_keep_no_descriptor(tmp_path: Path, mode: Mode) -> None:
    view, header, path = file_view(tmp_path, mode)
    view.write(MIB, b"x" * 4096)  # past the guest's first MiB: no fake growth moves it
    before = open_fds()
    for _ in range(RESIZES):
        header = grown(header, path)
        with view.quiesce():
            view.update(header)
        assert view.read(MIB, 4096) == b"x" * 4096
    assert open_fds() == before  # each replaced handle closed, the current one kept
    view.close()
    assert open_fds() == before - 1


@pytest.fixture
def watched_files() -> Iterator[dict[str, int]]:
    """Counts I/O running on each FileBackend and any close() that finds I/O on it
    ("violations"): the descriptor would be closed under that I/O."""
    lock = threading.Lock()
    running: dict[int, int] = {}
    seen = {"violations": 0, "closed": 0}
    originals = {name: getattr(FileBackend, name) for name in ("read_into", "write", "close")}

    def counted(name: str):  # type: ignore[no-untyped-def]
        def run(self: FileBackend, *args: object) -> None:
            with lock:
                running[id(self)] = running.get(id(self), 0) + 1
            try:
                originals[name](self, *args)
            finally:
                with lock:
                    running[id(self)] -= 1

        return run

    def close(self: FileBackend) -> None:
        with lock:
            seen["closed"] += 1
            if running.get(id(self)):
                seen["violations"] += 1
        originals["close"](self)

    mp = pytest.MonkeyPatch()
    mp.setattr(FileBackend, "read_into", counted("read_into"))
    mp.setattr(FileBackend, "write", counted("write"))
    mp.setattr(FileBackend, "close", close)
    yield seen
    mp.undo()


@pytest.mark.parametrize("mode", [Mode.TRUNCATE, Mode.OFFSET, Mode.ALIGNED])
def test_no_io_on_a_closed_handle_during_live_resizes(
    tmp_path: Path, mode: Mode, watched_files: dict[str, int]
) -> None:
    """Writers verify their own blocks while the view is resized under them; the
    descriptors freed meanwhile are taken by decoy files at once, so an I/O on a
    closed descriptor would fail or land in a decoy (checked to stay empty)."""
    view, header, path = file_view(tmp_path, mode)
    stop = threading.Event()
    errors: list[str] = []

    def writer(index: int) -> None:
        block = 4096
        n = 0
        while not stop.is_set():
            data = bytes([index + 1]) * 512 + n.to_bytes(8, "big") * 448
            at = MIB + (index * 16 + n % 16) * block
            try:
                view.write(at, data)
                if view.read(at, block) != data:
                    errors.append(f"writer {index}: block {at} read back wrong")
            except Exception as exc:  # any failure is the finding
                errors.append(f"writer {index}: {exc!r}")
                return
            n += 1

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    decoys: list[int] = []
    try:
        for i in range(RESIZES):
            header = grown(header, path)
            with view.quiesce():
                view.update(header)
            decoy = tmp_path / f"decoy{i}"
            decoy.touch()
            decoys.append(os.open(decoy, os.O_RDWR))
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        view.close()
        for fd in decoys:
            os.close(fd)
    assert errors == []
    assert watched_files["violations"] == 0
    assert watched_files["closed"] == RESIZES + 1  # every handle, none twice
    assert all((tmp_path / f"decoy{i}").stat().st_size == 0 for i in range(RESIZES))


def test_io_after_close_is_refused_not_sent_to_the_descriptor(tmp_path: Path) -> None:
    """A view closed (its target deleted under a session) refuses I/O with an error
    rather than using a descriptor number that may name another file by then."""
    view, _header, _path = file_view(tmp_path, Mode.TRUNCATE)
    view.close()
    with pytest.raises(BackendError, match="closed"):
        view.read(0, 512)
    with pytest.raises(BackendError, match="closed"):
        view.write(0, b"x" * 512)
