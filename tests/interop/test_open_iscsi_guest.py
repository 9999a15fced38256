"""The Linux open-iscsi initiator and sg3_utils against the real target, in a qemu guest.

One guest boot (tools/guest, TCG) runs every step: iscsiadm discovery, logins with no
authentication, CHAP and mutual CHAP (and wrong secrets both ways), a login to a target
whose ACL does not name the guest, sg3_utils on every disk, O_DIRECT pattern round trips,
mkfs.ext4 + mount + write + umount, persistent reservations, logout. The console comes
back to the host, where each test checks one step's parsed output against what the
host knows: the backing files, the configuration and libiscsi's iscsi-inq.
"""

from __future__ import annotations

import hashlib
import os
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
    GUEST_INITIATOR,
    guest_tools,
    need,
    step_output,
)

pytestmark = pytest.mark.interop

PREFIX = "iqn.2026-11.org.iscsi-vmtarget:interop."
DISKS = PREFIX + "disks"
CHAP = PREFIX + "chap"
MUTUAL = PREFIX + "mutual"
MASKED = PREFIX + "masked"
PORTAL = guest_tools.GUEST_PORTAL
CHAP_USER, CHAP_SECRET = "guest", "guest-secret-0123"
MUTUAL_USER, MUTUAL_SECRET = "guest2", "guest2-secret-456"
TARGET_USER, TARGET_SECRET = "target", "target-secret-789"
WRONG_SECRET = "not-the-secret-000"

# (target, lun) -> (size, block size); labels name the disks in the guest's step names.
LUNS = {
    (DISKS, 0): (64 << 20, 512),
    (DISKS, 1): (32 << 20, 4096),
    (CHAP, 0): (24 << 20, 512),
    (MUTUAL, 0): (24 << 20, 512),
}
LABELS = {key: f"{key[0].rsplit('.', 1)[1]}-{key[1]}" for key in LUNS}
PATTERN_OFFSET = 16 << 20  # the guest writes PATTERN here on every disk
FS_SIZE = "8M"  # the ext4 file system on disks-1 stays below both patterns
HOST_OFFSET = 12 << 20  # the host wrote HOST_PATTERN here before the target started
PATTERN_LEN = 1 << 20
PR_KEY = 0x1234ABCD
UNMAP_LBA, UNMAP_BLOCKS = 16384, 2048  # on disks-0: written, then unmapped


def config_text(state: Path) -> str:
    def luns(target: str) -> str:
        return "".join(
            textwrap.dedent(f"""
            [[target.lun]]
            number = {lun}
            path = "{state}/{LABELS[(t, lun)]}.img"
            size = {size}
            block_size = {bs}
            """)
            for (t, lun), (size, bs) in LUNS.items()
            if t == target
        )

    return (
        textwrap.dedent(f"""
        [[target]]
        name = "{DISKS}"
        """)
        + luns(DISKS)
        + textwrap.dedent(f"""
        [[target]]
        name = "{CHAP}"
        [target.chap]
        user = "{CHAP_USER}"
        secret = "{CHAP_SECRET}"
        """)
        + luns(CHAP)
        + textwrap.dedent(f"""
        [[target]]
        name = "{MUTUAL}"
        [target.chap]
        user = "{MUTUAL_USER}"
        secret = "{MUTUAL_SECRET}"
        [target.mutual_chap]
        user = "{TARGET_USER}"
        secret = "{TARGET_SECRET}"
        """)
        + luns(MUTUAL)
        + textwrap.dedent(f"""
        [[target]]
        name = "{MASKED}"
        initiators = ["iqn.2026-11.org.iscsi-vmtarget.test:someone-else"]
        [[target.lun]]
        number = 0
        path = "{state}/masked-0.img"
        size = 8388608
        """)
    )


def node_set(iqn: str, **settings: str) -> str:
    return "\n".join(
        f"iscsiadm -m node -T {iqn} -p {PORTAL} -o update -n {k} -v {v} >/dev/null"
        for k, v in settings.items()
    )


