"""A qemu guest whose disks are a VM's units, through QEMU's libiscsi driver.

One guest boot against ``serve --state-dir`` exporting VM ``interop`` (``offset`` mode:
the hidden regions sit before the disk and the header after it, so a write that misses
the translation or the bound lands on them). LUN 0 (the base unit's disk) is a
``scsi-block`` passthrough disk, LUN 1 (a secondary unit) a ``scsi-hd`` disk:

1. the guest checks the size it sees, reads VPD 0x83/0x80 (passthrough), fills every
   byte of both disks with a pattern and asks the host (``ask_host``) to look: through
   the management path (``VmManager.read_state``/``config``, ``vm state read``, the
   units' raw views) the state and config are unchanged, every unit byte outside the
   guest's segments is as before the boot, and the pattern is exactly in the disk
   region; then the host takes snapshot ``s1`` through the running daemon;
2. the guest writes more, asks the host to revert to ``s1`` (live, over the admin
   socket), and reads again: the snapshot's bytes, the same designator and serial.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import random
import re
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from iscsi_vmtarget.server.vm_luns import DEFAULT_BASE_IQN
from iscsi_vmtarget.vm import Mode, StateDir, Unit, UnitHeader, VmManager
from iscsi_vmtarget.vm.layers.view import guest_segments
from tests.conftest import CLIENTS, RunningTarget, grant_vms, run_tool, start_target
from tests.interop.guestlib import guest_tools, qemu_scsi_drives, scsi_disks_script, step_output

pytestmark = pytest.mark.interop

MIB = 1 << 20
VM = "interop"
IQN = f"{DEFAULT_BASE_IQN}:vm.{VM}"
QEMU_INITIATOR = "iqn.2026-11.org.iscsi-vmtarget.test:qemu-vm"
DISKS = {0: 8 * MIB, 1: 4 * MIB}  # LUN -> disk bytes: the base unit, one secondary
DEVICES = {0: "scsi-block", 1: "scsi-hd"}
MEMORY = 4 * MIB
MORE_OFFSET = 2 * MIB  # where the guest writes after the snapshot
MORE_LEN = MIB


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Managed:
    """What the management path shows of the VM at one moment."""

    state: bytes  # the decrypted state image (VmManager.read_state)
    config: dict[str, object]
    headers: dict[int, UnitHeader]  # LUN -> its unit's header
    raw: dict[int, bytes]  # LUN -> every byte of its unit, through the raw view

    def guest_bytes(self, lun: int) -> bytes:
        """The unit bytes the guest's disk maps to, in guest order."""
        raw = self.raw[lun]
        return b"".join(raw[at : at + n] for _g, n, at in guest_segments(self.headers[lun]))

    def outside_guest(self, lun: int) -> bytes:
        """Every unit byte no guest LBA maps to (the guest's segments cut out)."""
        raw, out, cursor = self.raw[lun], bytearray(), 0
        for _g, n, at in sorted(guest_segments(self.headers[lun]), key=lambda s: s[2]):
            out += raw[cursor:at]
            cursor = at + n
        return bytes(out + raw[cursor:])


def managed(state_dir: Path) -> Managed:
    with VmManager(StateDir.at(str(state_dir))) as manager:
        state = b"".join(manager.read_state(VM))
        config = manager.config(VM)
        headers, raw = {}, {}
        for lun, found in manager.find(VM).lun_map().items():
            unit = Unit.open(manager.catalog.get(found.pool), found.ref, repair=False)
            with contextlib.closing(unit), contextlib.closing(unit.raw_view()) as view:
                headers[lun], raw[lun] = unit.header, bytes(view.read(0, view.size))
        return Managed(state, config, headers, raw)


def ivt(state_dir: Path, *args: str) -> str:
    """Run the CLI against STATE_DIR; its stdout (bytes as latin-1 characters)."""
    cmd = [sys.executable, "-m", "iscsi_vmtarget", *args, "--state-dir", str(state_dir)]
    return run_tool(*cmd).stdout


