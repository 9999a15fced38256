"""``vm promote`` cut short (found by tools/powercut-test, scenario ``promote``): the
temporary VM it builds stayed until the next promote; the next repair (``discover``)
now removes it, and the replica still promotes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from iscsi_vmtarget.vm.faults import ENV
from tests.vm.replica_site import Site

_PROMOTE = """
import sys
from iscsi_vmtarget.storage import FileBackend
from iscsi_vmtarget.vm import StateDir, VmManager
from iscsi_vmtarget.vm.format.crypto import load_key_file
from iscsi_vmtarget.vm.operations.promote import promote
with VmManager(StateDir.at(sys.argv[1])) as m:
    promote(m, "vm1", FileBackend(sys.argv[2]), source_keys=[load_key_file(sys.argv[3])])
"""


@pytest.mark.slow
@pytest.mark.parametrize("crashpoint", ["promote.copying", "promote.filled"])
def test_discover_removes_what_a_killed_promote_made(site: Site, crashpoint: str) -> None:
    site.write(0, b"A" * 4096)
    site.round()
    want = site.images(site.src)
    proc = subprocess.run(
        [sys.executable, "-c", _PROMOTE, str(site.root / "dst"), str(site.replica),
         str(site.root / "src" / "master.key")],
        env={**os.environ, ENV: crashpoint}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert [vm.name for vm in site.dst.discover(repair=False).vms] != []  # the temporary VM
    found = site.dst.discover()
    assert [vm.name for vm in found.vms] == []
    assert any("unfinished promote p-" in r["action"] for r in found.repaired), found.repaired
    assert not found.orphans
    site.promote()
    assert site.images(site.dst) == want
