"""Failover with the real Linux initiator: dm-multipath over two RBD gateways.

Two gateways (``serve`` processes on their own ports and state directories) export one
RBD image under one target name, target port groups 1 (A) and 2 (B). The multipath
guest (tools/guest ``build(multipath=True)``: generic kernel with scsi_dh_alua,
dm-multipath, multipath-tools) reaches A at 10.0.2.100:3260 and B at 10.0.2.101:3260,
logs in through both and builds one multipath device (same NAA on both paths, two ALUA
groups). A writer writes numbered 4 KiB blocks round a ring of slots with O_DIRECT and
logs every acknowledged write. The host kills A with SIGKILL mid-run: B fences A and
takes the image, multipathd finds B ready and the queued I/O goes on through B. Then A
is started again on its old port: it comes back standby (a "ghost" path) while the
writer keeps writing. At the end every slot holds the last write acknowledged for it,
in the guest's read-back and in the image read with librbd on the host.

Before the kill the guest registers its key through each path and reserves the LU
Write Exclusive - Registrants Only through the multipath device (sg_persist), as
fence_mpath does: open-iscsi gives each session its own ISID, and iSCSI names an
initiator port by initiator name and ISID, so each path is its own initiator port and
a key registered through A (even with ALL_TG_PT) is not one through B; with Write
Exclusive (type 1) only the nexus through A, the holder, could write.
A second host (our initiator, another initiator name, not registered) is refused a
WRITE with RESERVATION CONFLICT through A. After the failover, and again after A's
return, the guest's writes go on through B, it reads its reservation through the
multipath device, the second host is still refused through B and the restarted A
reads the same reservation: it lives in RADOS (storage/rbd_pr.py), not in the killed
gateway.

One guest boot serves every test here (about 35 s of guest on an idle 2-core machine;
the multipath guest image is built once, ~25 s, and cached beside the plain one).
"""

from __future__ import annotations

import itertools
import re
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from iscsi_vmtarget.storage.rbd import RbdImageSpec, open_image
from iscsi_vmtarget.testing.ceph import CephCluster, shared_reservations
from tests.conftest import RunningTarget
from tests.integration.test_rbd_gateways import IQN, gateway
from tests.integration.test_rbd_pr_gateways import (
    CONFLICT,
    HOST2,
    read_keys,
    read_reservation,
    session,
    write_status,
)
from tests.interop.guestlib import GUEST_INITIATOR, guest_tools, step_output

pytestmark = [
    pytest.mark.interop,
    pytest.mark.slow,
    # the first test sets the guest up: image build (once), cluster, the whole boot
    pytest.mark.timeout(480),
]

SLOTS = 64  # the writer's ring of 4 KiB blocks
BLOCK = 4096
IMAGE_SIZE = 32 << 20
#: the issue's bound: kill to I/O going on through the other gateway
FAILOVER_SECONDS = 30
#: A's return must not stall the writer longer than this (a write takes ~0.1-0.5 s)
RESTART_GAP_SECONDS = 5
ACKS_AFTER_KILL = 20
PORTAL_A, PORTAL_B = guest_tools.guest_portal(0), guest_tools.guest_portal(1)
GUEST_KEY = 0x1A1A  # the guest's PR key
RESERVATION_TYPE = 5  # Write Exclusive - Registrants Only

MULTIPATH_CONF = """\
defaults {
    user_friendly_names no
    find_multipaths off
    polling_interval 1
}
devices {
    device {
        vendor "ISCSIVMT"
        product ".*"
        path_grouping_policy group_by_prio
        prio alua
        hardware_handler "1 alua"
        path_checker tur
        path_selector "round-robin 0"
        failback immediate
        no_path_retry queue
    }
}
"""


