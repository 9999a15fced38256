"""The wheel ``python -m build`` makes works from a clean venv, away from the checkout:
built and installed once per session (:func:`installed`), then the CLI smoke tests
run its ``iscsi-vmtarget`` script: ``--version``, ``--help``, and ``serve`` answering
``iscsi-ls``."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest

import iscsi_vmtarget
from tests.conftest import run_tool, start_target

ROOT = Path(__file__).resolve().parent.parent
#: What a wheel build needs of the checkout (tests, tools and state stay out).
SOURCES = ("iscsi_vmtarget", "setup.cfg", "setup.py", "README.rst")


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The ``bin`` directory of a fresh venv with only the wheel and its dependencies."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    source.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, source / name)
    dist = work / "dist"
    # --no-isolation: the build backend installed here (setuptools) rather than a
    # download into a throw-away environment; the wheel is the same
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(dist),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    wheels = list(dist.glob("iscsi_vmtarget-*.whl"))
    assert len(wheels) == 1, wheels
    env = work / "venv"
    venv.create(env, with_pip=False)  # this pip installs into it: no ensurepip run
    pip = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(env / "bin" / "python"),
            "install",
            "-q",
            "--no-compile",
            str(wheels[0]),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=work,
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr
    yield env / "bin"


def _run(bin_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(bin_dir / "iscsi-vmtarget"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


@pytest.mark.slow
def test_version_and_help_from_the_wheel(installed: Path, tmp_path: Path) -> None:
    where = subprocess.run(
        [str(installed / "python"), "-c", "import iscsi_vmtarget; print(iscsi_vmtarget.__file__)"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert where.stdout.startswith(str(installed.parent)), where  # not this checkout
    version = _run(installed, "--version", cwd=tmp_path)
    assert version.stdout.strip() == f"iscsi-vmtarget {iscsi_vmtarget.__version__}"
    helped = _run(installed, "--help", cwd=tmp_path)
    assert helped.returncode == 0
    for command in ("serve", "vm", "acl", "api", "status"):
        assert command in helped.stdout
    tokens = _run(installed, "api", "token", "list", "--state-dir", str(tmp_path), cwd=tmp_path)
    assert tokens.returncode == 0, tokens.stderr


@pytest.mark.slow
def test_serve_from_the_wheel_answers_iscsi_ls(installed: Path, tmp_path: Path) -> None:
    target = start_target(tmp_path, command=[str(installed / "iscsi-vmtarget")])
    try:
        out = run_tool("iscsi-ls", "-s", f"iscsi://{target.portal}").stdout
        assert "iqn.2026-11.org.iscsi-vmtarget:demo" in out
        assert "Lun:0" in out
    finally:
        assert target.stop() == 0
