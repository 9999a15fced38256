"""Several initiator hosts, each in its own network namespace, against one target in
another: every host sees exactly its LUN map through SendTargets, REPORT LUNS and
iscsi-ls, and source-address rules hold.

Topology (created here, removed afterwards; no traffic leaves these namespaces)::

    ns <p>t: bridge br0 10.231.0.1/24 -- target on 10.231.0.1:3260
       +-- veth -- ns <p>1: 10.231.0.11/24
       +-- veth -- ns <p>2: 10.231.0.12/24
       +-- veth -- ns <p>3: 10.231.0.13/24

Needs root and ``ip netns``; skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from iscsi_vmtarget.cli.main import main
from tests.conftest import file_luns

pytestmark = pytest.mark.interop

PREFIX = f"ivt{os.getpid() % 100000}"
TARGET_NS = f"{PREFIX}t"
HOSTS = {1: f"{PREFIX}h1", 2: f"{PREFIX}h2", 3: f"{PREFIX}h3"}
SUBNET = "10.231.0"
PORTAL = f"{SUBNET}.1:3260"
A = "iqn.2026-11.org.iscsi-vmtarget:netns-a"
B = "iqn.2026-11.org.iscsi-vmtarget:netns-b"
INI = {n: f"iqn.2026-11.org.example:nshost{n}" for n in HOSTS}
CONFIG = (
    """
[[target]]
name = "{a}"
"""
    + file_luns("a", "4M", "8M", "12M")
    + """[[target.acl]]
initiator = "{i1}"
luns = [0]
[[target.acl]]
initiator = "{i2}"
sources = ["{net}.12/32"]
luns = [{{number = 0, lun = 1}}, {{number = 1, lun = 2}}]

[[target]]
name = "{b}"
[[target.lun]]
number = 0
path = "{d}/b0.img"
size = "2M"
"""
)
PROBE = """
import json, sys
from iscsi_vmtarget.client import Initiator, LoginFailed
name, target = sys.argv[1], sys.argv[2]
out = {}
d = Initiator(host="TARGET_IP", port=3260, initiator_name=name)
d.login()
out["targets"] = [v for k, v in d.send_targets("All") if k == "TargetName"]
try:
    s = Initiator(host="TARGET_IP", port=3260, initiator_name=name, target_name=target)
    s.login()
    cdb = bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0])
    r = s.command(cdb, read_length=256)
    if r.status:
        r = s.command(cdb, read_length=256)
    n = int.from_bytes(r.data[:4], "big") // 8
    out["luns"] = [int.from_bytes(r.data[8 + 8 * i:10 + 8 * i], "big") & 0x3FFF for i in range(n)]
except LoginFailed as exc:
    out["login"] = [exc.status_class, exc.status_detail]
print(json.dumps(out))
""".replace("TARGET_IP", f"{SUBNET}.1")
REACH = f"""
import socket, sys
try:
    socket.create_connection(("{SUBNET}.1", 9), timeout=1).close()
except ConnectionRefusedError:
    pass  # the host answered: reachable
except OSError:
    sys.exit(1)