def guest_script() -> str:
    node = f"iscsiadm -m node -T {IQN}"
    settings = {
        # a dead portal fails its I/O over after 5 s (default 120 s)
        "node.session.timeo.replacement_timeout": "5",
        "node.conn[0].timeo.noop_out_interval": "2",
        "node.conn[0].timeo.noop_out_timeout": "2",
    }
    setup = "\n".join(
        f"{node} -p {p} -o update -n {k} -v {v} >/dev/null"
        for p in (PORTAL_A, PORTAL_B)
        for k, v in settings.items()
    )
    return textwrap.dedent(f"""
        export DM_DISABLE_UDEV=1  # no udevd here: libdevmapper makes /dev/mapper itself
        mkdir -p /etc/multipath
        step iscsid start_iscsid {GUEST_INITIATOR}
        {node} -p {PORTAL_A} -o new >/dev/null
        {node} -p {PORTAL_B} -o new >/dev/null
        {setup}
        # log in through A, then B: the disk that appears second is B's path
        step login-a {node} -p {PORTAL_A} --login
        step wait-a wait_disks 1
        SDA=$(iscsi_disks | awk '{{print $3}}')
        step login-b {node} -p {PORTAL_B} --login
        step wait-b wait_disks 2
        SDB=$(iscsi_disks | awk -v a=$SDA '$3 != a {{print $3}}')
        step disks echo "$SDA $SDB"
        # A took the image first; on a loaded host a lock check may fail once and A
        # be standby for a poll round: wait until A reports itself active/optimized
        n=0
        until sg_rtpg -d /dev/$SDA 2>/dev/null | grep -q "0x00 (active/optimized)" \
            || [ $n -ge 100 ]; do sleep 0.3; n=$((n+1)); done
        step vpd-a sg_vpd -p di /dev/$SDA
        step vpd-b sg_vpd -p di /dev/$SDB
        step rtpg-a sg_rtpg -d /dev/$SDA
        step rtpg-b sg_rtpg -d /dev/$SDB
        step dh-a cat /sys/block/$SDA/device/dh_state
        udev_db_disks
        # multipathd finds both paths at its start and makes the map (queue_if_no_path)
        setsid multipathd -d -s -v3 </dev/null >/tmp/multipathd.log 2>&1 &
        n=0
        until ls /sys/block | grep -q '^dm-' || [ $n -ge 150 ]; do sleep 0.2; n=$((n+1)); done
        step mpll-before multipath -ll
        DM=/dev/$(ls /sys/block | grep '^dm-' | head -1)
        step dm echo $DM
        # a unit attention means the command did not run: once more (sg_persist: rc 6)
        ua_retry() {{ "$@"; _r=$?; [ $_r -eq 6 ] && {{ "$@"; _r=$?; }}; return $_r; }}
        # the guest's key through each path (each its own initiator port; B, standby,
        # takes PERSISTENT RESERVE OUT), then its reservation through the multipath
        # device (the active path)
        for sd in $SDA $SDB; do
          step pr-register-$sd ua_retry sg_persist --out --register \
            --param-sark={GUEST_KEY:#x} /dev/$sd
        done
        step pr-reserve ua_retry sg_persist --out --reserve --param-rk={GUEST_KEY:#x} \
          --prout-type={RESERVATION_TYPE} $DM
        step pr-before ua_retry sg_persist --in --read-reservation $DM
        step fenced-before ask_host second-host before
        # the verifying writer: block i is "seq i slot s" at slot s = i % {SLOTS}, with
        # O_DIRECT; each acknowledged write is logged with the guest's uptime
        writer() {{
          i=0
          while [ ! -e /tmp/stop ]; do
            i=$((i+1)); s=$((i % {SLOTS}))
            if printf 'seq %08d slot %04d\\n' $i $s | \\
                dd of=$DM bs={BLOCK} seek=$s count=1 conv=sync,notrunc oflag=direct \\
                2>/dev/null; then
              echo "$i $s $(cut -d' ' -f1 /proc/uptime)" >> /tmp/acked
            else
              echo "$i $s $(cut -d' ' -f1 /proc/uptime)" >> /tmp/failed
            fi
          done
        }}
        acks() {{ wc -l < /tmp/acked 2>/dev/null || echo 0; }}
        wait_acks() {{  # wait_acks COUNT SECONDS
          _n=0
          while [ $(acks) -lt $1 ] && [ $_n -lt $(($2 * 5)) ]; do sleep 0.2; _n=$((_n+1)); done
          [ $(acks) -ge $1 ]
        }}
        : > /tmp/acked
        writer &
        WRITER=$!
        step running wait_acks 20 60
        step kill ask_host kill-a
        echo "@@@KILLED $(acks) $(cut -d' ' -f1 /proc/uptime)"
        step resumed wait_acks $(($(acks) + {ACKS_AFTER_KILL})) 90
        step mpll-failover multipath -ll
        step pr-after-failover ua_retry sg_persist --in --read-reservation $DM
        step keys-after-failover ua_retry sg_persist --in --read-keys $DM
        step fenced-after-failover ask_host second-host after-failover
        step restart ask_host restart-a
        echo "@@@RESTARTED $(acks) $(cut -d' ' -f1 /proc/uptime)"
        # A's path back as standby: multipathd's checker (TUR) finds it a ghost and
        # dm keeps it active (iscsid logs in again after its own back-off)
        ghost_wait() {{
          _end=$(( $(cut -d. -f1 /proc/uptime) + 90 ))
          while :; do
            _out=$(multipathd show paths format "%d %t %T")
            echo "$_out" | grep -q "^$SDA active ghost" && break
            [ $(cut -d. -f1 /proc/uptime) -ge $_end ] && break
            sleep 0.5
          done
          echo "$_out"
        }}
        step paths ghost_wait
        step after-restart wait_acks $(($(acks) + 10)) 60
        step mpll-after multipath -ll
        step rtpg-a-after sg_rtpg -d /dev/$SDA
        step pr-after-restart ua_retry sg_persist --in --read-reservation $DM
        step fenced-after-restart ask_host second-host after-restart
        touch /tmp/stop
        wait $WRITER
        step acked cat /tmp/acked
        step failed cat /tmp/failed
        step readback sh -c "dd if=$DM bs={BLOCK} count={SLOTS} iflag=direct 2>/dev/null \\
          | tr -d '\\000'"
        step multipathd-log cat /tmp/multipathd.log
        multipathd shutdown >/dev/null 2>&1
        step logout iscsiadm -m node --logout
    """)


