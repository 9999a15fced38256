"""Live clone and unlink in one process (what the daemon's ``vm.clone`` and
``vm.unlink`` actions run), in a device pool (a deleted unit's extent is scrubbed, so
a chain left reading one would read zeros): threads write through the served chains
of the source and of the clone all along; the clone reads the source as it was at the
snapshot the clone took, unlink rebinds the clone's chains and a chain that reads
through its layers (its own snapshot, opened), and afterwards the source's snapshot
and the source itself can go while the clone keeps every byte."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from iscsi_vmtarget.server.vm_luns import export_vm
from iscsi_vmtarget.server.vm_startup import serve_vms
from iscsi_vmtarget.vm import StateDir, VmError, VmManager
from iscsi_vmtarget.vm.layers.cow import ChainBackend
from iscsi_vmtarget.vm.operations import snapshot as snaps
from iscsi_vmtarget.vm.operations.clone import clone, unlink
from tests.vm.helpers import snapshot_images
from tests.vm.test_move_live import _by_name, _chains

MIB = 1 << 20
BEFORE = b"before the clone " * 100


def _setup(state: Path) -> None:
    with VmManager(StateDir.at(str(state))) as manager:
        manager.catalog.create_device("dev", str(state.parent / "dev.img"), size=256 * MIB)
        manager.create("web", disk=4 * MIB, memory=MIB, secondaries=(2 * MIB,), pool="dev")
        for lun in (0, 1):
            backend = snaps.open_live(manager, manager.find("web"), lun)
            backend.write(MIB + 3, BEFORE)
            backend.flush()
            backend.close()


def _images(chains: dict[int, ChainBackend]) -> list[bytes]:
    return [bytes(chains[lun].read(0, chains[lun].size)) for lun in sorted(chains)]


@contextmanager
def _writing(
    chains: dict[int, ChainBackend], model: dict[tuple[int, int], bytes]
) -> Iterator[None]:
    """A thread writing 4 KiB pieces (some straddling grains: copy-on-write from
    below) through ``chains`` while the block runs; ``model`` gets what it wrote."""
    stop = threading.Event()
    failed: list[BaseException] = []

    def write() -> None:
        i = 0
        try:
            while not stop.is_set() or i < 100:
                lun = i % 2
                offset = (i * 7 * 4096 + 1536) % (chains[lun].size - 4096)
                data = f"write {i} ".encode().ljust(4096, b"+")
                chains[lun].write(offset, data)
                model[(lun, offset)] = data
                i += 1
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=write)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    assert not failed, failed


def _with(images: list[bytes], model: dict[tuple[int, int], bytes]) -> list[bytes]:
    out = [bytearray(image) for image in images]
    for (lun, offset), data in model.items():  # a dict keeps the order written
        out[lun][offset : offset + len(data)] = data
    return [bytes(image) for image in out]


def _roots(chains: list[ChainBackend]) -> set[object]:
    return {chain.root.unit_uuid for chain in chains}  # type: ignore[attr-defined]


def test_live_clone_then_unlink_while_both_are_written(tmp_path: Path) -> None:
    state = tmp_path / "state"
    _setup(state)
    served = serve_vms(str(state))
    kid_luns = None
    follower = None
    try:
        web = _chains(_by_name(served)["web"])
        web_model: dict[tuple[int, int], bytes] = {}
        kid_model: dict[tuple[int, int], bytes] = {}
        with VmManager(StateDir.at(str(state))) as manager, _writing(web, web_model):
            with pytest.raises(VmError, match="stop it first"):
                clone(manager, "web", "kid", full=False)  # offline: web is served
            assert clone(manager, "web", "kid", full=False, live=web) == "clone-kid"
            snapped = snapshot_images(state, "web", "clone-kid")
            assert snapped[1][MIB + 3 : MIB + 3 + len(BEFORE)] == BEFORE
            kid_luns = export_vm(manager.find("kid"), manager.catalog, manager.state.root)
            kid = _chains(kid_luns)
            assert _images(kid) == snapped  # the clone: web at the snapshot
            own = {manager.find("kid").lun_map()[n].header.unit_uuid for n in (0, 1)}
            with _writing(kid, kid_model):
                snaps.create_snapshot(manager, "kid", "k1", live=kid)
                follower = snaps.open_snapshot(manager, "kid", "k1")  # reads through kid
                k1 = follower.read(0, follower.size)
                assert not _roots([*kid.values(), follower]) & own  # they end in web
                with pytest.raises(VmError, match="unlinks it live"):
                    unlink(manager, "kid")  # offline: kid is served
                assert unlink(manager, "kid", live=kid, followers=[follower])
                assert _roots([*kid.values(), follower]) == own  # in kid's own units now
            assert not unlink(manager, "kid", live=kid)  # independent already
            snaps.delete_snapshot(manager, "web", "clone-kid", live=web)
            assert _images(kid) == _with(snapped, kid_model)
            assert follower.read(0, follower.size) == k1
            for chain in kid.values():
                chain.flush()  # SYNCHRONIZE CACHE: what the offline check below reads
        for (lun, offset), data in web_model.items():  # pieces never overlap partly
            assert web[lun].read(offset, len(data)) == data
    finally:
        if follower is not None:
            follower.close()
        if kid_luns is not None:
            kid_luns.close()
        for luns in served:
            luns.close()
    with VmManager(StateDir.at(str(state))) as manager:
        manager.delete("web")  # refused while kid was a linked clone of it
        vm = manager.find("kid", manager.discover())  # repairs: merges what it may
        for lun, image in enumerate(_with(snapped, kid_model)):
            backend = snaps.open_live(manager, vm, lun)
            try:
                assert backend.read(0, backend.size) == image
            finally:
                backend.close()


def test_live_full_clone_drops_its_snapshot(tmp_path: Path) -> None:
    state = tmp_path / "state"
    _setup(state)
    served = serve_vms(str(state))
    try:
        web = _chains(_by_name(served)["web"])
        before = _images(web)
        with VmManager(StateDir.at(str(state))) as manager:
            assert clone(manager, "web", "copy", full=True, live=web) is None
            assert snaps.list_snapshots(manager, "web") == []
            vm = manager.find("copy")
            copied = []
            for lun in (0, 1):
                backend = snaps.open_live(manager, vm, lun)
                copied.append(bytes(backend.read(0, backend.size)))
                backend.close()
        assert copied == before
        web[0].write(0, b"web goes on")
        assert web[0].read(0, 11) == b"web goes on"
    finally:
        for luns in served:
            luns.close()
