"""``vm snapshot NAME SNAP --full`` of a VM the real server exports, while an initiator
writes: the daemon takes the snapshot under quiesce, then fills it as the LUNs serve
(a pause point holds the fill after its first grain until the writer has written
hundreds of blocks). The snapshot holds exactly the writes acknowledged before it - a
prefix of the writer's sequence - its layers alone hold its whole image, the writer
never saw an error; a revert to it then reads its bytes over iSCSI, and deleting its
predecessor changes nothing any snapshot or the LUNs read."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from iscsi_vmtarget.client.initiator import Initiator
from iscsi_vmtarget.vm import StateDir, VmManager
from iscsi_vmtarget.vm.faults import PAUSE_ENV
from tests.conftest import INITIATOR, grant_vms, start_target
from tests.integration.test_snapshot_serve import ivt
from tests.integration.test_vm_move_live import (
    IQN,
    SIZES,
    VM,
    WRITER,
    Writer,
    _setup,
    run_paused,
)
from tests.vm.helpers import snapshot_images
from tests.vm.test_snapshot_full import layers_alone

MIB = 1 << 20
CHUNK = 256  # blocks per READ over iSCSI


def _images(state: Path, snap: str) -> list[bytes]:
    return snapshot_images(state, VM, snap, len(SIZES))


def _block(image: bytes, lba: int) -> bytes:
    return image[lba * 512 : (lba + 1) * 512]


def _read_luns(port: int) -> list[bytes]:
    """Every byte of both LUNs, read over iSCSI."""
    ini = Initiator(port=port, initiator_name=INITIATOR, target_name=IQN)
    ini.login()
    try:
        out = []
        for lun, size in enumerate(SIZES):
            ini.command(bytes(6), lun=lun)  # a unit attention after the revert
            ini.command(bytes(6), lun=lun)
            blocks = size // 512
            out.append(
                b"".join(
                    ini.read16(lba, min(CHUNK, blocks - lba), 512, lun)
                    for lba in range(0, blocks, CHUNK)
                )
            )
        return out
    finally:
        ini.logout()
        ini.close()


def _full_snapshot_while_writing(tmp_path: Path, state: Path, writer: Writer) -> dict[str, object]:
    """``vm snapshot VM s2 --full`` paused in its fill while the writer writes."""
    cli = run_paused(
        tmp_path,
        writer,
        "fill.copying",
        *("vm", "snapshot", VM, "s2", "--full", "--progress", "--json", "--state-dir", str(state)),
    )
    out, err = cli.communicate(timeout=600)
    assert cli.returncode == 0, err
    assert "filling" in err  # the progress bar, drawn from the daemon's reports
    return dict(json.loads(out)["snapshot"])


def test_full_snapshot_of_a_served_vm_while_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    _setup(state, snapshot=True)  # data, then s1: so s2 freezes a delta layer
    s1 = _images(state, "s1")
    (tmp_path / "pause").mkdir()
    monkeypatch.setenv(PAUSE_ENV, f"fill.copying:{tmp_path / 'pause'}")
    grant_vms(state, INITIATOR, WRITER)
    target = start_target(tmp_path / "serve", "--state-dir", str(state))
    monkeypatch.delenv(PAUSE_ENV)
    writer = Writer(target.port)
    thread = threading.Thread(target=writer.run)
    try:
        thread.start()
        writer.wait_for(50)  # these land before the snapshot, DURING_PAUSE during the fill
        info = _full_snapshot_while_writing(tmp_path, state, writer)
        writer.wait_for(writer.count + 50)  # and these after the fill
        writer.stop.set()
        thread.join()
        assert not writer.errors and writer.died is None
        assert info["full"] is True and info["bytes"] == info["size"] == sum(SIZES)
        s2 = _images(state, "s2")
        with VmManager(StateDir.at(str(state))) as manager:
            assert layers_alone(manager, VM, "s2") == s2  # nothing read from below
        # s2 holds exactly a prefix of the writer's acknowledged writes, s1's bytes
        # elsewhere (every write went to another block)
        written = list(writer.acked.items())
        held = [_block(s2[lun], lba) == block for (lun, lba), block in written]
        count = held.count(True)
        assert 50 <= count < len(written) and held == [True] * count + [False] * (
            len(written) - count
        )
        for lun in (0, 1):
            image = bytearray(s1[lun])
            for (at, lba), block in written[:count]:
                if at == lun:
                    image[lba * 512 : (lba + 1) * 512] = block
            assert s2[lun] == image
        assert "daemon" in ivt(state, "vm", "revert", VM, "s2")
        assert _read_luns(target.port) == s2
        assert "daemon" in ivt(state, "vm", "snapshot", "delete", VM, "s1")
        assert _images(state, "s2") == s2
        assert _read_luns(target.port) == s2
        listed = json.loads(ivt(state, "vm", "snapshot", "list", VM, "--json"))
        assert [(i["name"], i["full"]) for i in listed] == [("s2", True)]
    finally:
        writer.stop.set()
        thread.join()
        target.stop()