"""


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=60)


def in_ns(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", ns, *args, check=check)


def _teardown() -> None:
    for ns in (TARGET_NS, *HOSTS.values()):
        sh("ip", "netns", "del", ns, check=False)


def _setup() -> None:
    sh("ip", "netns", "add", TARGET_NS)
    in_ns(TARGET_NS, "ip", "link", "set", "lo", "up")
    in_ns(TARGET_NS, "ip", "link", "add", "br0", "type", "bridge")
    in_ns(TARGET_NS, "ip", "addr", "add", f"{SUBNET}.1/24", "dev", "br0")
    in_ns(TARGET_NS, "ip", "link", "set", "br0", "up")
    for n, ns in HOSTS.items():
        sh("ip", "netns", "add", ns)
        in_ns(ns, "ip", "link", "set", "lo", "up")
        # both ends are created inside the host namespace, one is then moved
        in_ns(ns, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", f"p{n}")
        in_ns(ns, "ip", "link", "set", f"p{n}", "netns", TARGET_NS)
        in_ns(ns, "ip", "addr", "add", f"{SUBNET}.1{n}/24", "dev", "eth0")
        in_ns(ns, "ip", "link", "set", "eth0", "up")
        in_ns(TARGET_NS, "ip", "link", "set", f"p{n}", "master", "br0")
        in_ns(TARGET_NS, "ip", "link", "set", f"p{n}", "up")


@pytest.fixture(scope="module")
def netns_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2's ip")
    probe = sh("ip", "netns", "add", f"{PREFIX}probe", check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot create network namespaces here: {probe.stderr.strip()}")
    sh("ip", "netns", "del", f"{PREFIX}probe", check=False)
    tmp = tmp_path_factory.mktemp("netns")
    conf = tmp / "netns.toml"
    conf.write_text(CONFIG.format(a=A, b=B, i1=INI[1], i2=INI[2], net=SUBNET, d=tmp))
    state = tmp / "state"
    proc = None
    try:
        _setup()
        for n in HOSTS:  # the bridge needs a moment to forward
            deadline = time.monotonic() + 10
            while in_ns(HOSTS[n], sys.executable, "-c", REACH, check=False).returncode:
                assert time.monotonic() < deadline, f"host {n} cannot reach the target"
        log = open(tmp / "target.log", "w")
        proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                TARGET_NS,
                sys.executable,
                "-m",
                "iscsi_vmtarget",
                "-v",
                "serve",
                "--config",
                str(conf),
                "--portal",
                PORTAL,
                "--state-dir",
                str(state),
                "--nop-interval",
                "0",
            ],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
        )
        assert proc.stdout is not None
        while (line := proc.stdout.readline()) and not line.startswith("ready"):
            pass
        assert line.startswith("ready"), (tmp / "target.log").read_text()
        yield state
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(15)
        _teardown()


def probe(n: int, name: str, target: str = A) -> dict[str, object]:
    out = in_ns(
        HOSTS[n],
        "env",
        f"PYTHONPATH={Path(__file__).parents[2]}",
        sys.executable,
        "-c",
        PROBE,
        name,
        target,
    )
    return dict(json.loads(out.stdout))


def iscsi_ls(n: int, name: str) -> dict[str, list[int]]:
    out = in_ns(HOSTS[n], "iscsi-ls", "-i", name, "-s", f"iscsi://{PORTAL}").stdout
    seen: dict[str, list[int]] = {}
    current = ""
    for line in out.splitlines():
        if m := re.match(r"Target:(\S+) Portal:", line):
            current = m.group(1)
            seen[current] = []
        elif m := re.match(r"Lun:(\d+)", line):
            seen[current].append(int(m.group(1)))
    return seen


def test_each_host_sees_exactly_its_lun_map(netns_target: Path) -> None:
    if shutil.which("iscsi-ls") is None:
        pytest.fail("iscsi-ls is not installed (tools/install-deps --test installs it)")
    assert iscsi_ls(1, INI[1]) == {A: [0], B: [0]}
    assert iscsi_ls(2, INI[2]) == {A: [0, 1], B: [0]}
    assert iscsi_ls(3, INI[3]) == {B: [0]}
    assert probe(1, INI[1]) == {"targets": [A, B], "luns": [0]}
    assert probe(2, INI[2]) == {"targets": [A, B], "luns": [0, 1]}
    assert probe(3, INI[3]) == {"targets": [B], "login": [2, 2]}


def test_source_address_rules_hold(netns_target: Path) -> None:
    # host2's ACL is bound to 10.231.0.12: the same name from another host is refused
    assert probe(1, INI[2]) == {"targets": [B], "login": [2, 2]}
    assert probe(3, INI[2]) == {"targets": [B], "login": [2, 2]}
    # host1's ACL has no source rule: its name works from any host
    assert probe(3, INI[1]) == {"targets": [A, B], "luns": [0]}


def test_live_acl_change_reaches_the_host(
    netns_target: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = str(netns_target)
    assert (
        main(
            [
                "acl",
                "add",
                A,
                INI[3],
                "--luns",
                "9=2",
                "--source",
                f"{SUBNET}.13",
                "--state-dir",
                state,
            ]
        )
        == 0
    )
    try:
        assert probe(3, INI[3]) == {"targets": [A, B], "luns": [9]}
        assert probe(2, INI[3]) == {"targets": [B], "login": [2, 2]}
        assert iscsi_ls(3, INI[3]) == {A: [9], B: [0]}
    finally:
        assert main(["acl", "remove", A, INI[3], "--state-dir", state]) == 0
    assert probe(3, INI[3]) == {"targets": [B], "login": [2, 2]}