def guest_script() -> str:
    chap = {
        "node.session.auth.authmethod": "CHAP",
        "node.session.auth.username": CHAP_USER,
    }
    mutual = {
        "node.session.auth.authmethod": "CHAP",
        "node.session.auth.username": MUTUAL_USER,
        "node.session.auth.password": MUTUAL_SECRET,
        "node.session.auth.username_in": TARGET_USER,
    }
    login = f"iscsiadm -m node -p {PORTAL} --login -T"
    first = LABELS[(DISKS, 0)]
    return textwrap.dedent(f"""
        step iscsid start_iscsid {GUEST_INITIATOR}
        step discovery iscsiadm -m discovery -t sendtargets -p {PORTAL}
        # discovery answers 127.0.0.1 (the target's own portal): make the guest's records
        for t in {DISKS} {CHAP} {MUTUAL} {MASKED}; do
          iscsiadm -m node -o new -T $t -p {PORTAL} >/dev/null
        done
        step login:disks {login} {DISKS}
        {node_set(CHAP, **chap)}
        {node_set(CHAP, **{"node.session.auth.password": WRONG_SECRET})}
        step login:chap-wrong {login} {CHAP}
        {node_set(CHAP, **{"node.session.auth.password": CHAP_SECRET})}
        step login:chap {login} {CHAP}
        {node_set(MUTUAL, **mutual)}
        {node_set(MUTUAL, **{"node.session.auth.password_in": WRONG_SECRET})}
        step login:mutual-wrong {login} {MUTUAL}
        {node_set(MUTUAL, **{"node.session.auth.password_in": TARGET_SECRET})}
        step login:mutual {login} {MUTUAL}
        step login:masked {login} {MASKED}
        step session iscsiadm -m session
        step wait wait_disks {len(LUNS)}
        iscsi_disks > /tmp/disks
        step disks cat /tmp/disks
        while read tgt lun sd sg; do
          d=${{tgt##*.}}-$lun
          dev=/dev/$sd
          step inq:$d sg_inq $dev
          for p in di sn bl lbpv; do step vpd-$p:$d sg_vpd -p $p $dev; done
          step readcap:$d sg_readcap $dev
          step readcap16:$d sg_readcap -l $dev
          step luns:$d sg_luns $dev
          step turs:$d sg_turs -n 3 -v $dev
          step modes:$d sg_modes $dev
          step sysfs-size:$d cat /sys/block/$sd/size /sys/block/$sd/queue/logical_block_size
          step dd-write:$d dd if=/pattern.bin of=$dev bs=64k seek={PATTERN_OFFSET // 65536} \\
            oflag=direct conv=notrunc
          step dd-read:$d sh -c "dd if=$dev of=/tmp/back bs=64k skip={PATTERN_OFFSET // 65536} \\
            count={PATTERN_LEN // 65536} iflag=direct && cmp /pattern.bin /tmp/back && echo same"
          step host-pattern:$d sh -c "dd if=$dev bs=64k skip={HOST_OFFSET // 65536} \\
            count={PATTERN_LEN // 65536} iflag=direct 2>/dev/null | sha256sum"
        done < /tmp/disks
        dev=/dev/$(awk '$1 == "{DISKS}" && $2 == 0 {{print $3}}' /tmp/disks)
        step opcodes sg_opcodes $dev
        step pr-register sg_persist --out --register --param-sark=0x{PR_KEY:x} $dev
        step pr-reserve sg_persist --out --reserve --param-rk=0x{PR_KEY:x} --prout-type=1 $dev
        step pr-keys sg_persist --in --read-keys $dev
        step pr-reservation sg_persist --in --read-reservation $dev
        step pr-release sg_persist --out --release --param-rk=0x{PR_KEY:x} --prout-type=1 $dev
        step pr-unregister sg_persist --out --register --param-rk=0x{PR_KEY:x} $dev
        step pr-keys-after sg_persist --in --read-keys $dev
        # thin provisioning and the other SBC commands, on {first} past the pattern
        step unmap-prewrite dd if=/pattern.bin of=$dev bs=64k seek={UNMAP_LBA * 512 // 65536} \\
          oflag=direct conv=notrunc
        step lba-status-mapped sg_get_lba_status --lba={UNMAP_LBA} $dev
        step unmap sg_unmap --force --lba={UNMAP_LBA} --num={UNMAP_BLOCKS} $dev
        step lba-status sg_get_lba_status --lba={UNMAP_LBA} $dev
        step unmap-read sh -c "dd if=$dev bs=64k skip={UNMAP_LBA // 128} \\
          count={UNMAP_BLOCKS // 128} \\
          iflag=direct 2>/dev/null | sha256sum"
        dd if=/pattern.bin of=/tmp/blk bs=512 count=1 2>/dev/null
        step write-same sg_write_same --16 --in=/tmp/blk --lba=20480 --num=64 $dev
        step write-same-check sh -c "dd if=$dev bs=512 skip=20480 count=64 iflag=direct \\
          2>/dev/null | sha256sum"
        dd if=/pattern.bin of=/tmp/caw bs=512 skip=1 count=1 2>/dev/null
        cat /tmp/blk /tmp/caw > /tmp/caw2
        step caw sg_compare_and_write --in=/tmp/caw2 --lba=20480 --num=1 --xferlen=1024 $dev
        step caw-check sh -c "dd if=$dev bs=512 skip=20480 count=1 iflag=direct \\
          2>/dev/null | sha256sum"
        step caw-miscompare sg_compare_and_write --in=/tmp/caw2 --lba=20480 --num=1 \\
          --xferlen=1024 $dev
        # a file system on the 4096-byte-block disk
        dev=/dev/$(awk '$1 == "{DISKS}" && $2 == 1 {{print $3}}' /tmp/disks)
        step mkfs mkfs.ext4 -F -q -E nodiscard -L interop $dev {FS_SIZE}
        step mount mount -t ext4 $dev /mnt
        step write-file sh -c "cp /pattern.bin /mnt/pattern.bin && echo hello > /mnt/hello.txt \\
          && sync && ls -l /mnt"
        step umount umount /mnt
        step fsck e2fsck -f -n $dev
        step logout iscsiadm -m node --logoutall=all
        step session-after iscsiadm -m session
        step dmesg dmesg
    """)


