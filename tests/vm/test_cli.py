"""The ``vm``, ``pool``, ``discover`` and ``key`` commands, run in-process through main()."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from iscsi_vmtarget.cli.main import main
from iscsi_vmtarget.testing.ceph import CephCluster
from iscsi_vmtarget.vm.format.header import RegionKind
from iscsi_vmtarget.vm.format.sealed import table_bytes
from tests.vm.test_manager import snapshot

MIB = 1 << 20


class Cli:
    def __init__(self, state: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.state = state
        self.capsys = capsys

    def __call__(self, *args: str, key_file: str | None = None) -> tuple[int, str, str]:
        self.capsys.readouterr()
        extra = ["--state-dir", str(self.state)]
        if key_file:
            extra += ["--key-file", key_file]
        try:
            code = main([*args, *extra])
        except SystemExit as exc:  # argparse usage errors
            code = int(exc.code or 0)
        out, err = self.capsys.readouterr()
        return code, out, err

    def json(self, *args: str) -> object:
        code, out, err = self(*args, "--json")
        assert code == 0, err
        return json.loads(out)


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(tmp_path / "state", capsys)


def test_create_list_show_json(cli: Cli) -> None:
    created = cli.json(
        "vm", "create", "web", "--disk", "16M", "--memory", "8M", "--secondary", "4M",
        "--mode", "aligned",
    )  # fmt: skip
    assert created["target"] == "iqn.2026-11.org.iscsi-vmtarget:vm.web"  # type: ignore[index]
    luns = created["luns"]  # type: ignore[index]
    assert [(lun["lun"], lun["role"], lun["disk_bytes"]) for lun in luns] == [
        (0, "base", 16 * MIB),
        (1, "secondary", 4 * MIB),
    ]
    assert all(len(lun["naa"]) == 32 and lun["naa"][0] == "6" for lun in luns)
    assert cli.json("vm", "list") == [dict(created, served=False)]  # type: ignore[arg-type]
    assert cli.json("vm", "show", "web") == dict(created, served=False)  # type: ignore[arg-type]
    code, out, _ = cli("vm", "show", "web")
    assert code == 0 and "LUN 1: secondary" in out and "state" in out
    key = cli.state / "master.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_pools_json(cli: Cli, tmp_path: Path) -> None:
    assert [p["name"] for p in cli.json("pool", "list")] == ["default"]  # type: ignore[union-attr]
    made = cli.json("pool", "create", "big", "--device", str(tmp_path / "dev.img"), "--size", "64M")
    assert made["kind"] == "device" and made["units"] == 0  # type: ignore[index]
    cli.json("pool", "create", "fast", "--path", str(tmp_path / "fast"))
    pools = cli.json("pool", "list")
    assert [(p["name"], p["kind"]) for p in pools] == [  # type: ignore[union-attr]
        ("big", "device"),
        ("default", "directory"),
        ("fast", "directory"),
    ]
    code, _, err = cli("pool", "create", "big", "--path", str(tmp_path / "x"))
    assert code == 1 and "pool 'big' already exists" in err
    cli.json("vm", "create", "db", "--disk", "8M", "--memory", "4M", "--pool", "big")
    found = cli.json("discover", "--pool", "big")
    assert [vm["name"] for vm in found["vms"]] == ["db"]  # type: ignore[index]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--disk", "1000", "--memory", "4M"], 1, "not a multiple of the 512-byte block"),
        (["--disk", "lots", "--memory", "4M"], 2, "not a size: 'lots'"),
        (["--disk", "8M", "--memory", "4M", "--pool", "nope"], 1, "unknown pool 'nope'"),
        (["--disk", "8M", "--memory", "4M", "--mode", "sideways"], 2, "invalid choice"),
        (["--disk", "8M", "--memory", "0"], 1, "memory size 0 is out of range"),
    ],
)
def test_bad_create_input(cli: Cli, args: list[str], code: int, message: str) -> None:
    got, _out, err = cli("vm", "create", "db", *args)
    assert got == code and message in err
    assert not cli.state.exists() or snapshot(cli.state) == {}


def test_name_clash_and_unknown_vm(cli: Cli) -> None:
    cli.json("vm", "create", "db", "--disk", "8M", "--memory", "4M")
    before = snapshot(cli.state)
    code, _, err = cli("vm", "create", "db", "--disk", "8M", "--memory", "4M")
    assert code == 1 and "a VM named 'db' already exists" in err
    code, _, err = cli("vm", "show", "nope")
    assert code == 1 and "no VM named 'nope' (VMs: db)" in err
    assert snapshot(cli.state) == before


def test_state_round_trip_and_tamper(cli: Cli, tmp_path: Path) -> None:
    cli.json("vm", "create", "db", "--disk", "8M", "--memory", "4M")
    image = tmp_path / "mem.img"
    image.write_bytes(os.urandom(300_000))
    code, out, err = cli("vm", "state", "write", "db", str(image))
    assert code == 0 and "stored 300000 bytes" in out, err
    back = tmp_path / "back.img"
    assert cli("vm", "state", "read", "db", str(back))[0] == 0
    assert back.read_bytes() == image.read_bytes()
    assert stat.S_IMODE(back.stat().st_mode) == 0o600
    # flip one ciphertext byte of the state region in the unit file
    shown = cli.json("vm", "show", "db")
    lun0 = shown["luns"][0]  # type: ignore[index]
    region = next(r for r in lun0["regions"] if r["kind"] == RegionKind.STATE.name.lower())
    unit_file = cli.state / "pools" / "default" / lun0["location"].split(":", 1)[1]
    offset = region["offset"] + table_bytes(region["length"]) + 70_000
    with open(unit_file, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x01]))
    out_file = tmp_path / "tampered.img"
    code, out, err = cli("vm", "state", "read", "db", str(out_file))
    assert code == 1
    assert "chunk 1 failed authentication (tampered, swapped or corrupted)" in err
    assert not out_file.exists() and not Path(f"{out_file}.partial").exists()


def test_wrong_key_file(cli: Cli, tmp_path: Path) -> None:
    cli.json("vm", "create", "db", "--disk", "8M", "--memory", "4M")
    other = tmp_path / "other.key"
    # a key file for another installation: created by 'vm create' there
    Cli(tmp_path / "elsewhere", cli.capsys)(
        "vm", "create", "x", "--disk", "8M", "--memory", "4M", key_file=str(other)
    )
    before = snapshot(cli.state)
    code, _, err = cli("vm", "config", "show", "db", key_file=str(other))
    assert code == 1 and "wrong key file" in err
    code, _, err = cli("vm", "config", "set", "db", "cpus=4", key_file=str(other))
    assert code == 1 and "wrong key file" in err
    code, _, err = cli("vm", "config", "show", "db", key_file=str(tmp_path / "missing.key"))
    assert code == 1 and "no key file" in err
    assert snapshot(cli.state) == before


def test_config_show_and_set(cli: Cli) -> None:
    cli.json("vm", "create", "db", "--disk", "8M", "--memory", "4M")
    config = cli.json("vm", "config", "show", "db")
    assert config["cpus"] == 1 and config["memory"] == 4 * MIB  # type: ignore[index]
    code, out, _ = cli("vm", "config", "set", "db", "cpus=4", "nic=e1000")
    assert code == 0 and "cpus = 4" in out and 'nic = "e1000"' in out
    for bad, message in [
        ("cpus=many", "whole number"),
        ("memory=1G", "vm resize"),
        ("colour=red", "unknown config key 'colour'"),
        ("cpus", "is not KEY=VALUE"),
    ]:
        code, _, err = cli("vm", "config", "set", "db", bad)
        assert code == 1 and message in err, (bad, err)
    assert cli.json("vm", "config", "show", "db")["cpus"] == 4  # type: ignore[index]


def test_resize_and_delete(cli: Cli) -> None:
    cli.json("vm", "create", "db", "--disk", "8M", "--memory", "4M", "--mode", "offset")
    grown = cli.json("vm", "resize", "db", "--disk", "32M", "--memory", "64M")
    assert grown["disk_bytes"] == 32 * MIB  # type: ignore[index]
    code, _, err = cli("vm", "resize", "db")
    assert code == 1 and "give --disk, --memory and/or --secondary LUN=SIZE" in err
    code, out, _ = cli("vm", "delete", "db")
    assert code == 0 and "deleted VM db (1 units)" in out
    assert cli.json("vm", "list") == []


def test_resize_a_secondary_disk(cli: Cli) -> None:
    cli.json("vm", "create", "db", "--disk", "8M", "--memory", "4M", "--secondary", "4M")
    grown = cli.json("vm", "resize", "db", "--secondary", "1=12M")
    assert [lun["disk_bytes"] for lun in grown["luns"]] == [8 * MIB, 12 * MIB]  # type: ignore[index]
    assert cli.json("vm", "config", "show", "db")["disks"] == [8 * MIB, 12 * MIB]  # type: ignore[index]
    code, _, err = cli("vm", "resize", "db", "--secondary", "2=12M")
    assert code == 1 and "has no secondary LUN 2 (1)" in err
    code, _, err = cli("vm", "resize", "db", "--secondary", "x")
    assert code == 2 and "is not LUN=SIZE" in err
    before = snapshot(cli.state)
    code, _, err = cli("vm", "resize", "db", "--disk", "16M", "--secondary", "1=4M")
    assert code == 1 and "shrinking" in err
    assert snapshot(cli.state) == before  # the primary did not grow either


def test_key_rotate_and_show(cli: Cli, tmp_path: Path) -> None:
    cli.json("vm", "create", "db", "--disk", "8M", "--memory", "4M")
    image = tmp_path / "mem.img"
    image.write_bytes(b"memory" * 1000)
    cli("vm", "state", "write", "db", str(image))
    before = cli.json("key", "show")
    report = cli.json("key", "rotate")
    assert report["key_id"] != before[0]["key_id"]  # type: ignore[index]
    assert len(report["rewrapped"]) == 1  # type: ignore[index]
    assert cli.json("key", "show")[0]["key_id"] == report["key_id"]  # type: ignore[index]
    code, _, _ = cli("vm", "state", "read", "db", str(tmp_path / "back"))
    assert code == 0 and (tmp_path / "back").read_bytes() == image.read_bytes()


def test_discover_text_lists_things_apart(cli: Cli) -> None:
    cli.json("vm", "create", "db", "--disk", "8M", "--memory", "4M", "--secondary", "4M")
    (cli.state / "pools" / "default" / "stray.img").write_bytes(b"x" * 4096)
    code, out, _ = cli("discover")
    assert code == 0
    assert "VM db (default, truncate)" in out and "LUN 1: secondary 4M" in out
    assert "foreign default:stray.img" in out


def test_rbd_pool_create_list_and_errors(cli: Cli, ceph_cluster: CephCluster) -> None:
    """``pool create --rbd``: a RADOS pool that is not there, or options that go with
    --rbd alone, are clear errors that define nothing; a good one is listed (free
    space unknown: the test cluster has no ceph-mgr to count it), and a second
    definition of the same RBD pool is refused."""
    conf = ceph_cluster.conf
    code, _, err = cli("pool", "create", "c", "--rbd", "nopool", "--ceph-conf", conf)
    assert code == 1 and "cannot open RADOS pool 'nopool'" in err, err
    code, _, err = cli("pool", "create", "c", "--ceph-id", "gw")
    assert code == 2 and "--ceph-conf and --ceph-id go with --rbd" in err
    code, _, err = cli("pool", "create", "c", "--rbd", "a/b/c", "--ceph-conf", conf)
    assert code == 1 and "is not POOL or POOL/NAMESPACE" in err, err
    assert not (cli.state / "conf" / "pools").exists()
    made = cli.json("pool", "create", "ceph", "--rbd", ceph_cluster.pool.pool, "--ceph-conf", conf)
    assert made["kind"] == "rbd" and made["path"] == "rbd:rbd"  # type: ignore[index]
    assert made["ceph_conf"] == conf  # type: ignore[index]
    assert made["free_bytes"] is None  # type: ignore[index]  # no ceph-mgr: usage unknown
    listed = {p["name"]: p for p in cli.json("pool", "list")}  # type: ignore[union-attr]
    assert listed["ceph"] == made
    code, _, err = cli("pool", "create", "again", "--rbd", "rbd", "--ceph-conf", conf)
    assert code == 1 and "'rbd:rbd' is already pool 'ceph'" in err, err
