"""A Ceph cluster of our own for tests and tools: ``tools/ceph-cluster`` (one monitor,
bluestore OSDs on sparse files, cephx, 127.0.0.1 only, every file under one directory)
started and stopped from Python, and images made on it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import IscsiVmtargetError
from ..storage.rbd import RbdBackend, RbdImageSpec, RbdPoolSpec, bindings, create_image
from ..storage.rbd_pr import RadosPrStore

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "ceph-cluster"
POOL = "rbd"


class CephError(IscsiVmtargetError, RuntimeError):
    pass


def missing() -> str | None:
    """Why no cluster can be started here (a sentence), or None when one can."""
    if shutil.which("ceph-mon") is None or shutil.which("ceph-osd") is None:
        return "Ceph is not installed (ceph-mon, ceph-osd: tools/install-deps --ceph)"
    if not SCRIPT.exists():
        return f"{SCRIPT} is missing (run from a checkout)"
    try:
        bindings()
    except IscsiVmtargetError as exc:
        return str(exc)
    return None


@dataclass
class CephCluster:
    """A running cluster in ``directory``; :attr:`conf` is its ceph.conf (the admin
    keyring is named there) and :attr:`pool` an rbd pool on it."""

    directory: Path
    osds: int = 1

    @property
    def conf(self) -> str:
        return str(self.directory / "ceph.conf")

    @property
    def pool(self) -> RbdPoolSpec:
        return RbdPoolSpec(POOL, conf=self.conf)

    def _run(self, *args: str, timeout: float = 180) -> str:
        done = subprocess.run(
            ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout
        )
        if done.returncode:
            raise CephError(f"tools/ceph-cluster {' '.join(args)}: {done.stderr[-3000:]}")
        return done.stdout

    def start(self) -> CephCluster:
        self._run("start", str(self.directory), "--osds", str(self.osds), "--pool", POOL)
        return self

    def stop(self) -> None:
        self._run("stop", str(self.directory))

    def image(self, size: int, prefix: str = "t") -> RbdImageSpec:
        """A new thin image of ``size`` bytes, named uniquely in :attr:`pool`."""
        spec = RbdImageSpec(self.pool, f"{prefix}-{uuid.uuid4().hex[:12]}")
        create_image(spec, size)
        return spec

    def rbd(self, *args: str) -> str:
        """Run the ``rbd`` command on this cluster; its output."""
        done = subprocess.run(
            ["rbd", "-c", self.conf, *args], capture_output=True, text=True, timeout=60
        )
        if done.returncode:
            raise CephError(f"rbd {' '.join(args)}: {done.stderr}")
        return done.stdout


def shared_reservations(image: RbdImageSpec) -> dict[str, Any]:
    """The persistent reservation state every gateway of ``image`` shares, as RADOS
    holds it (the document of scsi/pr_state.py; empty when there is none)."""
    backend = RbdBackend(image, read_only=True)
    try:
        raw = RadosPrStore(backend).load()
    finally:
        backend.close()
    return dict(json.loads(raw)) if raw else {}


#: A target exporting one RBD image as LUN 0, target port group ``tpgt`` (one gateway).
GATEWAY_CONFIG = """
[[target]]
name = "{iqn}"
tpgt = {tpgt}
allow_all = true
[[target.lun]]
number = 0
rbd = "{image}"
ceph_conf = "{conf}"
"""


def gateway_config(
    iqn: str, tpgt: int, image: RbdImageSpec, conf: str, non_owner: str = "standby"
) -> str:
    """The configuration (TOML) of one gateway serving IMAGE as LUN 0 of IQN, the
    gateways that do not own it being ``non_owner`` (its ``alua_non_owner``)."""
    config = GATEWAY_CONFIG.format(iqn=iqn, tpgt=tpgt, image=image, conf=conf)
    return config + f'alua_non_owner = "{non_owner}"\n'


def fast_directory() -> Path | None:
    """A new directory in /dev/shm when bluestore can run there (tmpfs takes O_DIRECT
    since Linux 6.6): an OSD's every commit then skips the disk, which makes a test's
    small synchronous writes 2-3x faster on a busy machine. None where it cannot."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        return None
    directory = Path(tempfile.mkdtemp(prefix="iscsi-vmtarget-ceph-", dir=shm))
    probe = directory / "probe"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o600))
    except OSError:
        shutil.rmtree(directory)
        return None
    probe.unlink()
    return directory


def required() -> bool:
    """True where a test run must have Ceph (CI: ``tools/run-tests`` installs it)."""
    return bool(os.environ.get("CI") or os.environ.get("ISCSI_VMTARGET_REQUIRE_CEPH"))