@dataclass
class GuestResult:
    run: guest_tools.GuestRun
    target: RunningTarget
    state: Path
    pattern: bytes
    host_pattern: bytes

    def out(self, name: str, rc: int | None = 0) -> str:
        return step_output(self.run, name, rc)

    def backing(self, key: tuple[str, int]) -> Path:
        return self.state / f"{LABELS[key]}.img"


@pytest.fixture(scope="module")
def guest(guest_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuestResult]:
    work = tmp_path_factory.mktemp("open-iscsi")
    state = work / "luns"
    state.mkdir()
    rng = random.Random(7)
    pattern = rng.randbytes(PATTERN_LEN)
    host_pattern = rng.randbytes(PATTERN_LEN)
    for (_t, _lun), (size, _bs) in LUNS.items():
        path = state / f"{LABELS[(_t, _lun)]}.img"
        with open(path, "wb") as f:
            f.truncate(size)
            f.seek(HOST_OFFSET)
            f.write(host_pattern)
    config = work / "target.toml"
    config.write_text(config_text(state))
    target = start_target(work, "--config", str(config))
    try:
        run = guest_tools.boot(
            guest_script(),
            port=target.port,
            files={"pattern.bin": pattern},
            guest_dir=guest_dir,
            workdir=work,
        )
        yield GuestResult(run, target, state, pattern, host_pattern)
    finally:
        target.stop()


def test_guest_ran_to_the_end(guest: GuestResult) -> None:
    assert "@@@GUEST-DONE" in guest.run.console, guest.run.console
    assert guest.run.returncode == 0, guest.run.console


def test_discovery_lists_allowed_targets_only(guest: GuestResult) -> None:
    out = guest.out("discovery")
    listed = set(re.findall(r"^\S+,\d+ (\S+)$", out, re.M))
    # the ACL hides the masked target from this initiator's SendTargets
    assert listed == {DISKS, CHAP, MUTUAL}, out
    assert f"127.0.0.1:{guest.target.port},1 {DISKS}" in out


@pytest.mark.parametrize("name", ["disks", "chap", "mutual"])
def test_login(guest: GuestResult, name: str) -> None:
    out = guest.out(f"login:{name}")
    assert "successful" in out, out


def test_chap_wrong_secret_refused(guest: GuestResult) -> None:
    out = guest.out("login:chap-wrong", rc=None)
    assert guest.run["login:chap-wrong"].rc != 0
    assert "authorization failure" in out, out