@dataclass
class SecondHost:
    """What the second host (HOST2, our initiator) saw through one gateway."""

    keys: list[int]
    reservation: tuple[int, int] | None
    write: int  # the SCSI status of its WRITE


def second_host(t: RunningTarget) -> SecondHost:
    """Log HOST2 in to gateway T and try a WRITE; the reservation keys and holder it
    reads there."""
    ini = session(t, HOST2)
    try:
        return SecondHost(read_keys(ini), read_reservation(ini), write_status(ini))
    finally:
        ini.close()


@dataclass
class Failover:
    run: guest_tools.GuestRun
    image: RbdImageSpec
    gateway_logs: dict[str, str] = field(default_factory=dict)
    #: what the second host saw: "before" (through A), "after-failover" (B),
    #: "after-restart" (B), "standby" (restarted A's PR IN)
    second: dict[str, SecondHost] = field(default_factory=dict)

    def out(self, name: str, rc: int | None = 0) -> str:
        return step_output(self.run, name, rc)

    def failed_writes(self) -> str:
        """The writer's failed writes (none: the log was never made)."""
        failed = self.out("failed", rc=None)
        return "" if "No such file" in failed else failed

    def marker(self, name: str) -> tuple[int, float]:
        """(acknowledged writes, guest uptime) printed at ``@@@NAME``."""
        m = re.search(rf"@@@{name} (\d+) ([\d.]+)", self.run.console)
        assert m, f"no @@@{name} line\n{self.run.console}"
        return int(m.group(1)), float(m.group(2))

    def acked(self) -> list[tuple[int, int, float]]:
        """The writer's acknowledged writes: (seq, slot, uptime at the ack)."""
        rows = [line.split() for line in self.out("acked").splitlines()]
        return [(int(i), int(s), float(t)) for i, s, t in (r for r in rows if len(r) == 3)]

    def longest_gap(self, start: float, end: float) -> float:
        """The longest time without an acknowledgement between START and END."""
        times = [start] + [t for _, _, t in self.acked() if start < t < end] + [end]
        return max(b - a for a, b in itertools.pairwise(times))