def guest_script() -> str:
    per_disk = "disk_sha() { dd if=$1 bs=1M iflag=direct 2>/dev/null | sha256sum; }\n"
    for lun in DISKS:
        per_disk += textwrap.dedent(f"""
            d{lun}=$(disk_of {lun})
            step size:{lun} cat /sys/block/${{d{lun}#/dev/}}/size
            step readcap16:{lun} sg_readcap -l $d{lun}
            step fill:{lun} dd if=/fill{lun}.bin of=$d{lun} bs=1M oflag=direct
            step filled:{lun} disk_sha $d{lun}
        """)
    more = "".join(
        f"step more:{lun} dd if=/more.bin of=$d{lun} bs=64k seek={MORE_OFFSET // 65536} "
        f"oflag=direct conv=notrunc\n"
        f"step changed:{lun} disk_sha $d{lun}\n"
        for lun in DISKS
    )
    reverted = "".join(f"step reverted:{lun} disk_sha $d{lun}\n" for lun in DISKS)
    # nested ifs, not exit: the script runs inside the guest's /init
    return (
        scsi_disks_script(len(DISKS))
        + per_disk
        + "step vpd-di:before sg_vpd -p di $d0\nstep vpd-sn:before sg_vpd -p sn $d0\n"
        + "if ask_host snapshot; then\n"
        + more
        + "if ask_host revert; then\n"
        + reverted
        + "step vpd-di:after sg_vpd -p di $d0\nstep vpd-sn:after sg_vpd -p sn $d0\n"
        + "fi\nfi\n"
    )


@dataclass
class VmGuest:
    run: guest_tools.GuestRun
    target: RunningTarget
    fills: dict[int, bytes]
    more: bytes
    before: Managed  # before the target started
    during: Managed  # after the guest filled its disks, before the snapshot
    after: Managed  # after the revert, target stopped
    cli_state: bytes  # `vm state read VM -` during the boot
    host: dict[str, str] = field(default_factory=dict)  # request -> the CLI's answer

    def out(self, name: str, rc: int | None = 0) -> str:
        return step_output(self.run, name, rc)


@pytest.fixture(scope="module")
def vm_guest(guest_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VmGuest]:
    work = tmp_path_factory.mktemp("qemu-vm")
    state_dir = work / "state"
    rng = random.Random(7)
    fills = {lun: rng.randbytes(size) for lun, size in DISKS.items()}
    more, state_image = rng.randbytes(MORE_LEN), rng.randbytes(MEMORY)
    with VmManager(StateDir.at(str(state_dir))) as manager:
        manager.create(VM, disk=DISKS[0], memory=MEMORY, secondaries=(DISKS[1],), mode=Mode.OFFSET)
        manager.write_state(VM, io.BytesIO(state_image), len(state_image))
        manager.set_config(VM, ["cpus=2", "description=interop guest"])
    before = managed(state_dir)
    assert before.state.startswith(state_image) and before.config["cpus"] == 2
    grant_vms(state_dir, *CLIENTS, QEMU_INITIATOR)
    target = start_target(work, "--state-dir", str(state_dir))
    seen: dict[str, object] = {}
    host: dict[str, str] = {}

    def on_request(words: str) -> str:
        if words == "snapshot":
            seen["during"] = managed(state_dir)
            seen["cli_state"] = ivt(state_dir, "vm", "state", "read", VM, "-").encode("latin-1")
            host[words] = ivt(state_dir, "vm", "snapshot", VM, "s1")
        elif words == "revert":
            host[words] = ivt(state_dir, "vm", "revert", VM, "s1")
        else:
            return f"fail unknown request {words!r}"
        return "ok"

    try:
        run = guest_tools.boot(
            guest_script(),
            extra=qemu_scsi_drives(target, IQN, DEVICES, QEMU_INITIATOR),
            files={**{f"fill{lun}.bin": data for lun, data in fills.items()}, "more.bin": more},
            guest_dir=guest_dir,
            workdir=work,
            on_request=on_request,
        )
    finally:
        target.stop()
    if "during" not in seen:
        pytest.fail(f"the guest never asked for the snapshot\n{run.console}")
    yield VmGuest(
        run,
        target,
        fills,
        more,
        before,
        seen["during"],  # type: ignore[arg-type]
        managed(state_dir),
        seen["cli_state"],  # type: ignore[arg-type]
        host,
    )


