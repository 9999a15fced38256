"""A qemu guest whose disks are LUNs of the real target through QEMU's libiscsi driver.

One guest boot, two disks on a virtio-scsi controller, no guest network:

* ``scsi-block`` (SCSI passthrough): the guest's sg_inq/sg_vpd/sg_readcap reach the target,
  so the guest sees our vendor, NAA designator (the same as iscsi-inq on the host) and the
  exact capacity;
* ``scsi-hd``: QEMU answers INQUIRY itself, but the size is still exactly the LUN's.

The guest writes a pattern with O_DIRECT on both; the host finds it in the backing files,
and the guest reads back what the host wrote there before the target started.
"""

from __future__ import annotations

import hashlib
import random
import re
import subprocess
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import INITIATOR, RunningTarget, host_naa_matches, start_target
from tests.interop.guestlib import (
    guest_tools,
    need,
    qemu_scsi_drives,
    scsi_disks_script,
    step_output,
)

pytestmark = pytest.mark.interop

IQN = "iqn.2026-11.org.iscsi-vmtarget:interop.qemu"
QEMU_INITIATOR = "iqn.2026-11.org.iscsi-vmtarget.test:qemu"
SIZES = {0: 48 << 20, 1: 40 << 20}  # LUN -> bytes (512-byte blocks)
DEVICES = {0: "scsi-block", 1: "scsi-hd"}  # LUN -> how the guest gets it
PATTERN_OFFSET = 8 << 20
HOST_OFFSET = 24 << 20
PATTERN_LEN = 1 << 20


def guest_script() -> str:
    return scsi_disks_script(len(DEVICES)) + textwrap.dedent(f"""
        while read hctl sd; do
          t=$(echo $hctl | cut -d: -f3)   # scsi-id = LUN number of the target
          dev=/dev/$sd
          step inq:$t sg_inq $dev
          step vpd-di:$t sg_vpd -p di $dev
          step readcap16:$t sg_readcap -l $dev
          step size:$t cat /sys/block/$sd/size
          step dd-write:$t dd if=/pattern.bin of=$dev bs=64k seek={PATTERN_OFFSET // 65536} \\
            oflag=direct conv=notrunc
          step dd-read:$t sh -c "dd if=$dev of=/tmp/back bs=64k skip={PATTERN_OFFSET // 65536} \\
            count={PATTERN_LEN // 65536} iflag=direct && cmp /pattern.bin /tmp/back && echo same"
          step host-pattern:$t sh -c "dd if=$dev bs=64k skip={HOST_OFFSET // 65536} \\
            count={PATTERN_LEN // 65536} iflag=direct 2>/dev/null | sha256sum"
          step flush:$t sg_sync $dev
        done < /tmp/disks
    """)


@dataclass
class QemuGuest:
    run: guest_tools.GuestRun
    target: RunningTarget
    state: Path
    pattern: bytes
    host_pattern: bytes

    def out(self, name: str, rc: int | None = 0) -> str:
        return step_output(self.run, name, rc)


@pytest.fixture(scope="module")
def qemu_guest(guest_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[QemuGuest]:
    work = tmp_path_factory.mktemp("qemu-iscsi")
    state = work / "luns"
    state.mkdir()
    rng = random.Random(11)
    pattern, host_pattern = rng.randbytes(PATTERN_LEN), rng.randbytes(PATTERN_LEN)
    luns = ""
    for lun, size in SIZES.items():
        with open(state / f"lun{lun}.img", "wb") as f:
            f.truncate(size)
            f.seek(HOST_OFFSET)
            f.write(host_pattern)
        luns += f'[[target.lun]]\nnumber = {lun}\npath = "{state}/lun{lun}.img"\n'
    config = work / "target.toml"
    config.write_text(
        f'[[target]]\nname = "{IQN}"\ninitiators = ["{QEMU_INITIATOR}", "{INITIATOR}"]\n{luns}'
    )
    target = start_target(work, "--config", str(config))
    extra = qemu_scsi_drives(target, IQN, DEVICES, QEMU_INITIATOR)
    try:
        run = guest_tools.boot(
            guest_script(),
            extra=extra,
            files={"pattern.bin": pattern},
            guest_dir=guest_dir,
            workdir=work,
        )
        yield QemuGuest(run, target, state, pattern, host_pattern)
    finally:
        target.stop()


def test_guest_ran_to_the_end(qemu_guest: QemuGuest) -> None:
    assert "@@@GUEST-DONE" in qemu_guest.run.console, qemu_guest.run.console
    assert qemu_guest.run.returncode == 0, qemu_guest.run.console
    assert len(qemu_guest.out("disks").split("\n")) == 2, qemu_guest.run.console


def test_qemu_logged_in_with_its_initiator_name(qemu_guest: QemuGuest) -> None:
    log = qemu_guest.target.log()
    assert f"initiator={QEMU_INITIATOR}" in log, log


@pytest.mark.parametrize("lun", list(SIZES))
def test_exact_capacity(qemu_guest: QemuGuest, lun: int) -> None:
    size = SIZES[lun]
    out = qemu_guest.out(f"readcap16:{lun}")
    assert f"Number of logical blocks={size // 512}" in out, out
    assert f"Device size: {size} bytes" in out, out
    assert int(qemu_guest.out(f"size:{lun}")) * 512 == size


def test_scsi_block_passes_inquiry_through(qemu_guest: QemuGuest) -> None:
    out = qemu_guest.out("inq:0")
    assert "Vendor identification: ISCSIVMT" in out, out
    # scsi-hd: QEMU's own emulated INQUIRY
    assert "Vendor identification: QEMU" in qemu_guest.out("inq:1")


def test_scsi_block_shows_our_naa_designator(qemu_guest: QemuGuest) -> None:
    out = qemu_guest.out("vpd-di:0")
    m = re.search(r"designator type: NAA,\s+code set: Binary\s*\n\s+0x([0-9a-f]+)", out)
    assert m, out
    naa = bytes.fromhex(m.group(1))
    need("iscsi-inq")
    r = subprocess.run(
        ["iscsi-inq", "-i", INITIATOR, "-e", "1", "-c", "131", qemu_guest.target.url(IQN, 0)],
        capture_output=True,
        timeout=60,
    )
    assert host_naa_matches(r.stdout, naa), (naa.hex(), r.stdout)
    assert f"{IQN},t,0x0001" in out, out


@pytest.mark.parametrize("lun", list(SIZES))
def test_guest_writes_land_in_backing_file(qemu_guest: QemuGuest, lun: int) -> None:
    qemu_guest.out(f"dd-write:{lun}")
    assert qemu_guest.out(f"dd-read:{lun}").endswith("same")
    qemu_guest.out(f"flush:{lun}", rc=None)
    with open(qemu_guest.state / f"lun{lun}.img", "rb") as f:
        f.seek(PATTERN_OFFSET)
        assert f.read(PATTERN_LEN) == qemu_guest.pattern


@pytest.mark.parametrize("lun", list(SIZES))
def test_guest_reads_what_the_host_wrote(qemu_guest: QemuGuest, lun: int) -> None:
    out = qemu_guest.out(f"host-pattern:{lun}")
    assert out.split()[0] == hashlib.sha256(qemu_guest.host_pattern).hexdigest(), out