def test_mutual_chap_wrong_target_secret_refused_by_initiator(guest: GuestResult) -> None:
    out = guest.out("login:mutual-wrong", rc=None)
    # open-iscsi checks the target's CHAP response itself and gives up the login
    assert guest.run["login:mutual-wrong"].rc != 0, out


def test_masked_target_login_refused(guest: GuestResult) -> None:
    out = guest.out("login:masked", rc=None)
    assert guest.run["login:masked"].rc != 0, out
    # Status-Class 2 (initiator error), detail 2 (forbidden): iscsiadm's exit 24
    assert "authorization failure" in out, out
    assert guest.run["login:masked"].rc == 24, out
    assert "Initiator denied" in guest.target.log() or MASKED not in guest.out("session")


def test_sessions_and_disks(guest: GuestResult) -> None:
    sessions = guest.out("session")
    for iqn in (DISKS, CHAP, MUTUAL):
        assert f"{PORTAL.replace(':', ',')},1 {iqn}" in sessions or iqn in sessions, sessions
    assert MASKED not in sessions
    disks = guest.out("disks").split("\n")
    seen = {(line.split()[0], int(line.split()[1])) for line in disks if line.strip()}
    assert seen == set(LUNS), disks


@pytest.mark.parametrize("key", list(LUNS), ids=list(LABELS.values()))
def test_sg_inq(guest: GuestResult, key: tuple[str, int]) -> None:
    out = guest.out(f"inq:{LABELS[key]}")
    assert "Peripheral device type: disk" in out, out
    assert "Vendor identification: ISCSIVMT" in out, out
    assert "[SPC-4]" in out or "version=0x06" in out, out
    assert "CmdQue=1" in out and "HiSUP=1" in out, out


