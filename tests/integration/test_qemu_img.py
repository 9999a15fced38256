"""QEMU's libiscsi block driver against the real server: data round trips and bench."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import INITIATOR, RunningTarget, need_tool

pytestmark = pytest.mark.interop

DEMO = "iqn.2026-11.org.iscsi-vmtarget:demo"
SIZE = 64 << 20


def image_opts(t: RunningTarget, lun: int = 0) -> str:
    return (
        f"driver=iscsi,transport=tcp,portal={t.portal},target={DEMO},lun={lun},"
        f"initiator-name={INITIATOR}"
    )


def qemu_img(*args: str, timeout: float = 300) -> str:
    need_tool("qemu-img")
    proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"qemu-img {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _pattern(path: Path) -> str:
    """A 64 MiB file whose every 4 KiB block differs (so misplaced blocks show)."""
    h = hashlib.sha256()
    with open(path, "wb") as fh:
        seed = os.urandom(4096)
        for i in range(SIZE // 4096):
            block = i.to_bytes(8, "little") + seed[8:]
            fh.write(block)
            h.update(block)
    return h.hexdigest()


def test_qemu_img_info_reports_size(demo_target: RunningTarget) -> None:
    out = qemu_img("info", "--image-opts", image_opts(demo_target))
    assert "virtual size: 1 GiB (1073741824 bytes)" in out, out


def test_convert_round_trip(demo_target: RunningTarget, tmp_path: Path) -> None:
    src = tmp_path / "pattern.raw"
    digest = _pattern(src)
    qemu_img("convert", "-n", "-f", "raw", "--target-image-opts", str(src), image_opts(demo_target))
    back = tmp_path / "back.raw"
    qemu_img("convert", "--image-opts", image_opts(demo_target), "-O", "raw", str(back))
    with open(back, "rb") as fh:
        h = hashlib.sha256(fh.read(SIZE)).hexdigest()
    assert h == digest
    # And the bytes really are in the backing file of the LUN, at offset 0.
    lun_file = next((Path(demo_target.log_path.parent) / "state").rglob("demo-lun0.img"))
    with open(lun_file, "rb") as fh:
        assert hashlib.sha256(fh.read(SIZE)).hexdigest() == digest


@pytest.mark.parametrize("mode", ["read", "write"])
def test_qemu_img_bench(demo_target: RunningTarget, mode: str) -> None:
    args = ["bench", "-c", "2000", "-d", "16", "-s", "4k", "--image-opts", image_opts(demo_target)]
    if mode == "write":
        args.insert(1, "-w")
    out = qemu_img(*args)
    assert "Run completed in" in out, out
