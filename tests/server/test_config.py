"""Serve configuration: the TOML model, its errors, and what it may create."""

from __future__ import annotations

from pathlib import Path

import pytest

from iscsi_vmtarget.server.config import (
    ConfigError,
    build_registry,
    demo_config,
    load_config,
    parse_portal,
)
from iscsi_vmtarget.sizes import format_size, parse_size

ROOT = Path(__file__).resolve().parents[2]


def test_example_config_parses() -> None:
    cfg = load_config(str(ROOT / "conf" / "target.example.toml"))
    assert [p.port for p in cfg.portals] == [3260]
    (target,) = cfg.targets
    assert target.name == "iqn.2026-11.org.iscsi-vmtarget:example"
    assert target.luns[0].size == 1 << 30
    assert cfg.negotiation.cmdsn_window == 128


@pytest.mark.parametrize(
    "text,bytes_",
    [("1G", 1 << 30), ("64MiB", 64 << 20), ("512k", 512 << 10), ("4096", 4096), (7, 7)],
)
def test_sizes(text: str | int, bytes_: int) -> None:
    assert parse_size(text) == bytes_


@pytest.mark.parametrize("bad", ["", "1X", "-1", "one gig", "1.5G"])
def test_bad_sizes_name_the_value(bad: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(bad)


def test_format_size() -> None:
    assert format_size(1 << 30) == "1G" and format_size(1000) == "1000"


@pytest.mark.parametrize("text", ["localhost", "1.2.3.4:", ":3260", "h:99999", "h:abc"])
def test_bad_portals(text: str) -> None:
    with pytest.raises(ValueError, match="portal"):
        parse_portal(text)


def test_ipv6_portal() -> None:
    p = parse_portal("[::1]:3260")
    assert (p.host, p.port) == ("::1", 3260)
    assert p.target_address() == "[::1]:3260,1"


@pytest.mark.parametrize(
    "body,message",
    [
        ("[[target]]\n", "missing key 'name'"),
        ('[[target]]\nname = "iqn.x:a"\n[[target.lun]]\nnumber = 0\n', "missing key 'path'"),
        ("not toml [", "not valid TOML"),
        ("[negotiation]\nbogus = 1\n", "has no key 'bogus'"),
        ('[negotiation]\nheader_digests = ["MD5"]\n', "subset"),
        ('[negotiation]\nimmediate_data = "yes"\n', "must be bool"),
    ],
)
def test_config_errors_name_the_problem(tmp_path: Path, body: str, message: str) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(body)
    with pytest.raises(ConfigError, match=message):
        load_config(str(conf))


def test_duplicate_lun_and_target_refused_and_nothing_left_open(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(
        '[[target]]\nname = "iqn.x:a"\n'
        f'[[target.lun]]\nnumber = 0\npath = "{tmp_path}/a.img"\nsize = "1M"\n'
        f'[[target.lun]]\nnumber = 0\npath = "{tmp_path}/b.img"\nsize = "1M"\n'
    )
    with pytest.raises(ConfigError, match="LUN 0 defined twice"):
        build_registry(load_config(str(conf)))
    conf.write_text('[[target]]\nname = "iqn.x:a"\n[[target]]\nname = "IQN.X:A"\n')
    with pytest.raises(ConfigError, match="defined twice"):
        build_registry(load_config(str(conf)))


def test_size_must_be_whole_blocks(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(
        f'[[target]]\nname = "iqn.x:a"\n[[target.lun]]\nnumber = 0\n'
        f'path = "{tmp_path}/a.img"\nsize = 1000\n'
    )
    with pytest.raises(ConfigError, match="not a positive multiple of the block size"):
        build_registry(load_config(str(conf)))
    assert not (tmp_path / "a.img").exists()


def test_demo_config_creates_a_sparse_1g_lun_once(tmp_path: Path) -> None:
    demo = "iqn.2026-11.org.iscsi-vmtarget:demo"
    reg = build_registry(demo_config(str(tmp_path)))
    lu = reg.targets[demo].scsi.luns[0]
    assert lu.backend.size == 1 << 30
    lu.backend.write(0, b"keep" * 128)
    lu.backend.close()
    reg2 = build_registry(demo_config(str(tmp_path)))
    lu2 = reg2.targets[demo].scsi.luns[0]
    assert bytes(lu2.backend.read(0, 512)) == b"keep" * 128
    lu2.backend.close()


def test_thick_lun_preallocates_an_existing_sparse_file(tmp_path: Path) -> None:
    """A thick LUN is resource provisioned: every block must have space, also when
    the file existed sparse before; its data stays as it was."""
    image = tmp_path / "old.img"
    with open(image, "wb") as fh:
        fh.truncate(4 << 20)
        fh.seek(1 << 20)
        fh.write(b"data" * 128)
    assert image.stat().st_blocks * 512 < 4 << 20
    conf = tmp_path / "c.toml"
    conf.write_text(
        f'[[target]]\nname = "iqn.x:a"\n[[target.lun]]\nnumber = 0\npath = "{image}"\n'
        'provisioning = "thick"\n'
    )
    reg = build_registry(load_config(str(conf)))
    lu = reg.targets["iqn.x:a"].scsi.luns[0]
    assert lu.resource_provisioning
    assert image.stat().st_blocks * 512 >= 4 << 20
    assert bytes(lu.backend.read(1 << 20, 512)) == b"data" * 128
    lu.backend.close()