def vpd_identity(di: str, sn: str) -> tuple[bytes, str]:
    """(NAA designator, unit serial number) as sg_vpd -p di / -p sn print them."""
    naa = re.search(r"designator type: NAA,\s+code set: Binary\s*\n\s+0x([0-9a-f]+)", di)
    serial = re.search(r"Unit serial number: (\S+)", sn)
    assert naa and serial, (di, sn)
    return bytes.fromhex(naa.group(1)), serial.group(1)


def test_vm_guest_ran_to_the_end(vm_guest: VmGuest) -> None:
    console = vm_guest.run.console
    assert "@@@GUEST-DONE" in console and vm_guest.run.returncode == 0, console
    assert list(vm_guest.host) == ["snapshot", "revert"], vm_guest.host
    # both went through the running daemon (live), not to the pool behind its back
    assert all("daemon" in answer for answer in vm_guest.host.values()), vm_guest.host


@pytest.mark.parametrize("lun", list(DISKS))
def test_vm_guest_sees_exactly_the_disk(vm_guest: VmGuest, lun: int) -> None:
    size = DISKS[lun]
    out = vm_guest.out(f"readcap16:{lun}")
    assert f"Number of logical blocks={size // 512}" in out, out
    assert f"Device size: {size} bytes" in out, out
    assert int(vm_guest.out(f"size:{lun}")) * 512 == size


@pytest.mark.parametrize("lun", list(DISKS))
def test_vm_guest_writes_land_in_the_disk_region_only(vm_guest: VmGuest, lun: int) -> None:
    vm_guest.out(f"fill:{lun}")
    assert vm_guest.out(f"filled:{lun}").split()[0] == sha(vm_guest.fills[lun])
    during, before = vm_guest.during, vm_guest.before
    assert during.guest_bytes(lun) == vm_guest.fills[lun]  # every byte, in place
    assert during.outside_guest(lun) == before.outside_guest(lun)  # header, GPT, hidden
    assert during.state == before.state and vm_guest.cli_state == before.state
    assert during.config == before.config


def test_vm_scsi_block_shows_the_units_identity(vm_guest: VmGuest) -> None:
    naa, serial = vpd_identity(vm_guest.out("vpd-di:before"), vm_guest.out("vpd-sn:before"))
    header = vm_guest.before.headers[0]
    assert naa == header.naa
    assert serial == header.unit_uuid.hex
    assert f"{IQN},t,0x0001" in vm_guest.out("vpd-di:before")


@pytest.mark.parametrize("lun", list(DISKS))
def test_vm_live_revert_under_a_running_guest(vm_guest: VmGuest, lun: int) -> None:
    fill = vm_guest.fills[lun]
    changed = fill[:MORE_OFFSET] + vm_guest.more + fill[MORE_OFFSET + MORE_LEN :]
    vm_guest.out(f"more:{lun}")
    assert vm_guest.out(f"changed:{lun}").split()[0] == sha(changed)
    assert vm_guest.out(f"reverted:{lun}").split()[0] == sha(fill)  # the snapshot's data
    # the base units were frozen by the snapshot: the writes after it never reached them
    assert vm_guest.after.guest_bytes(lun) == fill


def test_vm_identity_unchanged_by_the_revert(vm_guest: VmGuest) -> None:
    before = vpd_identity(vm_guest.out("vpd-di:before"), vm_guest.out("vpd-sn:before"))
    after = vpd_identity(vm_guest.out("vpd-di:after"), vm_guest.out("vpd-sn:after"))
    assert after == before


def test_vm_state_and_config_unchanged_by_the_guest_and_the_revert(vm_guest: VmGuest) -> None:
    assert vm_guest.after.state == vm_guest.before.state
    assert vm_guest.after.config == vm_guest.before.config
