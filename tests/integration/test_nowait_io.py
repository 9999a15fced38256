"""Inline READ/WRITE without blocking, through the real server (issue 18): a read of
blocks not in the page cache and a write the kernel refuses (the backend's seam, as
throttling cannot be provoked reliably) run again in a worker thread, land exactly
once, are counted, and other sessions are served while such a fallback runs."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from iscsi_vmtarget.client.initiator import Initiator, ScsiResult, cdb16
from iscsi_vmtarget.storage.nowait import REFUSE_ENV
from iscsi_vmtarget.testing.page_cache import evict
from iscsi_vmtarget.vm.faults import PAUSE_ENV
from tests.conftest import INITIATOR, RunningTarget, lun_counters, start_with_config

IQN = "iqn.2026-11.org.iscsi-vmtarget:nowait"
BLOCK = 512
CONFIG = """
[[target]]
name = "{iqn}"
[[target.lun]]
number = 0
path = "{path}"
size = "4M"
"""


def _serve(tmp_path: Path) -> tuple[RunningTarget, Path]:
    path = tmp_path / "lun.img"
    config = CONFIG.format(iqn=IQN, path=path)
    return start_with_config(tmp_path, config, "--metrics", "127.0.0.1:0"), path


def _session(target: RunningTarget, isid: int) -> Initiator:
    ini = Initiator(
        port=target.port,
        initiator_name=INITIATOR,
        target_name=IQN,
        isid=(0x400001370000 + isid).to_bytes(6, "big"),
    )
    ini.login()
    ini.command(bytes(6))  # the power-on unit attention
    return ini


def test_read_of_blocks_not_in_the_page_cache(tmp_path: Path) -> None:
    target, path = _serve(tmp_path)
    try:
        ini = _session(target, 1)
        data = os.urandom(64 * 1024)
        ini.write16(0, data, BLOCK)
        if not evict(str(path)):
            pytest.skip("no nowait reads on this file system (tmpfs), or pages kept")
        assert ini.read16(0, 8, BLOCK) == data[:4096]  # waited for the disk in a thread
        assert ini.read16(8, 112, BLOCK) == data[4096:-4096]
        counters = lun_counters(target)
        assert counters["read_commands"] == 2
        assert counters["errors"] == 1  # the power-on unit attention
        assert counters["nowait_fallbacks"] >= 1  # the first; readahead may cover the second
        ini.logout()
    finally:
        target.stop()


def _wait_for(path: Path, limit: float = 20.0) -> None:
    deadline = time.monotonic() + limit
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.01)


def test_refused_write_lands_once_while_other_sessions_are_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pause = tmp_path / "pause"
    pause.mkdir()
    monkeypatch.setenv(REFUSE_ENV, "write")
    monkeypatch.setenv(PAUSE_ENV, f"nowait.fallback:{pause}")
    target, path = _serve(tmp_path)
    try:
        writer, reader = _session(target, 1), _session(target, 2)
        data = os.urandom(8 * BLOCK)
        results: list[ScsiResult] = []
        cdb = cdb16(0x8A, 0, 64, 8)  # WRITE(16)
        thread = threading.Thread(target=lambda: results.append(writer.command(cdb, data_out=data)))
        thread.start()
        _wait_for(pause / "nowait.fallback.reached")  # the write waits in its worker thread
        # meanwhile the other session's reads are served (inline: page cache, holes)
        assert reader.read16(0, 8, BLOCK) == bytes(8 * BLOCK)
        assert reader.read16(64, 8, BLOCK)[: 4 * BLOCK] == data[: 4 * BLOCK]  # cut half way
        assert thread.is_alive() and not results
        (pause / "nowait.fallback.go").touch()
        thread.join(20)
        assert [r.status for r in results] == [0]
        assert reader.read16(64, 8, BLOCK) == data
        with open(path, "rb") as fh:
            fh.seek(64 * BLOCK)
            assert fh.read(8 * BLOCK) == data
        counters = lun_counters(target)
        assert counters["write_commands"] == 1 and counters["nowait_fallbacks"] == 1
        assert counters["errors"] == 2  # the power-on unit attention of each session
        writer.logout()
        reader.logout()
    finally:
        target.stop()