@pytest.fixture(scope="module")
def failover(
    ceph_cluster: CephCluster, multipath_guest_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Failover]:
    tmp = tmp_path_factory.mktemp("failover")
    image = ceph_cluster.image(IMAGE_SIZE, prefix="mp")
    a = gateway(tmp, "a", 1, image, ceph_cluster.conf)
    b = gateway(tmp, "b", 2, image, ceph_cluster.conf)
    port_a = a.port
    running: dict[str, RunningTarget] = {"a": a, "b": b}
    logs: dict[str, str] = {}
    second: dict[str, SecondHost] = {}

    def on_request(words: str) -> str:
        if words.startswith("second-host "):
            when = words.split()[1]
            second[when] = second_host(running["a" if when == "before" else "b"])
            if when == "after-restart":
                second["standby"] = second_host(running["a2"])
            return "ok"
        if words == "kill-a":
            running["a"].proc.kill()
            running["a"].proc.wait()
            return "ok"
        if words == "restart-a":
            state = str(tmp / "a" / "run" / "state")  # A's own state directory
            running["a2"] = gateway(
                tmp, "a2", 1, image, ceph_cluster.conf,
                "--portal", f"127.0.0.1:{port_a}", "--state-dir", state,
            )
            return "ok"
        raise ValueError(f"unknown request {words!r}")

    try:
        run = guest_tools.boot(
            guest_script(),
            port=[a.port, b.port],
            files={"etc/multipath.conf": MULTIPATH_CONF.encode()},
            guest_dir=multipath_guest_dir,
            workdir=tmp,
            timeout=300,
            on_request=on_request,
        )
    finally:
        for name, t in running.items():
            t.stop()
            logs[name] = t.log()
    yield Failover(run, image, logs, second)


def test_one_device_two_alua_groups(failover: Failover) -> None:
    naa = [re.findall(r"0x[0-9a-f]{32}", failover.out(f"vpd-{p}")) for p in "ab"]
    assert naa[0] and naa[0] == naa[1], failover.out("vpd-a")  # one logical unit
    rtpg = failover.out("rtpg-a")
    assert re.search(r"target port group id : 0x1 .*\n.*active/optimized", rtpg), rtpg
    assert re.search(r"target port group id : 0x2 .*\n.*standby", failover.out("rtpg-b"))
    assert "alua" in failover.out("dh-a")  # scsi_dh_alua attached
    mpll = failover.out("mpll-before")
    assert len(re.findall(r"^\S+ dm-\d+ ISCSIVMT", mpll, re.M)) == 1, mpll  # one map
    # the groups in priority order: A's active/optimized path, B's standby ("ghost") one
    assert re.findall(r"prio=(\d+)", mpll) == ["50", "1"], mpll
    assert "queue_if_no_path" in mpll, mpll
    sda, sdb = failover.out("disks").split()
    assert re.search(rf"{sda}\s.*active ready", mpll) and re.search(rf"{sdb}\s.*active ghost", mpll)


