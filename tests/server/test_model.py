"""One configuration model (``server/model.py``) read from the serve TOML and from the
managed JSON: the same target either way, and the JSON written exactly as before."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from iscsi_vmtarget.server.config import load_config
from iscsi_vmtarget.server.model import LunSpec, TargetSpec, open_lun
from iscsi_vmtarget.server.persist import ManagedConfig

MIB = 1 << 20
INITIATOR = "iqn.2026-11.test:host1"


def test_toml_and_managed_json_read_one_model(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(
        '[[target]]\nname = "iqn.2026-11.test:db"\nalias = "db"\n'
        '[[target.lun]]\nnumber = 0\npath = "db.img"\nsize = "1M"\nprovisioning = "thick"\n'
        f'[[target.acl]]\ninitiator = "{INITIATOR}"\n'
    )
    served = load_config(str(conf)).targets[0]
    assert served.luns == (LunSpec(0, str(tmp_path / "db.img"), MIB, provisioning="thick"),)
    document = json.loads(json.dumps({"targets": [served.to_dict()]}))  # as config.json
    assert ManagedConfig.from_dict(document).targets == (served,)
    lu = open_lun(served.name, served.luns[0])  # one way to open a LUN from its spec
    try:
        assert lu.backend.size == MIB
    finally:
        lu.backend.close()


def test_a_managed_document_is_written_back_unchanged(tmp_path: Path) -> None:
    """A document of today's format loads and dumps key for key (no new keys)."""
    doc = {
        "version": 1,
        "portals": [{"listen": "[::1]:3260", "tpgt": 1}],
        "discovery": {"chap": None, "mutual_chap": None},
        "targets": [
            {
                "name": "iqn.2026-11.test:db",
                "alias": None,
                "tpgt": 1,
                "allow_all": False,
                "chap": None,
                "mutual_chap": None,
                "luns": [
                    {"number": 0, "path": "/srv/db.img", "size": MIB, "read_only": False,
                     "block_size": 512},
                ],
                "acls": [],
            }
        ],
        "vms": [],
        "default_grants": [],
    }  # fmt: skip
    assert ManagedConfig.from_dict(doc).to_dict() == doc
    assert TargetSpec.from_dict(doc["targets"][0]).to_dict() == doc["targets"][0]  # type: ignore[index]


def test_an_empty_backing_file_is_a_creation_a_power_cut_interrupted(tmp_path: Path) -> None:
    """Found by the power-cut simulator (issue 17): the target creates a missing LUN
    file at start; a power cut before that creation reached the disk leaves the name
    with 0 bytes, and the next start refused it ('holds 0 bytes, config says ...')."""
    path = tmp_path / "lun.img"
    path.write_bytes(b"")
    lu = open_lun("iqn.2026-11.test:t", LunSpec(0, str(path), MIB))
    try:
        assert lu.backend.size == MIB
    finally:
        lu.backend.close()
    path.write_bytes(b"x" * 512)  # a file holding data is never replaced
    try:
        open_lun("iqn.2026-11.test:t", LunSpec(0, str(path), MIB))
    except Exception as exc:
        assert "refusing to resize" in str(exc)
    else:
        raise AssertionError("a 512-byte file was resized")


def test_alua_non_owner_is_checked_and_kept() -> None:
    doc = {"number": 0, "rbd": "rbd/db0", "alua_non_owner": "active-non-optimized"}
    lun = LunSpec.from_dict(doc)
    assert lun.alua_non_owner == "active-non-optimized"
    assert LunSpec.from_dict(lun.to_dict()) == lun
    assert "alua_non_owner" not in LunSpec.from_dict({"number": 0, "rbd": "rbd/x"}).to_dict()
    with pytest.raises(ValueError, match="alua_non_owner 'active' is not one of"):
        LunSpec.from_dict({**doc, "alua_non_owner": "active"})
    with pytest.raises(ValueError, match="for rbd LUNs only"):
        LunSpec.from_dict({"number": 0, "path": "/x.img", "alua_non_owner": "standby"})