def _iscsi_inq(target: RunningTarget, key: tuple[str, int], page: int) -> bytes:
    need("iscsi-inq")
    iqn, lun = key
    url = target.url(iqn, lun)
    if iqn == CHAP:
        url = url.replace("iscsi://", f"iscsi://{CHAP_USER}%{CHAP_SECRET}@")
    elif iqn == MUTUAL:
        url = url.replace("iscsi://", f"iscsi://{MUTUAL_USER}%{MUTUAL_SECRET}@")
    r = subprocess.run(
        ["iscsi-inq", "-i", INITIATOR, "-e", "1", "-c", str(page), url],
        capture_output=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.mark.parametrize("key", list(LUNS), ids=list(LABELS.values()))
def test_sg_vpd_device_identification_matches_host(
    guest: GuestResult, key: tuple[str, int]
) -> None:
    out = guest.out(f"vpd-di:{LABELS[key]}")
    m = re.search(r"designator type: NAA,\s+code set: Binary\s*\n\s+0x([0-9a-f]+)", out)
    assert m, out
    naa = bytes.fromhex(m.group(1))
    assert naa[0] >> 4 in (5, 6), out  # IEEE Registered (Extended)
    # the same designator through libiscsi on the host (printed raw, 16 bytes)
    host = _iscsi_inq(guest.target, key, 0x83)
    assert host_naa_matches(host, naa), (naa.hex(), host)
    iqn = key[0]
    assert f"{iqn},t,0x0001" in out, out  # target port: SCSI name string
    assert re.search(rf"SCSI name string:\s*\n\s*{re.escape(iqn)}\s*$", out, re.M), out


@pytest.mark.parametrize("key", list(LUNS), ids=list(LABELS.values()))
def test_sg_vpd_serial_matches_host(guest: GuestResult, key: tuple[str, int]) -> None:
    out = guest.out(f"vpd-sn:{LABELS[key]}")
    m = re.search(r"Unit serial number:\s*(\S+)", out)
    assert m, out
    host = _iscsi_inq(guest.target, key, 0x80).decode("latin-1")
    assert f"Unit Serial Number:[{m.group(1)}]" in host, (out, host)
    assert m.group(1) in guest.out(f"inq:{LABELS[key]}")


@pytest.mark.parametrize("key", list(LUNS), ids=list(LABELS.values()))
def test_sg_vpd_block_limits_match_host(guest: GuestResult, key: tuple[str, int]) -> None:
    out = guest.out(f"vpd-bl:{LABELS[key]}")
    host = _iscsi_inq(guest.target, key, 0xB0).decode("latin-1")
    m = re.search(r"Maximum transfer length: (\d+)", out)
    h = re.search(r"maximum transfer length:(\d+)", host)
    assert m and h and m.group(1) == h.group(1), (out, host)
    m = re.search(r"Optimal transfer length granularity: (\d+)", out)
    h = re.search(r"optimal transfer length granularity:(\d+)", host)
    assert m and h and m.group(1) == h.group(1), (out, host)


@pytest.mark.parametrize("key", list(LUNS), ids=list(LABELS.values()))
def test_sg_vpd_logical_block_provisioning(guest: GuestResult, key: tuple[str, int]) -> None:
    out = guest.out(f"vpd-lbpv:{LABELS[key]}")
    assert "Logical block provisioning VPD page" in out, out
    # thin file LUNs: UNMAP and WRITE SAME with UNMAP are advertised
    assert re.search(r"Unmap command supported \(LBPU\): 1", out), out


@pytest.mark.parametrize("key", list(LUNS), ids=list(LABELS.values()))
def test_sg_readcap_exact_capacity(guest: GuestResult, key: tuple[str, int]) -> None:
    size, bs = LUNS[key]
    blocks = size // bs
    for step in ("readcap", "readcap16"):
        out = guest.out(f"{step}:{LABELS[key]}")
        assert f"Last LBA={blocks - 1} (0x{blocks - 1:x}), Number of logical blocks={blocks}" in (
            out
        ), out
        assert f"Logical block length={bs} bytes" in out, out
        assert re.search(rf"Device size: {size} bytes", out), out
    out16 = guest.out(f"readcap16:{LABELS[key]}")
    assert "Logical block provisioning: lbpme=1, lbprz=1" in out16, out16
    sectors, lbs = guest.out(f"sysfs-size:{LABELS[key]}").split()
    assert int(sectors) * 512 == size and int(lbs) == bs


@pytest.mark.parametrize("key", list(LUNS), ids=list(LABELS.values()))
def test_sg_luns(guest: GuestResult, key: tuple[str, int]) -> None:
    out = guest.out(f"luns:{LABELS[key]}")
    luns = sorted(lun for (t, lun) in LUNS if t == key[0])
    assert f"implies {len(luns)} lun entr" in out or f"{len(luns)} lun entr" in out, out
    # 8-byte LUNs in hex: peripheral device addressing, LUN in the low 14 bits of byte 0-1
    listed = [int(x[:4], 16) & 0x3FFF for x in re.findall(r"^\s+([0-9a-f]{16})\s*$", out, re.M)]
    assert listed == luns, out


@pytest.mark.parametrize("key", list(LUNS), ids=list(LABELS.values()))
def test_sg_turs(guest: GuestResult, key: tuple[str, int]) -> None:
    out = guest.out(f"turs:{LABELS[key]}")
    assert "Completed 3 Test Unit Ready commands with 0 errors" in out, out


@pytest.mark.parametrize("key", list(LUNS), ids=list(LABELS.values()))
def test_sg_modes(guest: GuestResult, key: tuple[str, int]) -> None:
    out = guest.out(f"modes:{LABELS[key]}")
    assert ">> Caching, page_control: current" in out, out
    assert ">> Control, page_control: current" in out, out
    # caching page byte 2: WCE (write cache enabled) set
    assert re.search(r"^ 00\s+08 12 (\S\S)", out, re.M).group(1) == "04", out
    # the short block descriptor: number of blocks (3 bytes after density) and block length
    m = re.search(r"Direct access device block descriptors:\n.*\n 00\s+((?:\S\S ?){8})", out)
    assert m, out
    desc = bytes.fromhex(m.group(1).replace(" ", ""))
    size, bs = LUNS[key]
    assert int.from_bytes(desc[1:4], "big") == size // bs, out
    assert int.from_bytes(desc[5:8], "big") == bs, out


@pytest.mark.parametrize("key", list(LUNS), ids=list(LABELS.values()))
def test_dd_o_direct_round_trip_lands_in_backing_file(
    guest: GuestResult, key: tuple[str, int]
) -> None:
    guest.out(f"dd-write:{LABELS[key]}")
    assert guest.out(f"dd-read:{LABELS[key]}").endswith("same")
    with open(guest.backing(key), "rb") as f:
        f.seek(PATTERN_OFFSET)
        assert f.read(PATTERN_LEN) == guest.pattern


@pytest.mark.parametrize("key", list(LUNS), ids=list(LABELS.values()))
def test_guest_reads_what_the_host_wrote(guest: GuestResult, key: tuple[str, int]) -> None:
    out = guest.out(f"host-pattern:{LABELS[key]}")
    assert out.split()[0] == hashlib.sha256(guest.host_pattern).hexdigest(), out


def test_ext4_mkfs_mount_write_umount(guest: GuestResult) -> None:
    guest.out("mkfs")
    guest.out("mount")
    assert "pattern.bin" in guest.out("write-file")
    guest.out("umount")
    guest.out("fsck")
    # the host reads the file back from the backing file with debugfs (e2fsprogs)
    need("debugfs")
    image = guest.backing((DISKS, 1))
    r = subprocess.run(
        ["debugfs", "-R", "cat /pattern.bin", str(image)], capture_output=True, timeout=60
    )
    assert r.stdout == guest.pattern, r.stderr
    r = subprocess.run(
        ["debugfs", "-R", "cat /hello.txt", str(image)], capture_output=True, timeout=60
    )
    assert r.stdout == b"hello\n", r.stderr


def test_logout(guest: GuestResult) -> None:
    out = guest.out("logout")
    assert out.count("successful") == 3, out
    after = guest.run["session-after"]
    assert after.rc != 0 or not after.output.strip() or "No active sessions" in after.output


# --- SBC/SPC commands beyond the core: opcodes, reservations, provisioning, CAW --------


def test_sg_opcodes(guest: GuestResult) -> None:
    out = guest.out("opcodes")
    for name in ("Inquiry", "Read(10)", "Write(10)", "Read capacity(16)", "Report luns"):
        assert name.lower() in out.lower(), out


def test_sg_persist_register_reserve_read_keys(guest: GuestResult) -> None:
    guest.out("pr-register")
    guest.out("pr-reserve")
    keys = guest.out("pr-keys")
    assert f"0x{PR_KEY:x}" in keys and "1 registered reservation key" in keys, keys
    res = guest.out("pr-reservation")
    assert f"Key=0x{PR_KEY:x}" in res and "Write Exclusive" in res, res
    guest.out("pr-release")
    guest.out("pr-unregister")
    assert "there are NO registered reservation keys" in guest.out("pr-keys-after")


def test_sg_unmap_and_get_lba_status(guest: GuestResult) -> None:
    guest.out("unmap-prewrite")
    out = guest.out("lba-status-mapped")
    assert re.search(rf"LBA: 0x0*{UNMAP_LBA:x}\s+blocks:\s+\d+\s+mapped", out), out
    guest.out("unmap")
    out = guest.out("lba-status")
    m = re.search(rf"LBA: 0x0*{UNMAP_LBA:x}\s+blocks:\s+(\d+)\s+deallocated", out)
    assert m and int(m.group(1)) >= UNMAP_BLOCKS, out
    zeros = hashlib.sha256(bytes(UNMAP_BLOCKS * 512)).hexdigest()
    assert guest.out("unmap-read").split()[0] == zeros  # LBPRZ=1
    # thin LUN: the range is a hole in the backing file again
    with open(guest.backing((DISKS, 0)), "rb") as f:
        start = UNMAP_LBA * 512
        assert os.lseek(f.fileno(), start, os.SEEK_DATA) >= start + UNMAP_BLOCKS * 512


def test_sg_write_same(guest: GuestResult) -> None:
    guest.out("write-same")
    with open(guest.backing((DISKS, 0)), "rb") as f:
        f.seek(20480 * 512)
        data = f.read(64 * 512)
    assert data[512:] == guest.pattern[:512] * 63


def test_sg_compare_and_write(guest: GuestResult) -> None:
    guest.out("caw")
    assert guest.out("caw-check").split()[0] == hashlib.sha256(guest.pattern[512:1024]).hexdigest()
    out = guest.out("caw-miscompare", rc=None)
    assert guest.run["caw-miscompare"].rc != 0 and "iscompare" in out, out