def test_io_resumes_through_the_other_gateway(failover: Failover) -> None:
    failover.out("resumed")
    _, killed = failover.marker("KILLED")
    _, restarted = failover.marker("RESTARTED")
    gap = failover.longest_gap(killed, restarted)
    print(f"failover: longest time without an acknowledged write {gap:.1f} s")
    assert gap < FAILOVER_SECONDS
    assert failover.failed_writes() == ""
    assert "fencing" in failover.gateway_logs["b"]
    groups = re.findall(r"prio=(\d+) status=(\w+)", failover.out("mpll-failover"))
    assert ("50", "active") in groups, failover.out("mpll-failover")


def test_restarted_gateway_is_standby_and_io_goes_on(failover: Failover) -> None:
    paths = failover.out("paths")
    sda = failover.out("disks").split()[0]
    assert re.search(rf"^{sda} active ghost", paths, re.M), paths
    rtpg = failover.out("rtpg-a-after")
    assert re.search(r"target port group id : 0x1 .*\n.*standby", rtpg), rtpg
    assert re.search(r"target port group id : 0x2 .*\n.*active/optimized", rtpg), rtpg
    failover.out("after-restart")
    _, restarted = failover.marker("RESTARTED")
    end = failover.acked()[-1][2]
    assert failover.longest_gap(restarted, end) < RESTART_GAP_SECONDS


def test_no_acknowledged_write_lost(failover: Failover) -> None:
    last: dict[int, int] = {}
    for seq, slot, _ in failover.acked():
        last[slot] = seq
    assert len(last) == SLOTS
    expected = [f"seq {last[s]:08d} slot {s:04d}" for s in range(SLOTS)]
    assert failover.out("readback").split("\n") == expected
    image = open_image(failover.image, None, read_only=True)
    try:
        data = bytes(image.read(0, SLOTS * BLOCK))
    finally:
        image.close()
    blocks = [data[s * BLOCK : (s + 1) * BLOCK].rstrip(b"\0").decode() for s in range(SLOTS)]
    assert [b.strip() for b in blocks] == expected


def guest_reservation(text: str) -> tuple[int, str] | None:
    """(key, type) from ``sg_persist --in --read-reservation`` output."""
    m = re.search(r"Key=(0x[0-9a-f]+)\s+scope: LU_SCOPE,\s+type: (.+)", text)
    return None if m is None else (int(m.group(1), 16), m.group(2).strip())


def test_reservation_holds_through_failover_and_restart(failover: Failover) -> None:
    held = (GUEST_KEY, "Write Exclusive, registrants only")
    reserved = (GUEST_KEY, RESERVATION_TYPE)
    for when in ("before", "after-failover", "after-restart"):
        failover.out(f"fenced-{when}")  # the host's checks ran (else: the console)
    assert guest_reservation(failover.out("pr-before")) == held, failover.out("pr-before")
    before = failover.second["before"]
    assert (before.keys, before.reservation) == ([GUEST_KEY, GUEST_KEY], reserved), before
    assert before.write == CONFLICT  # the second host is fenced through A
    # after kill -9 of A: the guest's writes went on through B (none failed), it
    # reads its reservation there, and the second host is fenced through B
    failover.out("resumed")
    assert failover.failed_writes() == ""
    after = failover.out("pr-after-failover")
    assert guest_reservation(after) == held, after
    keys = failover.out("keys-after-failover")
    assert re.findall(r"^\s+(0x[0-9a-f]+)$", keys, re.M) == [hex(GUEST_KEY)] * 2, keys
    for when in ("after-failover", "after-restart"):
        seen = failover.second[when]
        assert (seen.reservation, seen.write) == (reserved, CONFLICT), (when, seen)
    # A, back as standby, reads the same shared state
    assert failover.second["standby"].reservation == reserved
    assert guest_reservation(failover.out("pr-after-restart")) == held
    stored = shared_reservations(failover.image)  # the object in RADOS, as the host reads it
    assert stored["reservation"]["type"] == RESERVATION_TYPE
    assert [r["key"] for r in stored["registrations"]] == [GUEST_KEY, GUEST_KEY]
